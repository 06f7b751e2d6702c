"""Crash torture on the local disk: SIGKILL saving processes, check the invariants after
every kill (see ``benchmarks/crash_torture.py``; ``CKPT_TORTURE_N`` kills per strategy,
a few in CI, 500 in the script). :func:`run_torture` is also the body of the S3 and GCS
torture tests (``backends/*/tests/test_*_crash_torture.py``)."""

from __future__ import annotations

import importlib.util
import os
import random
import time
from pathlib import Path
from types import ModuleType

import pytest

import ckpt
from ckpt.registry import supported_strategies

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_torture.py"
#: Kills per test: one by default (CI), ``CKPT_TORTURE_N=500`` for the documented figures.
N = int(os.environ.get("CKPT_TORTURE_N", "1"))
#: pytest-timeout for one torture test: generous per kill (object stores are slower).
TIMEOUT_S = 120 + 10 * N


def load_torture() -> ModuleType:
    """The crash torture script as a module."""
    spec = importlib.util.spec_from_file_location("crash_torture", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_torture(backend: str, root: str, strategy: str) -> None:
    """Kill ``CKPT_TORTURE_N`` children saving under ``root`` with ``strategy``; print the
    table row and where the kills landed; assert the invariants held after every kill."""
    bound = ckpt.get_backend(root).bind(ckpt.registry.to_path(root))
    assert strategy in supported_strategies(bound), (bound.describe(), strategy)
    torture = load_torture()
    rng = random.Random(int(os.environ.get("CKPT_TORTURE_SEED", "0")))
    started = time.monotonic()
    stats = torture.torture(root, strategy, N, rng, quiet=N < 25)  # progress on long runs
    print("\n" + torture.row(backend, strategy, stats, time.monotonic() - started))
    print(torture.phases(backend, strategy, stats))
    assert stats["kills"] == N
    if N >= 25:  # the kills landed in saves, not all before the first commit
        assert stats["commits"] > 0, stats
    assert stats["torn"] == 0, stats
    assert stats["lost"] == 0, stats
    assert stats["leftovers"] == 0, stats
    assert stats["failed_restarts"] == 0, stats


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("strategy", ["rename", "commit_file", "snapshot"])
def test_crash_torture_local(tmp_path: Path, strategy: str) -> None:
    run_torture("local", str(tmp_path / "root"), strategy)
