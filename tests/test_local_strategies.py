"""Strategy behaviour specific to the local POSIX backend: durability order, no-replace
rename, permission modes, crashes in real subprocesses, racing writers."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import _sync
from ckpt_backend_local import _rename


def _events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_link = os.fsync, _rename.rename_noreplace, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        events.append(("rename", dst))
        real_rename(src, dst)

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("create_exclusive", os.fspath(dst)))  # the marker appears complete
        real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr("ckpt_backend_local.rename_noreplace", rename)
    return events


def _save(final: Path, strategy: str, files: dict[str, bytes] | None = None) -> Any:
    tmp = ckpt.get_strategy(strategy).from_final(final)
    _sync.run(tmp.create())
    for name, data in (files or {"a.bin": b"1", "sub/b.bin": b"2"}).items():
        _sync.run(tmp.backend.write_bytes(tmp.get() / name, data))
    _sync.run(tmp.finalize())
    return tmp


def test_rename_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = ckpt.get_strategy("rename").from_final(tmp_path / "1")
    _sync.run(tmp.create())
    _sync.run(tmp.backend.write_bytes(tmp.get() / "sub" / "b.bin", b"2"))
    events = _events(monkeypatch)
    _sync.run(tmp.finalize())
    renamed = events.index(("rename", str(tmp_path / "1")))
    synced_before = {p for e, p in events[:renamed] if e == "fsync"}
    assert str(tmp.get() / "sub" / "b.bin") in synced_before
    assert str(tmp.get() / "sub") in synced_before
    assert str(tmp.get()) in synced_before
    assert str(tmp.get() / ckpt.COMMIT_SUCCESS_FILE) in synced_before
    assert ("fsync", str(tmp_path)) in events[renamed:]  # the parent, after the rename


def test_commit_file_writes_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = ckpt.get_strategy("commit_file").from_final(tmp_path / "1")
    _sync.run(tmp.create())
    _sync.run(tmp.backend.write_bytes(tmp.get() / "b.bin", b"2"))
    events = _events(monkeypatch)
    _sync.run(tmp.finalize())
    marker = str(tmp_path / "1" / ckpt.COMMIT_SUCCESS_FILE)
    at = events.index(("create_exclusive", marker))
    before = {p for e, p in events[:at] if e == "fsync"}
    assert {str(tmp.get() / "b.bin"), str(tmp.get()), str(tmp.get() / ckpt.METADATA_FILE)} <= before
    assert ("fsync", str(tmp_path / "1")) in events[at:]


def test_rename_never_replaces_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "3").mkdir()
    tmp = ckpt.get_strategy("rename").from_final(tmp_path / "3")
    _sync.run(tmp.create())
    with pytest.raises(ckpt.CommitConflictError, match="already exists"):
        _sync.run(tmp.finalize())
    assert list((tmp_path / "3").iterdir()) == []
    assert not tmp.get().exists()


def test_fallback_rename_never_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_rename, "_renameat2", None)
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        _rename.rename_noreplace(str(tmp_path / "src"), str(tmp_path / "dst"))
    _rename.rename_noreplace(str(tmp_path / "src"), str(tmp_path / "new"))
    assert (tmp_path / "new").is_dir()


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
def test_path_permission_mode(tmp_path: Path, strategy: str) -> None:
    old = os.umask(0o077)
    try:
        tmp = ckpt.get_strategy(strategy).from_final(
            tmp_path / "1", file_options=ckpt.FileOptions(path_permission_mode=0o750)
        )
        _sync.run(tmp.create())
        assert stat.S_IMODE(os.stat(tmp.get()).st_mode) == 0o750
    finally:
        os.umask(old)


def test_metadata_timestamps_and_malformed_metadata(tmp_path: Path) -> None:
    tmp = _save(tmp_path / "1", "rename")
    meta = json.loads((tmp_path / "1" / ckpt.METADATA_FILE).read_text())
    assert 0 < meta["init_timestamp_nsecs"] <= meta["commit_timestamp_nsecs"]
    (tmp_path / "1" / ckpt.METADATA_FILE).write_text("{not json")
    from ckpt.step_metadata import read_step_metadata

    with pytest.raises(ValueError, match=str(tmp_path / "1")):
        _sync.run(read_step_metadata(tmp.backend, tmp.get_final()))
    parsed = ckpt.StepMetadata.from_json(b'{"custom_metadata": {"a": 1}, "extra": 2}')
    assert parsed.custom_metadata == {"a": 1, "extra": 2}
    with pytest.raises(ValueError):
        ckpt.StepMetadata.from_json(b'{"init_timestamp_nsecs": "yesterday"}')


def test_read_only_temporary_path(tmp_path: Path) -> None:
    ro = ckpt.ReadOnlyTemporaryPath.from_paths(
        temporary_path=tmp_path / "a.tmp", final_path=tmp_path / "a"
    )
    back = ckpt.ReadOnlyTemporaryPath.from_bytes(ro.to_bytes())
    assert back.get() == ro.get() and back.get_final() == ro.get_final()
    for call in (
        back.create(),
        back.finalize(),
        ckpt.ReadOnlyTemporaryPath.validate(tmp_path),
        ckpt.ReadOnlyTemporaryPath.validate_final(tmp_path),
    ):
        with pytest.raises(NotImplementedError):
            _sync.run(call)
    with pytest.raises(NotImplementedError):
        ckpt.ReadOnlyTemporaryPath.from_final(tmp_path)
    for bad in (b"\x80\x04pickle", b"[]", b'{"temporary_path": 1, "final_path": "x"}'):
        with pytest.raises(ValueError):
            ckpt.ReadOnlyTemporaryPath.from_bytes(bad)


def test_validate_rules(tmp_path: Path) -> None:
    rename = ckpt.get_strategy("rename")
    tmp = rename.from_final(tmp_path / "2")
    with pytest.raises(ckpt.ValidationError, match="directory"):
        _sync.run(rename.validate(tmp.get()))  # not created yet
    _sync.run(tmp.create())
    (tmp.get() / ckpt.COMMIT_SUCCESS_FILE).write_text("x")
    with pytest.raises(ckpt.ValidationError, match=ckpt.COMMIT_SUCCESS_FILE):
        _sync.run(rename.validate(tmp.get()))
    with pytest.raises(ckpt.ValidationError, match="suffix"):
        _sync.run(rename.validate(tmp_path))
    with pytest.raises(ckpt.ValidationError, match="suffix"):
        _sync.run(rename.validate_final(tmp.get()))
    with pytest.raises(ValueError):
        rename.from_final(tmp_path / "x.orbax-checkpoint-tmp")
    # from_temporary cuts at the first suffix (all of Orbax's forms)
    for name in (
        "x.orbax-checkpoint-tmp",
        "x.orbax-checkpoint-tmp-123",
        "x.orbax-checkpoint-tmp-1-2",
    ):
        assert rename.from_temporary(tmp_path / name).get_final() == ckpt.registry.to_path(
            tmp_path / "x"
        )


_CRASH = """
import os, signal, sys
import ckpt
from ckpt import _sync
tmp = ckpt.get_strategy(sys.argv[2]).from_final(sys.argv[1])
_sync.run(tmp.create())
_sync.run(tmp.backend.write_bytes(tmp.get() / "half.bin", b"x" * 1000))
if sys.argv[3] == "before":
    os.kill(os.getpid(), signal.SIGKILL)
