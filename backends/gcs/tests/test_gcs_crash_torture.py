"""Crash torture on GCS (fake-gcs-server, flat and HNS buckets): SIGKILL saving processes,
check the invariants after every kill (``benchmarks/crash_torture.py``; ``CKPT_TORTURE_N``
kills, few in CI)."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pytest

import ckpt
from ckpt.registry import supported_strategies

_HELPER = Path(__file__).resolve().parents[3] / "tests" / "test_crash_torture.py"


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
@pytest.mark.parametrize("bucket", ["ckpt-flat", "ckpt-hns"])
def test_crash_torture_gcs(ckpt_config: str, bucket: str, strategy: str) -> None:
    root = f"gs://{bucket}/torture-{uuid.uuid4().hex[:12]}"
    backend = ckpt.get_backend(root).bind(ckpt.registry.to_path(root))
    if strategy not in supported_strategies(backend):
        pytest.skip(f"{backend.describe()} does not support {strategy!r}")
    spec = importlib.util.spec_from_file_location("_torture_helper", _HELPER)
    assert spec is not None and spec.loader is not None
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    helper.run_torture(f"gcs ({bucket})", root, strategy)
