"""Crash torture on S3 (moto and SeaweedFS): SIGKILL saving processes, check the invariants
after every kill (``benchmarks/crash_torture.py``; ``CKPT_TORTURE_N`` kills, few in CI).
S3 has no atomic directory rename: ``commit_file`` only."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

_HELPER = Path(__file__).resolve().parents[3] / "tests" / "test_crash_torture.py"
_spec = importlib.util.spec_from_file_location("_torture_helper", _HELPER)
assert _spec is not None and _spec.loader is not None
_helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helper)


@pytest.mark.timeout(_helper.TIMEOUT_S)
def test_crash_torture_s3(s3_server: Any, s3_root: str) -> None:
    _helper.run_torture(f"s3 ({s3_server.name})", s3_root, "commit_file")
