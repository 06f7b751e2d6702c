"""Storage errors reach the caller as the standard Python exceptions, with errno, path and
backend in the message; old checkpoints stay intact, the failed temporary is removed and
the next save works. On real filesystems: a small tmpfs and a read-only bind mount, mounted
by the test (CI runs as root); skipped, with the reason, where mounting is impossible."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import tree_format, tree_snapshot, tree_write


def _mount(args: list[str]) -> str | None:
    """Run mount; the reason it failed, or None."""
    if os.geteuid() != 0:
        return "mounting a file system needs root (CI runs the tests as root)"
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount {' '.join(args)} failed: {proc.stderr}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    why = _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)])
    if why:
        pytest.skip(why)
    yield mnt
    _umount(mnt)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``(writable, read-only view)``: a directory and a read-only bind mount of it."""
    src = tmp_path / "src"
    src.mkdir()
    mnt = tmp_path / "ro"
    mnt.mkdir()
    why = _mount(["--bind", str(src), str(mnt)])
    if why:
        pytest.skip(why)
    why = _mount(["-o", "remount,bind,ro", str(mnt)])
    if why:
        _umount(mnt)
        pytest.skip(why)
    yield src, mnt
    _umount(mnt)


BIG = {"w": np.ones(600_000)}  # 4.8 MB: does not fit in 2 MiB
SMALL = {"w": np.arange(3.0)}


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("kind", ["sync", "async", "manager"])
def test_no_space_is_oserror_enospc_and_the_next_save_works(tiny_fs: Path, kind: str) -> None:
    ckptr = ckpt.Checkpointer()
    ckptr.save(tiny_fs / "0", SMALL)
    with pytest.raises(OSError) as info:
        if kind == "sync":
            ckptr.save(tiny_fs / "1", BIG)
        elif kind == "async":
            with ckpt.AsyncCheckpointer() as actr:
                actr.save(tiny_fs / "1", BIG)
        else:
            with ckpt.CheckpointManager(tiny_fs) as mngr:
                mngr.save(1, BIG)
    err = info.value
    assert err.errno == errno.ENOSPC
    assert "No space left on device" in str(err)
    assert "local filesystem" in str(err) and str(tiny_fs / "1") in str(err)
    assert "free space" in str(err).lower()
    # The old checkpoint is intact, the failed temporary is gone, the next save works.
    assert _names(tiny_fs) == ["0"]
    assert ckptr.restore(tiny_fs / "0")["w"].tolist() == [0.0, 1.0, 2.0]
    ckptr.save(tiny_fs / "2", SMALL)
    assert _names(tiny_fs) == ["0", "2"]


@pytest.mark.parametrize("kind", ["sync", "async", "manager"])
def test_read_only_file_system_is_oserror_erofs(read_only: tuple[Path, Path], kind: str) -> None:
    src, ro = read_only
    ckpt.Checkpointer().save(src / "0", SMALL)
    with pytest.raises(OSError) as info:
        if kind == "sync":
            ckpt.Checkpointer().save(ro / "1", SMALL)
        elif kind == "async":
            with ckpt.AsyncCheckpointer() as actr:
                actr.save(ro / "1", SMALL)
        else:
            with ckpt.CheckpointManager(ro, cleanup_tmp_directories=False) as mngr:
                mngr.save(1, SMALL)
    assert info.value.errno == errno.EROFS
    assert "Read-only file system" in str(info.value)
    assert "local filesystem" in str(info.value) and str(ro) in str(info.value)
    assert _names(src) == ["0"]
    # Reading from the read-only view still works.
    assert ckpt.Checkpointer().restore(ro / "0")["w"].tolist() == [0.0, 1.0, 2.0]


