"""commit_file on S3: the create/finalize cycle, discovery (one paginated LIST), cleanup of
temporaries (with multipart aborts), and racing writers (threads and processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import _sync
from ckpt.layout import COMMIT_SUCCESS_FILE, METADATA_FILE
from ckpt_strategies.commit_file import WRITER_DIR_INFIX, WRITERS_DIR

HERE = Path(__file__).resolve().parent


def commit_file() -> Any:
    return ckpt.get_strategy("commit_file")


def save(url: str, files: dict[str, bytes], *, finalize: bool = True) -> Any:
    """One writer's save of ``files`` into the step at ``url``."""
    tmp = commit_file().from_final(url)
    backend = tmp.backend
    _sync.run(tmp.create())
    for name, data in files.items():
        _sync.run(backend.write_bytes(tmp.get() / name, data))
    if finalize:
        _sync.run(tmp.finalize())
    return tmp


def test_create_and_finalize(s3_root: str, s3_server: Any) -> None:
    key = s3_server.key_of(s3_root)
    tmp = commit_file().from_final(f"{s3_root}/7")
    assert tmp.get().name.startswith("7" + WRITER_DIR_INFIX)
    _sync.run(tmp.create())
    _sync.run(tmp.backend.write_bytes(tmp.get() / "data.bin", b"payload"))
    # Nothing under the final name before the commit; the writer dir holds the files.
    assert s3_server.children(key + "/") == {WRITERS_DIR}
    assert s3_server.children(f"{key}/{WRITERS_DIR}/") == {tmp.get().name}
    assert list(ckpt.standard_name_format().find_all(s3_root)) == []
    assert ckpt.path_state(tmp.get()) == ckpt.PathState.TEMPORARY
    assert not ckpt.is_path_finalized(f"{s3_root}/7")

    _sync.run(tmp.finalize())
    assert sorted(s3_server.keys(key)) == sorted(
        [
            f"{key}/7/{COMMIT_SUCCESS_FILE}",
            f"{key}/{WRITERS_DIR}/{tmp.get().name}/{METADATA_FILE}",
            f"{key}/{WRITERS_DIR}/{tmp.get().name}/data.bin",
        ]
    )
    assert ckpt.is_path_finalized(f"{s3_root}/7")
    assert ckpt.path_state(f"{s3_root}/7") == ckpt.PathState.FINALIZED
    assert ckpt.path_state(tmp.get()) != ckpt.PathState.TEMPORARY
    content = _sync.run(ckpt.content_path(tmp.backend, tmp.get_final()))
    assert str(content) == str(tmp.get())
    assert _sync.run(tmp.backend.read_bytes(content / "data.bin")) == b"payload"
    metadata = json.loads(_sync.run(tmp.backend.read_bytes(content / METADATA_FILE)))
    assert metadata["commit_timestamp_nsecs"] >= metadata["init_timestamp_nsecs"]
    _sync.run(commit_file().validate_final(f"{s3_root}/7"))
    assert ckpt.all_temporary_paths(s3_root) == []

    # A second save of the same step is refused before any data is written.
    with pytest.raises(ckpt.CommitConflictError):
        save(f"{s3_root}/7", {"x": b"1"})


def test_discovery(s3_root: str, s3_server: Any) -> None:
    for step in (1, 2, 10):
        save(f"{s3_root}/{step}", {"d": str(step).encode()})
    save(f"{s3_root}/3", {"d": b"3"}, finalize=False)  # in progress
    s3_server.client().put_object(
        Bucket=s3_server.bucket, Key=s3_server.key_of(s3_root) + "/notes/readme", Body=b"x"
    )
    fmt = ckpt.standard_name_format()
    assert sorted(m.step for m in fmt.find_all(s3_root)) == [1, 2, 10]
    assert ckpt.checkpoint_steps(s3_root) == [1, 2, 10]
    assert fmt.find_step(s3_root, 10).path == ckpt.build_step_path(s3_root, fmt, 10)
    with pytest.raises(ValueError):
        fmt.find_step(s3_root, 3)
    assert ckpt.latest_step_metadata(s3_root).step == 10
    assert ckpt.path_state(f"{s3_root}/notes") == ckpt.PathState.UNKNOWN


def test_discovery_is_one_listing(s3_root: str, s3_server: Any) -> None:
    """1,100 committed steps (made with concurrent raw puts): find_all pages through all of
    them with LISTs only, no per-step request."""
    client, bucket, key = s3_server.client(), s3_server.bucket, s3_server.key_of(s3_root)
    n = 1100
    marker = b"Checkpoint commit was successful"

    def put(step: int) -> None:
        client.put_object(Bucket=bucket, Key=f"{key}/{step}/{COMMIT_SUCCESS_FILE}", Body=marker)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(n)))
    backend = ckpt.get_backend(s3_root)
    calls: list[str] = []
    original = backend._call

    async def counting(method: str, **kwargs: Any) -> Any:
        calls.append(method)
        return await original(method, **kwargs)

    backend._call = counting  # type: ignore[method-assign]
    try:
        steps = sorted(m.step for m in ckpt.standard_name_format().find_all(s3_root))
    finally:
        del backend._call
    assert steps == list(range(n))
    assert set(calls) == {"list_objects_v2"}
    assert len(calls) == 2  # ceil(1100 / 1000) pages
    assert ckpt.checkpoint_steps(s3_root) == list(range(n))
    assert len(_sync.run(backend.list_dir(backend.path(s3_root)))) == n
    # remove_tree deletes more than one DeleteObjects batch (1,000 keys each).
    _sync.run(backend.remove_tree(backend.path(s3_root)))
    assert s3_server.keys(key) == []
    assert s3_server.children(key + "/") == set()
    assert ckpt.checkpoint_steps(s3_root) == []


