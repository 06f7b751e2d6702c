"""ckpt.CheckpointManager: steps, retention after commit, background cleanup, and a real
crash (SIGKILL of a saving subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckpt
from ckpt.layout import temporary_name, unique_token
from ckpt_conformance.instrumented import InstrumentedBackend

STRATEGIES = ["rename", "commit_file"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=STRATEGIES)
def atomicity(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def state(step: int) -> dict[str, Any]:
    return {"w": np.full(4, step, np.float32), "step": step}


def stale_temporary(root: Path, final_name: str) -> Path:
    """A temporary left by a writer that started (and died) before now."""
    path = root / temporary_name(final_name, unique_token())
    path.mkdir(parents=True)
    (path / "junk").write_bytes(b"x")
    return path


# -- steps ------------------------------------------------------------------------------------


def test_save_restore_steps(tmp_path: Path, atomicity: str) -> None:
    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        assert mngr.all_steps() == [] and mngr.latest_step() is None
        for step in (0, 5, 10):
            assert mngr.save(step, state(step), custom_metadata={"s": step}) is True
        mngr.wait_until_finished()
        assert mngr.all_steps() == [0, 5, 10] and mngr.latest_step() == 10
        assert mngr.restore()["step"] == 10
        assert mngr.restore(5)["step"] == 5
        assert mngr.metadata(5).custom_metadata == {"s": 5}
    again = ckpt.CheckpointManager(tmp_path, atomicity=atomicity)
    assert again.all_steps() == [0, 5, 10]
    again.close()


def test_step_names(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(
        tmp_path, step_prefix="ckpt", step_format_fixed_length=4, async_save=False
    ) as mngr:
        mngr.save(7, state(7))
        assert sorted(os.listdir(tmp_path)) == ["ckpt_0007"]
        assert mngr.all_steps() == [7]
    fmt = ckpt.standard_name_format("ckpt", 4)
    assert [m.step for m in fmt.find_all(tmp_path)] == [7]


def test_existing_and_older_steps(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(tmp_path) as mngr:
        mngr.save(3, state(3))
        with pytest.raises(ValueError, match="Step 3 already exists"):
            mngr.save(3, state(3))
        assert mngr.save(2, state(2)) is False
        mngr.wait_until_finished()
        assert mngr.all_steps() == [3]


def test_restore_missing(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(tmp_path) as mngr:
        with pytest.raises(FileNotFoundError, match="No committed checkpoint"):
            mngr.restore()
        mngr.save(1, state(1))
        with pytest.raises(FileNotFoundError, match="step 2"):
            mngr.restore(2)


def test_delete(tmp_path: Path, atomicity: str) -> None:
    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        mngr.save(1, state(1))
        mngr.save(2, state(2))
        mngr.delete(2)
        assert mngr.all_steps() == [1]
        assert mngr.restore()["step"] == 1
        with pytest.raises(FileNotFoundError):
            mngr.delete(2)
    assert ckpt.CheckpointManager(tmp_path, atomicity=atomicity).all_steps() == [1]
    assert ckpt.all_temporary_paths(tmp_path) == []


def test_pending_step_listed_and_dropped_on_failure(
    tmp_path: Path, backend: InstrumentedBackend
) -> None:
    backend.gate("write_bytes:_TREE.json")
    backend.fail_on["write_bytes:_TREE.json"] = OSError("injected")
    mngr = ckpt.CheckpointManager(tmp_path, backend=backend, cleanup_tmp_directories=False)
    mngr.save(1, state(1))
    assert mngr.all_steps() == [1]  # in progress (as in Orbax)
    backend.gates["write_bytes:_TREE.json"].set()
    with pytest.raises(OSError, match="injected"):
        mngr.wait_until_finished()
    assert mngr.all_steps() == []
    mngr.close()


# -- max_to_keep -------------------------------------------------------------------------------


def test_max_to_keep_deletes_only_after_commit(
    tmp_path: Path, backend: InstrumentedBackend, atomicity: str
) -> None:
    mngr = ckpt.CheckpointManager(tmp_path, max_to_keep=2, atomicity=atomicity, backend=backend)
    for step in (1, 2):
        mngr.save(step, state(step))
    mngr.wait_until_finished()
    gate = backend.gate("write_bytes:_TREE.json")
    mngr.save(3, state(3))
    wait = backend.entered["write_bytes:_TREE.json"].wait(10)
    assert wait
    time.sleep(0.1)
    assert (tmp_path / "1").exists()  # step 3 is not committed yet
    gate.set()
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]
    assert not (tmp_path / "1").exists()
    assert ckpt.CheckpointManager(tmp_path, atomicity=atomicity).all_steps() == [2, 3]
    mngr.close()


def test_failed_save_deletes_nothing(tmp_path: Path, backend: InstrumentedBackend) -> None:
    mngr = ckpt.CheckpointManager(tmp_path, max_to_keep=1, backend=backend)
    mngr.save(1, state(1))
    mngr.wait_until_finished()
    backend.fail_on["write_bytes:_TREE.json"] = OSError("injected")
    mngr.save(2, state(2))
    with pytest.raises(OSError, match="injected"):
        mngr.wait_until_finished()
    assert mngr.all_steps() == [1]
    assert mngr.restore()["step"] == 1
    mngr.close()


def test_old_steps_deleted_in_background(tmp_path: Path, backend: InstrumentedBackend) -> None:
    mngr = ckpt.CheckpointManager(tmp_path, max_to_keep=1, backend=backend, async_save=False)
    mngr.save(1, state(1))
    gate = backend.gate("remove_tree:1")
    mngr.save(2, state(2))  # returns although the deletion of step 1 hangs
    assert mngr.all_steps() == [2]
    assert (tmp_path / "1").exists()
    gate.set()
    mngr.wait_until_finished()
    assert not (tmp_path / "1").exists()
    mngr.close()


# -- cleanup of temporaries ---------------------------------------------------------------------


def test_cleanup_does_not_delay_first_save(tmp_path: Path, backend: InstrumentedBackend) -> None:
    stale = stale_temporary(tmp_path, "4")
    (tmp_path / "notes").mkdir()  # unknown: never deleted
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    gate = backend.gate("list_dir")  # the cleanup's listing hangs
    mngr = ckpt.CheckpointManager(tmp_path, backend=backend, async_save=False, max_to_keep=1)
    assert backend.entered["list_dir"].wait(10)
    mngr.save(5, state(5))  # saves, deletions and restores go on while the cleanup is stuck
    mngr.save(6, state(6))
    assert mngr.restore()["step"] == 6
    assert mngr.all_steps() == [6] and stale.exists()
    gate.set()
    mngr.wait_until_finished()
    assert not stale.exists()
    assert (tmp_path / "notes").exists()
    mngr.close()


def test_cleanup_spares_writers_started_after_manager(
    tmp_path: Path, backend: InstrumentedBackend
) -> None:
    stale = stale_temporary(tmp_path, "1")
    gate = backend.gate("list_dir")
    mngr = ckpt.CheckpointManager(tmp_path, backend=backend)
    live = stale_temporary(tmp_path, "2")  # another writer, started after the manager
    gate.set()
    mngr.wait_until_finished()
    assert not stale.exists() and live.exists()
    mngr.close()


# -- crash -----------------------------------------------------------------------------------


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    import ckpt
    from ckpt_backend_local import LocalBackend

    class StallingBackend(LocalBackend):
        async def write_bytes(self, path, data):
            if path.name == "_TREE.json":
                print("WRITING", flush=True)
                await asyncio.sleep(600)
            await super().write_bytes(path, data)

    root, atomicity = sys.argv[1], sys.argv[2]
    mngr = ckpt.CheckpointManager(root, atomicity=atomicity, backend=StallingBackend())
    mngr.save(2, {"w": np.full(4, 2.0, np.float32), "step": 2})
    mngr.wait_until_finished()
    """
)


