"""Real file system faults during a save, array I/O included, at every point: a tmpfs that
fills up at a different byte of the save each round, and a tmpfs remounted read-only at
each storage call k of a save (the arrays, written by tensorstore between those calls, are
hit too). After each fault: the step is committed and restores exactly, or is invisible;
the step committed before is intact; cleanup removes the leftovers; the next save works.
Mounting needs root (CI runs as root); elsewhere these tests are skipped, with the reason.
(Removed permissions are not tested here: root ignores them.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
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


def _same(a: Any, b: Any) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _check_and_recover(root: Path, strategy: str, step: int, saved: bool, where: str) -> bool:
    """The invariants after a fault; return whether ``step`` was committed."""
    plain = ckpt.Checkpointer(strategy, verify_checksums=True)
    steps = ckpt.checkpoint_steps(root, atomicity=strategy)
    assert 0 in steps and _same(plain.restore(root / "0"), _tree(0)), f"{where}: step 0"
    committed = step in steps
    if committed:
        assert _same(plain.restore(root / str(step)), _tree(step)), f"{where}: torn"
    assert committed or not saved, f"{where}: save reported success, step not committed"
    ckpt.cleanup_temporary_paths(root, atomicity=strategy)
    assert ckpt.all_temporary_paths(root, atomicity=strategy) == [], where
    if not committed:
        plain.save(root / str(step), _tree(step))
        assert _same(plain.restore(root / str(step)), _tree(step)), f"{where}: next save"
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
