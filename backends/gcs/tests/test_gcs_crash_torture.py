"""Crash torture on GCS (fake-gcs-server, flat and HNS buckets): SIGKILL saving processes,
check the invariants after every kill (``benchmarks/crash_torture.py``; ``CKPT_TORTURE_N``
kills, few in CI). A flat bucket has no atomic directory rename: ``commit_file`` only."""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

import pytest

_HELPER = Path(__file__).resolve().parents[3] / "tests" / "test_crash_torture.py"
_spec = importlib.util.spec_from_file_location("_torture_helper", _HELPER)
assert _spec is not None and _spec.loader is not None
_helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helper)


@pytest.mark.timeout(_helper.TIMEOUT_S)
@pytest.mark.parametrize(
    ("bucket", "strategy"),
    [
        ("ckpt-flat", "commit_file"),
        ("ckpt-hns", "rename"),
        ("ckpt-hns", "commit_file"),
        ("ckpt-hns", "snapshot"),
    ],
)
def test_crash_torture_gcs(ckpt_config: str, bucket: str, strategy: str) -> None:
    root = f"gs://{bucket}/torture-{uuid.uuid4().hex[:12]}"
    _helper.run_torture(f"gcs ({bucket})", root, strategy)
