"""The ``snapshot`` strategy (issue 11): in-place and empty snapshots, the copy primitive,
the integrity manifest after a change, and SIGKILL at each step of the replace."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from upath import UPath

import ckpt
from ckpt.backend_registry import get_backend
from ckpt.errors import UnsupportedStrategyError
from ckpt.manifest import MANIFEST_FILE, crc32c
from ckpt.registry import resolve
from ckpt_strategies.commit_file import CommitFileTemporaryPath
from ckpt_strategies.snapshot import SnapshotTemporaryPath, SnapshotType


def _v(path: Path) -> int:
    return int(ckpt.Checkpointer().restore(path)["v"])


def _manifest_matches_files(directory: Path) -> None:
    """The manifest lists exactly the files present (but itself and the marker), each with
    its true size and CRC32C."""
    doc = json.loads((directory / MANIFEST_FILE).read_bytes())
    found = {}
    for dirpath, _dirs, files in os.walk(directory):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(directory).as_posix()
            if rel in (MANIFEST_FILE, "commit_success.txt"):
                continue
            data = full.read_bytes()
            found[rel] = [len(data), crc32c(data)]
    assert doc["files"] == found


def test_in_place_snapshot_publishes_the_changed_copy(tmp_path: Path) -> None:
    final = tmp_path / "1"
    ckpt.Checkpointer().save(final, {"v": np.int64(1), "w": np.arange(100)})
    (final / "notes.txt").write_text("old notes")  # a foreign file, rewritten below
    (final / "gone.txt").write_text("removed by the change")

    async def change() -> SnapshotTemporaryPath:
        tmp = SnapshotTemporaryPath.from_final(final, snapshot_type=SnapshotType.IN_PLACE)
        where = Path((await tmp.create()).path)
        # The copy holds everything of the committed checkpoint but its commit files.
        assert (where / "notes.txt").read_text() == "old notes"
        assert not (where / "commit_success.txt").exists()
        assert not (where / MANIFEST_FILE).exists()
        (where / "notes.txt").write_text("new notes")  # same size: must be declared
        tmp.mark_changed("notes.txt")
        (where / "gone.txt").unlink()
        (where / "added.bin").write_bytes(b"\x01" * 4097)
        assert (final / "notes.txt").read_text() == "old notes"  # the source is untouched
        await tmp.finalize()
        return tmp

    tmp = asyncio.run(change())
    assert tmp.copy_method in ("clone", "copy")
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert (final / "notes.txt").read_text() == "new notes"
    assert not (final / "gone.txt").exists()
    _manifest_matches_files(final)
    assert _v(final) == 1  # restore checks every file against the manifest
    assert ckpt.Checkpointer().restore(final)["w"].tolist() == list(range(100))


def test_undeclared_same_size_rewrite_is_caught_by_restore(tmp_path: Path) -> None:
    """The documented limit: a same-size rewrite not declared keeps the copied record, and
    the restore-time check then reports the file (never a silent wrong read)."""
    final = tmp_path / "1"
    ckpt.Checkpointer().save(final, {"v": np.int64(1)})

    async def change() -> None:
        tmp = SnapshotTemporaryPath.from_final(final, snapshot_type=SnapshotType.IN_PLACE)
        where = Path((await tmp.create()).path)
        tree = where / "_TREE.json"
        data = tree.read_bytes()
        tree.write_bytes(data.replace(b"{", b" ", 1) if data.startswith(b"{") else data[::-1])
        await tmp.finalize()

    asyncio.run(change())
    with pytest.raises(ckpt.errors.CorruptCheckpointError):
        ckpt.Checkpointer().restore(final)


def test_checkpointer_saves_through_snapshot_as_rename(tmp_path: Path) -> None:
    """Without a snapshot type (the registry's Checkpointer path), saves are rename's."""
    final = tmp_path / "1"
    ckpt.Checkpointer("snapshot").save(final, {"v": np.int64(1)})
    ckpt.Checkpointer("snapshot").save(final, {"v": np.int64(2)}, force=True)
    assert _v(final) == 2
    assert sorted(os.listdir(tmp_path)) == ["1"]
    _manifest_matches_files(final)


def test_checkpoint_without_manifest_gets_one_rebuilt_from_bytes(tmp_path: Path) -> None:
    final = tmp_path / "1"
    ckpt.Checkpointer().save(final, {"v": np.int64(3)})
    (final / MANIFEST_FILE).unlink()

    async def change() -> None:
        tmp = SnapshotTemporaryPath.from_final(final, snapshot_type=SnapshotType.IN_PLACE)
        await tmp.create()
        await tmp.finalize()

    asyncio.run(change())
    _manifest_matches_files(final)
    assert _v(final) == 3


def test_empty_snapshot_is_published_as_a_pending_directory(tmp_path: Path) -> None:
    source = tmp_path / "1"
    ckpt.Checkpointer().save(source, {"v": np.int64(1)})

    async def add() -> SnapshotTemporaryPath:
        tmp = SnapshotTemporaryPath.from_final(source, snapshot_type=SnapshotType.EMPTY)
        where = Path((await tmp.create()).path)
        assert sorted(os.listdir(where)) == ["_CHECKPOINT_METADATA"]
        (where / "data.bin").write_bytes(b"abc")
        await tmp.finalize()
        return tmp

    tmp = asyncio.run(add())
    assert tmp.published is not None and tmp.published.parent.path == str(source)
    pending = Path(tmp.published.path)
    assert pending.name.startswith("piece-")
    assert (pending / "data.bin").read_bytes() == b"abc"
    _manifest_matches_files(pending)
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert _v(source) == 1


def test_empty_snapshot_needs_its_source(tmp_path: Path) -> None:
    tmp = SnapshotTemporaryPath.from_final(tmp_path / "nope", snapshot_type="empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        asyncio.run(tmp.create())
    assert not list(tmp_path.iterdir())


def test_commit_file_refuses_snapshots_with_orbax_error(tmp_path: Path) -> None:
    for make in (CommitFileTemporaryPath.from_final, CommitFileTemporaryPath.from_temporary):
        with pytest.raises(ValueError, match=r"^Snapshot is not supported for "):
            make(tmp_path / "1", snapshot_type=SnapshotType.IN_PLACE)


def test_object_store_refuses_with_what_works() -> None:
    with pytest.raises(UnsupportedStrategyError) as info:
        resolve(UPath("s3://bucket/ckpts"), "snapshot")
    message = str(info.value)
    assert "atomic_dir_rename" in message and "commit_file" in message


# -- the copy primitive ----------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("method", ["clone", "copy", "read_write"])
def test_local_copy_tree_methods(tmp_path: Path, method: str) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "x").write_bytes(os.urandom(70_000))
    (src / "a" / "b" / "y").write_bytes(b"")
    (src / "link").symlink_to(src / "x")
    backend = get_backend(UPath(tmp_path))
    used = asyncio.run(
        backend.copy_tree(UPath(str(src)), UPath(str(tmp_path / "dst")), method=method)
    )
    expected = _tree(src)
    del expected["link"]
    assert _tree(tmp_path / "dst") == expected
    assert not (tmp_path / "dst" / "link").exists()  # links are never copied
    if method == "clone":
        # This filesystem (ext4/tmpfs in CI) has no reflinks: a real fallback to a copy.
        assert used in ("clone", "copy")
    else:
        assert used == method


def _reflink_dir(tmp_path: Path) -> Path | None:
    """A directory on a reflink-capable filesystem (XFS with reflink=1 on a loop device),
    or None if this machine cannot make one."""
    mkfs = shutil.which("mkfs.xfs")
    if mkfs is None or os.geteuid() != 0:
        return None
    image, mount = tmp_path / "xfs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(512 * 1024 * 1024)
    mount.mkdir()
    if subprocess.run([mkfs, "-q", "-m", "reflink=1", str(image)]).returncode != 0:
        return None
    if subprocess.run(["mount", "-o", "loop", str(image), str(mount)]).returncode != 0:
        return None
    return mount


def test_ficlone_on_a_reflink_filesystem(tmp_path: Path) -> None:
    mount = _reflink_dir(tmp_path)
    if mount is None:
        pytest.skip(
            "no reflink-capable filesystem can be made here: needs root, mkfs.xfs (xfsprogs) "
            "and a loop mount"
        )
    try:
        (mount / "src").mkdir()
        (mount / "src" / "x").write_bytes(os.urandom(1 << 20))
        backend = get_backend(UPath(str(mount)))
        used = asyncio.run(
            backend.copy_tree(UPath(str(mount / "src")), UPath(str(mount / "dst")))
        )
        assert used == "clone"
        assert _tree(mount / "dst") == _tree(mount / "src")
    finally:
        subprocess.run(["umount", str(mount)])


# -- SIGKILL at each step of the replace --------------------------------------------------

_KILL = """
import os, signal, sys
import numpy as np
import ckpt, ckpt_backend_local
final, step = sys.argv[1], sys.argv[2]
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
def wrap(name, before=lambda *a: False, after=lambda *a: False):
    real = getattr(ckpt_backend_local, name)
    def call(*args):
        if before(*args):
            kill()
        result = real(*args)
        if after(*args):
            kill()
        return result
    setattr(ckpt_backend_local, name, call)
if step.startswith("two_renames"):
    def refuse(a, b):
        raise NotImplementedError
    ckpt_backend_local.exchange = refuse
if step == "copied":
    wrap("_copy_tree", after=lambda *a: True)
elif step == "written":
    wrap("_fsync_tree", after=lambda *a: True)
elif step == "exchanged":
    wrap("exchange", after=lambda *a: True)
elif step in ("removing_old", "two_renames_removing_old"):
    wrap("_rmtree", before=lambda *a: True)
elif step == "two_renames_aside":
    wrap("rename_noreplace", after=lambda src, dst: ".ckpt-replaced-" in dst)
elif step == "two_renames_in_place":
    wrap("rename_noreplace", after=lambda src, dst: dst == final)
import asyncio
from ckpt_strategies.snapshot import SnapshotTemporaryPath
async def change():
    tmp = SnapshotTemporaryPath.from_final(final, snapshot_type="in_place")
    where = await tmp.create()
    with open(os.path.join(where.path, "changed.txt"), "w") as f:
        f.write("new version")
    await tmp.finalize()
asyncio.run(change())
print("not killed")
"""

STEPS = [
    "copied",
    "written",
    "exchanged",
    "removing_old",
    "two_renames_aside",
    "two_renames_in_place",
    "two_renames_removing_old",
]
#: Which checkpoint each step's crash must leave: before the switch the old, after it the new.
EXPECTED = {
    "copied": "old",
    "written": "old",
    "exchanged": "new",
    "removing_old": "new",
    "two_renames_aside": "old",
    "two_renames_in_place": "new",
    "two_renames_removing_old": "new",
}


def _version(final: Path) -> str:
    """Which checkpoint is at ``final``: it must restore (every file checked against its
    manifest), and the new one is the old one plus ``changed.txt``."""
    assert _v(final) == 1
    _manifest_matches_files(final)
    return "new" if (final / "changed.txt").exists() else "old"


def _kill_at(tmp_path: Path, step: str) -> Path:
    final = tmp_path / "1"
    ckpt.Checkpointer().save(final, {"v": np.int64(1)})
    proc = subprocess.run(
        [sys.executable, "-c", _KILL, str(final), step], capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stdout + proc.stderr
    return final


def _gc(root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ckpt", "gc", str(root)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step_of_replace(tmp_path: Path, step: str) -> None:
    final = _kill_at(tmp_path, step)
    assert _version(final) == EXPECTED[step]  # a restore (the first open) finds exactly one
    _gc(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1"]  # gc left exactly one, no leftovers
    assert _version(final) == EXPECTED[step]


@pytest.mark.parametrize("opener", ["restore", "manager", "gc"])
def test_each_open_repairs_a_crash_between_the_two_renames(tmp_path: Path, opener: str) -> None:
    final = _kill_at(tmp_path, "two_renames_aside")
    assert not final.exists()  # the crash left the old checkpoint aside, nothing in place
    if opener == "restore":
        assert _version(final) == "old"
    elif opener == "manager":
        with ckpt.CheckpointManager(tmp_path) as manager:
            manager.wait_until_finished()
            assert manager.all_steps() == [1]
    else:
        _gc(tmp_path)
    assert final.is_dir()
    assert _version(final) == "old"
    _gc(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1"]
