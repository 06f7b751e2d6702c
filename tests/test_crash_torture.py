"""Crash torture on the local disk: SIGKILL saving processes, check the invariants after
every kill (see ``benchmarks/crash_torture.py``; ``CKPT_TORTURE_N`` kills per strategy,
few in CI, 500 in the script)."""

from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_torture.py"


def load_torture() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_torture", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_torture(backend: str, root: str, strategy: str) -> None:
    """Kill ``CKPT_TORTURE_N`` (default 1) children; print the table row; assert the
    invariants held after every kill."""
    torture = load_torture()
    n = int(os.environ.get("CKPT_TORTURE_N", "1"))
    rng = random.Random(int(os.environ.get("CKPT_TORTURE_SEED", "0")))
    started = time.monotonic()
    stats = torture.torture(root, strategy, n, rng)
    print("\n" + torture.row(backend, strategy, stats, time.monotonic() - started))
    assert stats["kills"] == n
    assert stats["torn"] == 0, stats
    assert stats["lost"] == 0, stats
    assert stats["leftovers"] == 0, stats
    assert stats["failed_restarts"] == 0, stats


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
def test_crash_torture_local(tmp_path: Path, strategy: str) -> None:
    run_torture("local", str(tmp_path / "root"), strategy)