def test_crash_mid_write_leaves_previous_step(tmp_path: Path, atomicity: str) -> None:
    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        mngr.save(1, state(1))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), atomicity],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "WRITING", child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    leftovers = ckpt.all_temporary_paths(tmp_path)
    assert len(leftovers) == 1  # the killed writer's data, not committed
    assert not (tmp_path / "2").exists()
    assert not ckpt.is_path_finalized(tmp_path / "2", atomicity=atomicity)

    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        assert mngr.all_steps() == [1]
        assert mngr.restore()["step"] == 1
        mngr.wait_until_finished()
        assert ckpt.all_temporary_paths(tmp_path) == []
        mngr.save(2, state(2))  # the step can be saved again
    assert ckpt.CheckpointManager(tmp_path, atomicity=atomicity).restore(2)["step"] == 2


def test_closed_manager(tmp_path: Path) -> None:
    mngr = ckpt.CheckpointManager(tmp_path)
    mngr.close()
    mngr.close()
    with pytest.raises(ValueError, match="closed"):
        mngr.save(1, state(1))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_to_keep"):
        ckpt.CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="either name_format"):
        ckpt.CheckpointManager(tmp_path, name_format=ckpt.standard_name_format(), step_prefix="x")


# -- an empty step directory (a commit_file save killed at its marker, or a stray mkdir) -------


@pytest.mark.parametrize("cleanup", [False, True])
def test_empty_step_directory_is_not_the_latest_step(
    tmp_path: Path, atomicity: str, cleanup: bool
) -> None:
    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        mngr.save(1729, state(1729))
    (tmp_path / "3000").mkdir()
    # Every reader agrees with path_state (and `ckpt ls`, `ckpt gc`): not a checkpoint.
    assert ckpt.path_state(tmp_path / "3000") is ckpt.PathState.TEMPORARY
    assert ckpt.latest_step_metadata(tmp_path).step == 1729  # type: ignore[union-attr]
    assert ckpt.checkpoint_steps(tmp_path) == [1729]
    mngr = ckpt.CheckpointManager(
        tmp_path, atomicity=atomicity, max_to_keep=2, cleanup_tmp_directories=cleanup
    )
    assert mngr.latest_step() == 1729 and mngr.all_steps() == [1729]
    assert mngr.restore()["step"] == 1729  # a restart after preemption resumes
    mngr.save(1730, state(1730))
    mngr.save(1731, state(1731))
    mngr.close()
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit())
    assert kept == (["1730", "1731"] if cleanup else ["1730", "1731", "3000"])


def test_empty_step_directory_in_the_middle_is_dropped_by_cleanup(
    tmp_path: Path, atomicity: str
) -> None:
    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        mngr.save(1, state(1))
        mngr.save(3, state(3))
    (tmp_path / "2").mkdir()
    with ckpt.CheckpointManager(tmp_path, atomicity=atomicity) as mngr:
        mngr.wait_until_finished()  # the background cleanup removed it
        assert mngr.all_steps() == [1, 3]
        assert not (tmp_path / "2").exists()