def test_tensorstore_write_errors_are_translated(read_only: tuple[Path, Path]) -> None:
    # The array I/O itself (tensorstore, not ckpt's own calls) hits the read-only file
    # system: the directory exists, so only tensorstore's writes fail.
    import asyncio

    from ckpt._storage_errors import translate

    src, ro = read_only
    (src / "x").mkdir()
    backend = ckpt.get_backend(str(ro))
    # ckpt writes zarr.json itself (an OSError already); tensorstore writes the chunks.
    with pytest.raises((ValueError, OSError)) as raw:
        asyncio.run(
            tree_write.write(backend, ckpt.paths.to_path(ro / "x"), tree_snapshot.prepare(SMALL))
        )
    err = translate(raw.value, action="Saving", path=ro / "x", backend=backend)
    assert isinstance(err, OSError) and err.errno == errno.EROFS, raw.value
    assert err.__cause__ is raw.value
    assert "local filesystem" in str(err) and str(ro / "x") in str(err)


def test_missing_array_file_on_restore_is_filenotfounderror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", -1)  # zarr arrays only
    ckpt.Checkpointer().save(tmp_path / "0", SMALL)
    (tmp_path / "0" / "arrays" / "0" / "zarr.json").unlink()
    # A file the save recorded in its manifest: the checkpoint is corrupt.
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"zarr\.json: missing"):
        ckpt.Checkpointer().restore(tmp_path / "0")
    # Without a manifest (saved before manifests) tensorstore's error is translated.
    doc = json.loads((tmp_path / "0" / "_TREE.json").read_text())
    del doc["manifest"]
    (tmp_path / "0" / "_TREE.json").write_text(json.dumps(doc))
    (tmp_path / "0" / ckpt.MANIFEST_FILE).unlink()
    with pytest.raises(FileNotFoundError) as info:
        ckpt.Checkpointer().restore(tmp_path / "0")
    assert info.value.errno == errno.ENOENT
    assert "local filesystem" in str(info.value) and str(tmp_path / "0") in str(info.value)


def test_permission_denied_is_permissionerror(tmp_path: Path) -> None:
    """Root ignores permissions: the save runs in a subprocess without the capabilities
    that let root bypass them (setpriv)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (to drop the capabilities that bypass permissions)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    base = tmp_path / "perm"
    ckpt.Checkpointer().save(base / "0", SMALL)
    os.chmod(base, 0o555)
    code = textwrap.dedent(
        f"""
        import errno, numpy as np, ckpt
        for cls in (ckpt.Checkpointer, ckpt.AsyncCheckpointer):
            try:
                with cls() as c:
                    c.save({str(base / "1")!r}, {{"w": np.ones(3)}})
            except PermissionError as e:
                assert e.errno == errno.EACCES, e
                print("PermissionError:", e)
        """
    )
    try:
        proc = subprocess.run(
            [
                setpriv,
                "--bounding-set",
                "-dac_override,-dac_read_search,-fowner",
                sys.executable,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.chmod(base, 0o755)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("PermissionError:") == 2, proc.stdout
    assert "local filesystem" in proc.stdout and str(base / "1") in proc.stdout
    assert "permissions" in proc.stdout
    assert _names(base) == ["0"]


def test_message_names_each_path_once(read_only: tuple[Path, Path]) -> None:
    src, ro = read_only
    (src / "run").mkdir()  # the step's parent exists: the temporary's mkdir fails
    with pytest.raises(OSError) as info:
        ckpt.Checkpointer("rename").save(ro / "run" / "5", SMALL)
    err = info.value
    assert err.errno == errno.EROFS and isinstance(err.filename, str)
    message = str(err)
    assert message.count(err.filename) == 1, message
    assert message.count(str(ro / "run" / "5")) == 2, message  # the step; in the file name
    assert "read-only" in message and "local filesystem" in message


def test_corrupt_manifest_message_has_no_double_period(tmp_path: Path) -> None:
    ckpt.Checkpointer().save(tmp_path / "1", SMALL)
    (tmp_path / "1" / ckpt.MANIFEST_FILE).write_bytes(b"not json")
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        ckpt.Checkpointer().restore(tmp_path / "1")
    message = str(info.value)
    assert ".." not in message.replace(str(tmp_path), ""), message
    assert "Restore from another step" in message
