"""Multi-process saves and restores on S3 (moto): real jax.distributed processes, see
tests/multihost_worker.py."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import ckpt

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from multihost import run_job

pytestmark = pytest.mark.timeout(600)


def test_save_in_2_processes_restore_in_1_and_2(moto_server: Any, monkeypatch: Any) -> None:
    moto_server.activate(monkeypatch)
    root = f"s3://{moto_server.bucket}/multihost-{uuid.uuid4().hex[:8]}"
    env = {"CKPT_CONFIG": str(moto_server.config_path)}
    saved = run_job("save", root, 2, env=env)
    assert [r.get("barriers") for r in saved] == [2, 2], saved
    assert ckpt.checkpoint_steps(root) == [1]
    keys = moto_server.keys(moto_server.key_of(root))
    assert sum("/arrays/0/c/" in k for k in keys) == 2  # one chunk per process's shard
    for processes, spec in ((1, "none"), (2, "rows")):
        results = run_job("restore", root, processes, writers=2, spec=spec, env=env)
        assert all("error" not in r and "died" not in r for r in results), results
    assert ckpt.Checkpointer(verify_checksums=True).restore(root + "/1")["step"] == 1
