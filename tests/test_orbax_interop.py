"""Interoperability with orbax-checkpoint on one directory: each sees the other's
committed steps, neither mistakes the other's temporaries for steps, and ckpt's cleanup
never deletes Orbax's checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckpt
from ckpt import _sync

ocp = pytest.importorskip("orbax.checkpoint")


def state(step: int) -> dict[str, Any]:
    return {"w": np.full(3, step, np.float32)}


def orbax_steps(root: Path) -> dict[str, list[int]]:
    """The steps Orbax's discovery functions find under ``root``."""
    manager = ocp.CheckpointManager(root)
    try:
        return {
            "manager": sorted(manager.all_steps()),
            "utils": sorted(ocp.utils.checkpoint_steps(root)),
            "find_all": sorted(m.step for m in ocp.path.step.standard_name_format().find_all(root)),
            "latest": [manager.latest_step()] if manager.latest_step() is not None else [],
        }
    finally:
        manager.close()


def orbax_save(root: Path, steps: list[int]) -> None:
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=10))
    for step in steps:
        manager.save(step, args=ocp.args.StandardSave(state(step)), custom_metadata={"by": "orbax"})
    manager.wait_until_finished()
    manager.close()


@pytest.mark.parametrize("atomicity", ["rename", "commit_file"])
def test_orbax_sees_ckpt_steps_not_temporaries(tmp_path: Path, atomicity: str) -> None:
    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        mngr.save(1, state(1))
        mngr.save(2, state(2))
    in_progress = ckpt.get_strategy(atomicity).from_final(tmp_path / "3")
    _sync.run(in_progress.create())  # a ckpt save still writing step 3
    assert orbax_steps(tmp_path) == {
        "manager": [1, 2],
        "utils": [1, 2],
        "find_all": [1, 2],
        "latest": [2],
    }
    if atomicity == "rename":
        tmp_names = [os.path.basename(str(t.get())) for t in ocp.utils.tmp_checkpoints(tmp_path)]
        assert tmp_names == [in_progress.get().name]


def test_orbax_reads_ckpt_step_metadata(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, state(1), custom_metadata={"by": "ckpt"})
    manager = ocp.CheckpointManager(tmp_path)
    try:
        meta = manager.metadata(1)
    finally:
        manager.close()
    assert meta.custom_metadata == {"by": "ckpt"}
    assert meta.init_timestamp_nsecs is not None and meta.commit_timestamp_nsecs is not None


def test_ckpt_sees_orbax_steps_and_cleanup_keeps_them(tmp_path: Path) -> None:
    orbax_save(tmp_path, [1, 2])
    orbax_tmp = tmp_path / "3.orbax-checkpoint-tmp"  # an interrupted Orbax save
    orbax_tmp.mkdir()
    before = {n: sorted(os.listdir(tmp_path / n)) for n in ("1", "2")}
    with ckpt.CheckpointManager(tmp_path, max_to_keep=None) as mngr:
        mngr.wait_until_finished()  # includes the background cleanup
        assert mngr.all_steps() == [1, 2]
        assert mngr.metadata(2).custom_metadata == {"by": "orbax"}
        with pytest.raises(ValueError, match="no ckpt tree"):
            mngr.restore(2)
        mngr.save(3, state(3))
    assert {n: sorted(os.listdir(tmp_path / n)) for n in ("1", "2")} == before
    assert not orbax_tmp.exists()  # positive evidence of a temporary: removed
    assert orbax_steps(tmp_path)["manager"] == [1, 2, 3]
    assert ckpt.Checkpointer().restore(tmp_path / "3")["w"][0] == 3


def test_ckpt_discovery_functions_on_orbax_directory(tmp_path: Path) -> None:
    orbax_save(tmp_path, [5, 7])
    assert ckpt.checkpoint_steps(tmp_path) == [5, 7]
    assert [m.step for m in ckpt.standard_name_format().find_all(tmp_path)] == [5, 7]
    assert ckpt.is_path_finalized(tmp_path / "7")
