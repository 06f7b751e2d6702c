"""Flat bucket: the commit_file cycle, and conflict detection by ``ifGenerationMatch=0``."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from upath import UPath

import ckpt
from ckpt import COMMIT_SUCCESS_FILE, METADATA_FILE
from ckpt.committed import content_path
from ckpt_backend_gcs import GCSBucketBackend, split_path
from ckpt_strategies.commit_file import WRITERS_DIR, committed_writer


def _key(path: UPath) -> str:
    bucket, key = split_path(path)
    return f"{bucket}/{key}"


def _upload(base_url: str, bucket: str, name: str, data: bytes, *, kind: str) -> int:
    """One raw JSON API upload with ``ifGenerationMatch=0``; the HTTP status."""
    url = f"{base_url}/upload/storage/v1/b/{bucket}/o"
    query = {"ifGenerationMatch": "0"}
    if kind == "multipart":
        query["uploadType"] = "multipart"
        meta = json.dumps({"name": name}).encode()
        body = (
            b"--BOUNDARY\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            + meta
            + b"\r\n--BOUNDARY\r\nContent-Type: application/octet-stream\r\n\r\n"
            + data
            + b"\r\n--BOUNDARY--\r\n"
        )
        headers = {"Content-Type": 'multipart/related; boundary="BOUNDARY"'}
    else:
        query.update(uploadType="media", name=name)
        body, headers = data, {"Content-Type": "application/octet-stream"}
    request = urllib.request.Request(
        f"{url}?{urllib.parse.urlencode(query)}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_emulator_rejects_second_conditional_marker_write(fake_gcs, flat_root: UPath) -> None:
    """What the backend's conflict detection rests on: the emulator enforces
    ``ifGenerationMatch=0`` on multipart uploads (the kind gcsfs sends for small objects)."""
    bucket, key = split_path(flat_root / COMMIT_SUCCESS_FILE)
    assert _upload(fake_gcs.url, bucket, key, b"one", kind="multipart") == 200
    assert _upload(fake_gcs.url, bucket, key, b"two", kind="multipart") == 412


def test_emulator_ignores_precondition_on_media_uploads(fake_gcs, flat_root: UPath) -> None:
    """The emulator limit the backend works around (real GCS enforces both): a marker
    written with uploadType=media would never conflict here."""
    bucket, key = split_path(flat_root / "media")
    assert _upload(fake_gcs.url, bucket, key, b"one", kind="media") == 200
    assert _upload(fake_gcs.url, bucket, key, b"two", kind="media") == 200


def _write_files(run, backend: GCSBucketBackend, directory: UPath, tag: str) -> None:
    run(backend.write_bytes(directory / "data.bin", tag.encode()))
    run(backend.write_bytes(directory / "sub" / "more.bin", tag.encode() * 2))


def test_commit_file_cycle(flat: GCSBucketBackend, flat_root: UPath, raw_fs, run) -> None:
    strategy = ckpt.get_strategy("commit_file")
    final = flat_root / "step_1"
    tmp = strategy.from_final(final, backend=flat)
    assert tmp.backend is flat
    run(tmp.create())
    _write_files(run, flat, tmp.get(), "w")
    run(strategy.validate(tmp.get(), backend=flat))
    assert not run(strategy.is_finalized(flat, final))
    # nothing under the final name before the marker
    assert not raw_fs.exists(_key(final))
    run(tmp.finalize())
    assert raw_fs.exists(_key(final / COMMIT_SUCCESS_FILE))
    run(strategy.validate_final(final, backend=flat))
    assert run(strategy.is_finalized(flat, final))
    assert run(committed_writer(flat, final)) == tmp.get().name
    where = run(content_path(flat, final))
    assert run(flat.read_bytes(where / "data.bin")) == b"w"
    assert run(flat.read_bytes(where / METADATA_FILE))
    entries = run(flat.list_dir(flat_root))
    assert run(strategy.finalized_names(flat, flat_root, entries)) == ["step_1"]


def test_two_committers_exactly_one_wins(
    flat: GCSBucketBackend, flat_root: UPath, raw_fs, run
) -> None:
    strategy = ckpt.get_strategy("commit_file")
    final = flat_root / "step_7"
    a = strategy.from_final(final, backend=flat)
    b = strategy.from_final(final, backend=flat)
    assert a.get() != b.get()
    for writer, tag in ((a, "a"), (b, "b")):
        run(writer.create())
        _write_files(run, flat, writer.get(), tag)
    run(a.finalize())
    with pytest.raises(ckpt.CommitConflictError):
        run(b.finalize())
    assert run(committed_writer(flat, final)) == a.get().name
    assert not raw_fs.exists(_key(b.get()))  # the loser removed its own files
    assert raw_fs.cat_file(_key(a.get() / "data.bin")) == b"a"  # the winner's are intact


def test_racing_committers(flat: GCSBucketBackend, flat_root: UPath, run) -> None:
    """Eight writers finalize the same step at once: one commit, seven conflicts."""
    strategy = ckpt.get_strategy("commit_file")
    final = flat_root / "step_3"
    writers = [strategy.from_final(final, backend=flat) for _ in range(8)]
    for i, writer in enumerate(writers):
        run(writer.create())
        run(flat.write_bytes(writer.get() / "data.bin", str(i).encode()))

    async def race() -> list[BaseException | None]:
        return await asyncio.gather(*(w.finalize() for w in writers), return_exceptions=True)

    results = run(race())
    winners = [w for w, r in zip(writers, results, strict=True) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, ckpt.CommitConflictError) for r in results if r is not None)
    assert run(committed_writer(flat, final)) == winners[0].get().name
    names = {e.name for e in run(flat.list_dir(flat_root))}
    assert names == {"step_3", WRITERS_DIR}
    writers_left = {e.name for e in run(flat.list_dir(flat_root / WRITERS_DIR))}
    assert writers_left == {winners[0].get().name}


def test_create_refuses_a_committed_step(flat: GCSBucketBackend, flat_root: UPath, run) -> None:
    strategy = ckpt.get_strategy("commit_file")
    final = flat_root / "step_2"
    first = strategy.from_final(final, backend=flat)
    run(first.create())
    run(first.finalize())
    with pytest.raises(ckpt.CommitConflictError):
        run(strategy.from_final(final, backend=flat).create())


def test_orbax_style_checkpoint_is_read(flat: GCSBucketBackend, flat_root: UPath, raw_fs, run):
    """Orbax writes commit-file checkpoints to gs:// with the files in the final directory;
    names_decide_commit is False so an unmarked Orbax directory is not taken as committed."""
    strategy = ckpt.get_strategy("commit_file")
    raw_fs.pipe_file(_key(flat_root / "5" / "data"), b"x")
    raw_fs.pipe_file(_key(flat_root / "5" / COMMIT_SUCCESS_FILE), b"Checkpoint commit was ...")
    raw_fs.pipe_file(_key(flat_root / "6" / "data"), b"in progress, no marker")
    entries = run(flat.list_dir(flat_root))
    assert run(strategy.finalized_names(flat, flat_root, entries)) == ["5"]
    assert run(content_path(flat, flat_root / "5")) == flat_root / "5"


def test_rename_dir_is_not_offered(flat: GCSBucketBackend, flat_root: UPath, run) -> None:
    with pytest.raises(NotImplementedError, match="flat bucket"):
        run(flat.rename_dir(flat_root / "a", flat_root / "b"))
