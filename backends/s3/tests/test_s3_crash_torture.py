"""Crash torture on S3 (moto and SeaweedFS): SIGKILL saving processes, check the invariants
after every kill (``benchmarks/crash_torture.py``; ``CKPT_TORTURE_N`` kills, few in CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt.registry import supported_strategies

_HELPER = Path(__file__).resolve().parents[3] / "tests" / "test_crash_torture.py"


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
def test_crash_torture_s3(s3_server: Any, s3_root: str, strategy: str) -> None:
    backend = ckpt.get_backend(s3_root).bind(ckpt.registry.to_path(s3_root))
    if strategy not in supported_strategies(backend):
        pytest.skip(f"{backend.describe()} does not support {strategy!r}")
    spec = importlib.util.spec_from_file_location("_torture_helper", _HELPER)
    assert spec is not None and spec.loader is not None
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    helper.run_torture(f"s3 ({s3_server.name})", s3_root, strategy)