def test_cleanup_temporaries(s3_root: str, s3_server: Any) -> None:
    client, bucket, key = s3_server.client(), s3_server.bucket, s3_server.key_of(s3_root)
    committed = save(f"{s3_root}/1", {"a": b"1"})
    abandoned = save(f"{s3_root}/2", {"a": b"2"}, finalize=False)
    orphan = save(f"{s3_root}/3", {"a": b"3"}, finalize=False)
    # An interrupted large upload inside the abandoned writer dir.
    upload_key = f"{key}/{WRITERS_DIR}/{abandoned.get().name}/arrays/0/c/0"
    upload = client.create_multipart_upload(Bucket=bucket, Key=upload_key)
    client.upload_part(
        Bucket=bucket, Key=upload_key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 64
    )
    # An unknown directory (no evidence either way) is never touched. (With
    # names_decide_commit a step-named foreign prefix would count as a step: not used here.)
    client.put_object(Bucket=bucket, Key=f"{key}/notes/data", Body=b"foreign")

    temps = {str(t.get()) for t in ckpt.all_temporary_paths(s3_root)}
    assert temps == {str(abandoned.get()), str(orphan.get())}
    removed = {str(p) for p in ckpt.cleanup_temporary_paths(s3_root)}
    assert removed == temps
    assert s3_server.children(key + "/") == {"1", WRITERS_DIR, "notes"}
    assert s3_server.children(f"{key}/{WRITERS_DIR}/") == {committed.get().name}
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=key + "/").get("Uploads", [])
    assert uploads == []
    assert ckpt.checkpoint_steps(s3_root) == [1]


def test_delete_checkpoint_leaves_nothing(s3_root: str, s3_server: Any) -> None:
    key = s3_server.key_of(s3_root)
    tmp = save(f"{s3_root}/4", {"a": b"1", "sub/b": b"2"})
    save(f"{s3_root}/5", {"a": b"1"})
    _sync.run(ckpt.delete_checkpoint(tmp.backend, tmp.get_final()))
    assert ckpt.checkpoint_steps(s3_root) == [5]
    assert not any(n.startswith("4") for n in s3_server.children(key + "/"))
    assert not any(n.startswith("4") for n in s3_server.children(f"{key}/{WRITERS_DIR}/"))
    assert not any("/4" in k for k in s3_server.keys(key))


# -- racing writers -------------------------------------------------------------------------


def _check_round(s3_root: str, s3_server: Any, step: int, results: dict[int, Any]) -> None:
    """Exactly one winner; losers got CommitConflictError and their files are gone; the
    committed checkpoint holds exactly the winner's files."""
    winners = [w for w, r in results.items() if r == "won"]
    assert len(winners) == 1, f"step {step}: {results}"
    winner = winners[0]
    for w, r in results.items():
        if w != winner:
            assert r == "conflict", f"step {step}: writer {w}: {r}"
    backend = ckpt.get_backend(s3_root)
    final = backend.path(f"{s3_root}/{step}")
    content = _sync.run(ckpt.content_path(backend, final))
    assert _sync.run(backend.read_bytes(content / "data.bin")) == f"writer {winner}".encode()
    assert _sync.run(backend.read_bytes(content / "sub" / "more.bin")) == bytes([winner]) * 100
    key = s3_server.key_of(s3_root)
    writer_dirs = {
        n for n in s3_server.children(f"{key}/{WRITERS_DIR}/") if n.startswith(f"{step}.")
    }
    assert writer_dirs == {content.name}, f"step {step}: loser writer dirs left: {writer_dirs}"


def test_racing_writer_threads(s3_root: str, s3_server: Any) -> None:
    writers, rounds = 3, 20
    barrier = threading.Barrier(writers)

    def writer(w: int, step: int) -> str:
        tmp = commit_file().from_final(f"{s3_root}/{step}")
        _sync.run(tmp.create())
        _sync.run(tmp.backend.write_bytes(tmp.get() / "data.bin", f"writer {w}".encode()))
        _sync.run(tmp.backend.write_bytes(tmp.get() / "sub" / "more.bin", bytes([w]) * 100))
        barrier.wait(timeout=60)
        try:
            _sync.run(tmp.finalize())
            return "won"
        except ckpt.CommitConflictError:
            return "conflict"

    with ThreadPoolExecutor(writers) as pool:
        for step in range(rounds):
            futures = {w: pool.submit(writer, w, step) for w in range(writers)}
            results = {w: f.result(timeout=120) for w, f in futures.items()}
            _check_round(s3_root, s3_server, step, results)
    assert ckpt.checkpoint_steps(s3_root) == list(range(rounds))
    assert ckpt.all_temporary_paths(s3_root) == []


def test_racing_writer_processes(s3_root: str, s3_server: Any) -> None:
    """Separate processes (separate clients and connections) racing on a shared clock."""
    writers, rounds, period = 3, 10, 0.3
    start = time.time() + 2.5  # leaves time for the interpreters to import ckpt and s3fs
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "race_writer.py"),
                s3_root,
                str(w),
                str(rounds),
                repr(start),
                repr(period),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for w in range(writers)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    results: dict[int, dict[int, str]] = {}
    for out in outputs:
        for line in out.splitlines():
            record = json.loads(line)
            results.setdefault(record["step"], {})[record["writer"]] = record["result"]
    assert sorted(results) == list(range(rounds))
    for step, per_writer in sorted(results.items()):
        assert len(per_writer) == writers
        _check_round(s3_root, s3_server, step, per_writer)
    assert ckpt.checkpoint_steps(s3_root) == list(range(rounds))
