"""Multi-process saves and restores on jax.distributed: real processes on this machine (one
CPU device each, a loopback coordinator), see tests/multihost_worker.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import ckpt

sys.path.insert(0, str(Path(__file__).parent))
from multihost import run_job

pytestmark = pytest.mark.timeout(600)
ARRAY_BYTES = 4 * 256 * 1024 * 4  # the (1024, 1024) float32 array saved by 4 processes


def ok(results: list[dict]) -> list[dict]:
    for r in results:
        assert "error" not in r and "died" not in r, r
    return results


def test_save_in_4_processes_restore_in_2_1_and_another_spec(tmp_path: Path) -> None:
    root = str(tmp_path)
    saved = ok(run_job("save", root, 4))
    assert [r["barriers"] for r in saved] == [2, 2, 2, 2]  # at most 3 for a sync save
    # One committed checkpoint: each process wrote its own shard, the primary the rest.
    assert ckpt.checkpoint_steps(root) == [1]
    chunks = sorted(p.name for p in (tmp_path / "1/arrays/0/c").iterdir())
    assert chunks == ["0", "1", "2", "3"]
    meta = ckpt.Checkpointer().metadata(tmp_path / "1")
    assert meta.commit_timestamp_nsecs
    # Restores: 2 processes on a (2,) mesh by rows, each reading only its half; by columns;
    # 1 process, unsharded.
    rows = ok(run_job("restore", root, 2, writers=4, spec="rows"))
    ok(run_job("restore", root, 2, writers=4, spec="cols"))
    whole = ok(run_job("restore", root, 1, writers=4, spec="none"))
    assert whole[0]["bytes_read"] >= ARRAY_BYTES
    for r in rows:  # the other half of the array is never read by this process
        assert r["bytes_read"] < whole[0]["bytes_read"] - ARRAY_BYTES // 3, (r, whole)
    assert ckpt.Checkpointer(verify_checksums=True).restore(tmp_path / "1")["step"] == 1


def test_one_process_killed_mid_save(tmp_path: Path) -> None:
    root = str(tmp_path)
    results = run_job("kill", root, 4, env={"CKPT_BARRIER_TIMEOUT_SECS": "8"})
    assert results[1].get("died") == -9
    for r in (results[0], results[2], results[3]):
        message = r.get("timeout", "")
        assert "barrier" in message and "written" in message, r
        assert f"{root}/1" in message and "Nothing was committed" in message
    assert ckpt.checkpoint_steps(root) == []
    assert not (tmp_path / "1").exists()
    ckpt.cleanup_temporary_paths(root)
    assert list(tmp_path.iterdir()) == []
    # The next save (a fresh job) works.
    ok(run_job("save", root, 4))
    assert ckpt.checkpoint_steps(root) == [1]


def test_manager_async_and_partial_saves_in_2_processes(tmp_path: Path) -> None:
    managed = ok(run_job("manager", str(tmp_path / "m"), 2))
    for r in managed:
        assert r["steps"] == [2, 3] and r["latest"] == 3
        assert all(n <= 4 for n in r["barriers_per_save"]), r  # at most 4 per async save
    assert ckpt.checkpoint_steps(tmp_path / "m") == [2, 3]
    assert all(r["barriers"] <= 3 for r in ok(run_job("save_async", str(tmp_path / "a"), 2)))
    ok(run_job("partial", str(tmp_path / "p"), 2))
    out = ckpt.Checkpointer().restore(tmp_path / "p/1")
    assert out["w"].shape == (512, 1024) and out["step"] == 1
    assert np.array_equal(out["w"][300], np.arange(300 * 1024, 301 * 1024, dtype=np.float32))


def test_single_process_needs_no_distributed_runtime() -> None:
    from ckpt import multihost

    coordinator = multihost.current()
    assert not coordinator.multiprocess and coordinator.is_primary
    op = coordinator.operation("save", "/x")
    op.barrier("written")  # no-op
    assert coordinator.barriers == 0
    assert op.broadcast("k", b"v") == b"v" and op.gather("k", b"v") == [b"v"]