orig = tmp.backend.sync_dir
async def die(path):
    os.kill(os.getpid(), signal.SIGKILL)
tmp.backend.sync_tree = die
_sync.run(tmp.finalize())
"""


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
@pytest.mark.parametrize("when", ["before", "during"])
def test_sigkill_never_leaves_a_finalized_checkpoint(
    tmp_path: Path, strategy: str, when: str
) -> None:
    _save(tmp_path / "1", strategy)
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path / "2"), strategy, when])
    assert proc.returncode == -9
    assert ckpt.checkpoint_steps(tmp_path, atomicity=strategy) == [1]
    assert not ckpt.is_path_finalized(tmp_path / "2", atomicity=strategy)
    temps = ckpt.all_temporary_paths(tmp_path)
    assert len(temps) == 1 and (temps[0].get() / "half.bin").exists()
    ckpt.cleanup_temporary_paths(tmp_path)
    assert ckpt.all_temporary_paths(tmp_path) == []
    assert ckpt.checkpoint_steps(tmp_path, atomicity=strategy) == [1]
    assert (tmp_path / "1").is_dir()


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
def test_racing_writers_exactly_one_wins(tmp_path: Path, strategy: str) -> None:
    writers, rounds = 4, 15
    for r in range(rounds):
        final = tmp_path / str(r)
        temps = [ckpt.get_strategy(strategy).from_final(final) for _ in range(writers)]
        for i, t in enumerate(temps):
            _sync.run(t.create())
            _sync.run(t.backend.write_bytes(t.get() / "who", str(i).encode()))
        outcomes: list[Any] = [None] * writers
        barrier = threading.Barrier(writers)

        def commit(
            i: int, barrier: Any = barrier, temps: Any = temps, outcomes: Any = outcomes
        ) -> None:
            barrier.wait()
            try:
                _sync.run(temps[i].finalize())
                outcomes[i] = "won"
            except ckpt.CommitConflictError:
                outcomes[i] = "lost"

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(writers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert outcomes.count("won") == 1, outcomes
        winner = outcomes.index("won")
        content = _sync.run(ckpt.content_path(temps[0].backend, ckpt.registry.to_path(final)))
        assert (Path(content.path) / "who").read_bytes() == str(winner).encode()
        assert ckpt.all_temporary_paths(tmp_path) == []


def test_cleanup_spares_writers_started_later(tmp_path: Path) -> None:
    import time

    old = ckpt.get_strategy("rename").from_final(tmp_path / "1")
    _sync.run(old.create())
    cutoff = time.time_ns()
    new = ckpt.get_strategy("commit_file").from_final(tmp_path / "2")
    _sync.run(new.create())
    orbax_style = tmp_path / "3.orbax-checkpoint-tmp"
    orbax_style.mkdir()
    removed = ckpt.cleanup_temporary_paths(tmp_path, created_before_ns=cutoff)
    assert sorted(p.name for p in removed) == sorted([old.get().name, orbax_style.name])
    assert new.get().exists()
