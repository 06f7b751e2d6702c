"""Real file system faults during a save, array I/O included, at every point: a tmpfs that
fills up at a different byte of the save each round, and a tmpfs remounted read-only at
each storage call k of a save (the arrays, written by tensorstore between those calls, are
hit too). After each fault: the step is committed and restores exactly, or is invisible;
the step committed before is intact; cleanup removes the leftovers; the next save works.
Mounting needs root (CI runs as root); elsewhere these tests are skipped, with the reason.

Removed permissions: write permission is taken away from every directory of the root at
each storage call k of a save. Root ignores permission bits, so that sweep runs in a
subprocess started by ``setpriv`` without the capabilities that bypass them
(``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``, ``CAP_FOWNER``); it is still the owner of
the files, so it can take the permission away and give it back itself."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckpt
from ckpt_conformance.instrumented import InstrumentedBackend

STRATEGIES = ["rename", "commit_file"]


def _mount(args: list[str]) -> str | None:
    if os.geteuid() != 0:
        return "mounting a file system needs root (CI runs the tests as root)"
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount {' '.join(args)} failed: {proc.stderr}"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    why = _mount(["-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)])
    if why:
        pytest.skip(why)
    yield mnt
    subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=False, capture_output=True)
    subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def _tree(seed: int) -> dict[str, Any]:
    return {f"a{i}": np.full((64, 64), seed * 10 + i, np.float64) for i in range(6)}  # 6x32 KB


def _big_tree(seed: int) -> dict[str, Any]:
    """:func:`_tree` plus a 1.25 MiB array: over the packing limit, written by tensorstore."""
    return {**_tree(seed), "big": np.full((640, 256), seed, np.float64)}


def _same(a: Any, b: Any) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _check_and_recover(
    root: Path, strategy: str, step: int, saved: bool, where: str, tree: Any = _tree
) -> bool:
    """The invariants after a fault (steps saved with ``tree(step)``); return whether
    ``step`` was committed."""
    plain = ckpt.Checkpointer(strategy, verify_checksums=True)
    steps = ckpt.checkpoint_steps(root, atomicity=strategy)
    assert 0 in steps and _same(plain.restore(root / "0"), tree(0)), f"{where}: step 0"
    committed = step in steps
    if committed:
        assert _same(plain.restore(root / str(step)), tree(step)), f"{where}: torn"
    assert committed or not saved, f"{where}: save reported success, step not committed"
    ckpt.cleanup_temporary_paths(root, atomicity=strategy)
    assert ckpt.all_temporary_paths(root, atomicity=strategy) == [], where
    if not committed:
        plain.save(root / str(step), tree(step))
        assert _same(plain.restore(root / str(step)), tree(step)), f"{where}: next save"
    return committed


def _drop_new_steps(root: Path, strategy: str) -> None:
    """Delete every step but 0, so the small file system has room for the next round."""
    backend = ckpt.get_backend(root)
    for step in ckpt.checkpoint_steps(root, atomicity=strategy):
        if step != 0:
            asyncio.run(ckpt.delete_checkpoint(backend, root / str(step), atomicity=strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_disk_full_at_every_point_of_a_save(tmpfs: Path, strategy: str) -> None:
    root = tmpfs / "root"
    ckpt.Checkpointer(strategy).save(root / "0", _tree(0))
    filler = tmpfs / "filler"
    outcomes = []
    for i, free_kib in enumerate(range(0, 320, 16)):
        step = i + 1
        avail = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
        filler.write_bytes(b"\0" * max(avail - free_kib * 1024, 0))
        saved = True
        try:
            ckpt.Checkpointer(strategy).save(root / str(step), _tree(step))
        except OSError:
            saved = False
        filler.unlink()
        where = f"{free_kib} KiB free, saved={saved}"
        outcomes.append(_check_and_recover(root, strategy, step, saved, where))
        _drop_new_steps(root, strategy)
    assert False in outcomes and True in outcomes, "the sweep must fail some saves, not all"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_read_only_remount_at_every_call_of_a_save(tmpfs: Path, strategy: str) -> None:
    root = tmpfs / "root"
    ckpt.Checkpointer(strategy).save(root / "0", _tree(0))
    inner = ckpt.get_backend(root)

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(tmpfs)], check=True)

    class RemountAtCall(InstrumentedBackend):
        k = 0

        async def hook(self, op: str, path: Any) -> None:
            await super().hook(op, path)
            if self.call_count == self.k:
                remount("ro")

    counting = RemountAtCall(inner)
    ckpt.Checkpointer(strategy, backend=counting).save(root / "1", _tree(1))
    n = counting.call_count
    _drop_new_steps(root, strategy)
    assert n > 5
    failed = 0
    for k in range(1, n + 1):
        step = k + 1
        fb = RemountAtCall(inner)
        fb.k = k
        saved = True
        try:
            ckpt.Checkpointer(strategy, backend=fb).save(root / str(step), _tree(step))
        except OSError:
            saved = False
            failed += 1
        remount("rw")
        _check_and_recover(root, strategy, step, saved, f"read-only at call {k} of {n}")
        _drop_new_steps(root, strategy)
    assert failed >= n // 2, f"only {failed} of {n} saves failed on a read-only file system"


def _set_writable(root: Path, writable: bool) -> None:
    """Give (0o755) or take away (0o555) write permission on every directory of ``root``."""
    mode = 0o755 if writable else 0o555
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, mode)


def permission_sweep(root: Path, strategy: str) -> list[dict[str, Any]]:
    """Save ``_big_tree(step)`` n + 1 times (n: the storage calls of a save), taking write
    permission away from every directory of ``root`` before the save (k = 0) or once call k
    has taken effect, so that every write after it is refused: ckpt's own calls and
    tensorstore's array writes between them. Give it back, check the invariants, clean up.
    Run without the capabilities that bypass permissions. Returns what each save did."""
    probe = root.parent / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").write_bytes(b"")
        raise AssertionError("this process ignores permissions: the sweep would prove nothing")
    except PermissionError:
        pass
    ckpt.Checkpointer(strategy).save(root / "0", _big_tree(0))
    inner = ckpt.get_backend(root)

    class ChmodAtCall(InstrumentedBackend):
        k = 0

        target: tuple[str, str] | None = None

        async def hook(self, op: str, path: Any) -> None:
            await super().hook(op, path)
            if self.call_count == self.k:  # calls may overlap: remember which is call k
                self.target = (op, str(path))

        async def after(self, op: str, path: Any) -> None:
            await super().after(op, path)
            if self.target == (op, str(path)):  # once call k has taken effect
                self.target = None
                self.injected = f"after {op}:{path.name}"
                _set_writable(root, False)

    counting = ChmodAtCall(inner)
    ckpt.Checkpointer(strategy, backend=counting).save(root / "1", _big_tree(1))
    n = counting.call_count
    _drop_new_steps(root, strategy)
    results = []
    for k in range(n + 1):
        step = k + 2
        fb = ChmodAtCall(inner)
        fb.k = k
        if k == 0:
            fb.injected = "before the save"
            _set_writable(root, False)
        result: dict[str, Any] = {"k": k, "n": n, "saved": True}
        try:
            ckpt.Checkpointer(strategy, backend=fb).save(root / str(step), _big_tree(step))
        except Exception as exc:  # checked below (type, errno, message)
            result.update(saved=False, type=type(exc).__name__, message=str(exc))
            result["errno"] = getattr(exc, "errno", None)
        finally:
            _set_writable(root, True)
        result["call"] = fb.injected
        assert fb.injected, f"call {k} of {n}: no permission was removed"
        where = f"write permission removed at call {k} of {n} ({fb.injected})"
        saved = result["saved"]
        result["committed"] = _check_and_recover(root, strategy, step, saved, where, _big_tree)
        _drop_new_steps(root, strategy)
        results.append(result)
    return results


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_removed_permission_at_every_call_of_a_save(tmp_path: Path, strategy: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to drop the capabilities that bypass permissions)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    root = tmp_path / "root"
    code = (
        "import importlib.util, json, sys; from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('fs_faults', {__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"for r in m.permission_sweep(Path({str(root)!r}), {strategy!r}):\n"
        "    print(json.dumps(r), flush=True)\n"
    )
    drop = "-dac_override,-dac_read_search,-fowner"
    proc = subprocess.run(
        [setpriv, "--bounding-set", drop, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert results and len(results) == results[0]["n"] + 1, proc.stdout
    failed = [r for r in results if not r["saved"]]
    assert len(failed) >= len(results) // 2, f"only {len(failed)} of {len(results)} failed"
    assert any(r["committed"] for r in results), "no save committed: the sweep never ends"
    for r in failed:
        where = f"call {r['k']} ({r['call']}): {r['type']}: {r['message']}"
        assert r["type"] == "PermissionError" and r["errno"] == errno.EACCES, where
        assert str(root) in r["message"] and "permission" in r["message"].lower(), where
    # Every directory was given its permission back: nothing is left unwritable.
    for dirpath, _, _ in os.walk(root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) & 0o200, dirpath
