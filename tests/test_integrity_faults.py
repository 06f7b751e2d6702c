"""Strategy-layer integrity under injected faults and SIGKILLed subprocesses (issue 9):
forced overwrites keep exactly one committed checkpoint, commit markers appear complete or
not at all, a failed save leaves no write running, every crash leftover is recognised and
removed, and a commit whose durability cannot be confirmed is reported as such."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from upath import UPath

import ckpt
from ckpt import _sync, tree_format
from ckpt.layout import COMMIT_SUCCESS_FILE
from ckpt_backend_local import LocalBackend, _rename
from ckpt_conformance.instrumented import InstrumentedBackend

STRATEGIES = ["rename", "commit_file"]


def restore_v(root: Path, name: str, strategy: str) -> Any:
    return ckpt.Checkpointer(strategy).restore(root / name)["v"]


def cleanup_with_manager(root: Path, strategy: str) -> list[int]:
    """What a manager opened on ``root`` sees after its automatic cleanup and repair."""
    with ckpt.CheckpointManager(root, atomicity=strategy) as mngr:
        mngr.wait_until_finished()
        return mngr.all_steps()


# -- force=True keeps the old checkpoint until the new one is committed -----------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forced_save_whose_commit_fails_keeps_the_old_one(tmp_path: Path, strategy: str) -> None:
    ckpt.Checkpointer(strategy).save(tmp_path / "1", {"v": 1})
    backend = InstrumentedBackend(LocalBackend())
    key = "rename_dir" if strategy == "rename" else f"write_bytes:{COMMIT_SUCCESS_FILE}"
    backend.fail_on[key] = OSError(5, "Input/output error")
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.Checkpointer(strategy, backend=backend).save(tmp_path / "1", {"v": 2}, force=True)
    assert ckpt.checkpoint_steps(tmp_path, atomicity=strategy) == [1]
    assert restore_v(tmp_path, "1", strategy) == 1
    assert cleanup_with_manager(tmp_path, strategy) == [1]
    assert restore_v(tmp_path, "1", strategy) == 1
    assert ckpt.all_temporary_paths(tmp_path) == []


def test_rename_replace_is_one_exchange(tmp_path: Path) -> None:
    ckpt.Checkpointer("rename").save(tmp_path / "1", {"v": 1})
    backend = InstrumentedBackend(LocalBackend())
    ckpt.Checkpointer("rename", backend=backend).save(tmp_path / "1", {"v": 2}, force=True)
    ops = [op for op, name in backend.log if op in ("rename_dir", "exchange_dirs")]
    assert ops == ["rename_dir", "exchange_dirs"]  # the refused no-replace rename, the swap
    assert restore_v(tmp_path, "1", "rename") == 2
    assert sorted(os.listdir(tmp_path)) == ["1"]


@pytest.fixture
def no_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without RENAME_EXCHANGE: the replace takes two renames."""

    def refuse(a: str, b: str) -> None:
        raise NotImplementedError("no RENAME_EXCHANGE here")

    monkeypatch.setattr("ckpt_backend_local.exchange", refuse)


class _FailSecondRename(InstrumentedBackend):
    """Fails, once, the rename that moves the new checkpoint into place after the old one
    was renamed aside."""

    aside = False
    failed = False

    async def hook(self, op: str, path: UPath) -> None:
        await super().hook(op, path)
        if op == "rename_dir" and ".ckpt-replaced-" in path.name:
            self.aside = True
        elif op == "rename_dir" and path.name == "1" and self.aside and not self.failed:
            self.failed = True
            raise OSError(5, "Input/output error")


@pytest.mark.usefixtures("no_exchange")
def test_two_rename_replace_rolls_back_a_failed_second_rename(tmp_path: Path) -> None:
    ckpt.Checkpointer("rename").save(tmp_path / "1", {"v": 1})
    backend = _FailSecondRename(LocalBackend())
    with pytest.raises(OSError, match="Input/output error"):
        ckpt.Checkpointer("rename", backend=backend).save(tmp_path / "1", {"v": 2}, force=True)
    assert backend.failed
    assert restore_v(tmp_path, "1", "rename") == 1
    assert cleanup_with_manager(tmp_path, "rename") == [1]
    assert sorted(os.listdir(tmp_path)) == ["1"]


@pytest.mark.usefixtures("no_exchange")
def test_two_rename_replace_succeeds(tmp_path: Path) -> None:
    ckpt.Checkpointer("rename").save(tmp_path / "1", {"v": 1})
    ckpt.Checkpointer("rename").save(tmp_path / "1", {"v": 2}, force=True)
    assert restore_v(tmp_path, "1", "rename") == 2
    assert sorted(os.listdir(tmp_path)) == ["1"]


_KILL_BETWEEN_RENAMES = """
import os, signal, sys
import ckpt
import ckpt_backend_local
from ckpt_backend_local import _rename
def refuse(a, b):
    raise NotImplementedError
ckpt_backend_local.exchange = refuse
real = ckpt_backend_local.rename_noreplace
def rename(src, dst):
    real(src, dst)
    if ".ckpt-replaced-" in dst:  # the old checkpoint is aside; the new not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
ckpt_backend_local.rename_noreplace = rename
ckpt.Checkpointer("rename").save(sys.argv[1], {"v": 2}, force=True)
"""


def test_sigkill_between_the_two_renames_is_repaired(tmp_path: Path) -> None:
    ckpt.Checkpointer("rename").save(tmp_path / "1", {"v": 1})
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(tmp_path / "1")])
    assert proc.returncode == -9
    assert not (tmp_path / "1").exists()  # the crash window: neither name is the step
    assert any(".ckpt-replaced-" in n for n in os.listdir(tmp_path))
    assert cleanup_with_manager(tmp_path, "rename") == [1]  # repaired at manager start
    assert restore_v(tmp_path, "1", "rename") == 1
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_gc_repairs_too(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ckpt.cli import app

    ckpt.Checkpointer("rename").save(tmp_path / "1", {"v": 1})
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(tmp_path / "1")])
    assert proc.returncode == -9
    result = CliRunner().invoke(app, ["gc", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert restore_v(tmp_path, "1", "rename") == 1


# -- the commit marker appears complete or not at all ---------------------------------------


_KILL_AT_MARKER_LINK = """
import os, signal, sys
import ckpt
real = os.link
def link(src, dst, *a, **k):
    if dst.endswith("commit_success.txt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.link = link
ckpt.Checkpointer("commit_file").save(sys.argv[1], {"v": 2})
"""


def test_sigkill_at_the_marker_leaves_no_marker(tmp_path: Path) -> None:
    ckpt.Checkpointer("commit_file").save(tmp_path / "1", {"v": 1})
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_MARKER_LINK, str(tmp_path / "2")])
    assert proc.returncode == -9
    assert not (tmp_path / "2" / COMMIT_SUCCESS_FILE).exists()  # no empty marker
    assert ckpt.checkpoint_steps(tmp_path, atomicity="commit_file") == [1]
    removed = {p.name for p in ckpt.cleanup_temporary_paths(tmp_path, atomicity="commit_file")}
    assert "2" in removed  # the final directory holding only the private marker file
    assert sorted(os.listdir(tmp_path)) == [".ckpt-writers", "1"]
    assert len(os.listdir(tmp_path / ".ckpt-writers")) == 1
    assert restore_v(tmp_path, "1", "commit_file") == 1


def test_unreadable_marker_never_makes_cleanup_delete_data(tmp_path: Path) -> None:
    ckpt.Checkpointer("commit_file").save(tmp_path / "1", {"v": 1})
    (writer,) = os.listdir(tmp_path / ".ckpt-writers")
    (tmp_path / "1" / COMMIT_SUCCESS_FILE).write_bytes(b"")  # as the old two-step create left
    for atomicity in STRATEGIES:
        assert ckpt.all_temporary_paths(tmp_path, atomicity=atomicity) == []
    assert cleanup_with_manager(tmp_path, "commit_file") == [1]
    assert os.listdir(tmp_path / ".ckpt-writers") == [writer]


# -- a failed save leaves no write running ----------------------------------------------------


class _OneArrayFails(InstrumentedBackend):
    """Writes of ``arrays/<n>`` go to a path that cannot exist (a file's child)."""

    def __init__(self, inner: ckpt.Backend, blocker: Path) -> None:
        super().__init__(inner)
        self.blocker = blocker

    def kvstore_spec(self, path: UPath) -> dict[str, Any]:
        if path.name == "3" and path.parent.name == "arrays":
            return {"driver": "file", "path": str(self.blocker / "cannot" / "be") + "/"}
        return self.inner.kvstore_spec(path)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_failed_save_leaves_no_write_running(
    tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every leaf its own zarr3 array, written by tensorstore (8 MiB leaves would be packed).
    monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", -1)
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    root = tmp_path / "run"
    tree = {f"a{i}": np.full((2048, 1024), i, np.float32) for i in range(12)}  # 96 MiB
    backend = _OneArrayFails(LocalBackend(), blocker)
    with pytest.raises(Exception):  # noqa: B017 - whatever tensorstore raises
        ckpt.Checkpointer(strategy, backend=backend).save(root / "1", tree)
    after = sorted(str(p) for p in root.rglob("*"))
    time.sleep(2)
    assert sorted(str(p) for p in root.rglob("*")) == after  # nothing reappears
    assert [p for p in root.rglob("*") if p.is_file()] == []
    assert ckpt.all_temporary_paths(root) == []


_KILL_LOOP = """
import sys
import numpy as np
import ckpt
from ckpt import _sync
root = sys.argv[1]
ckptr = ckpt.Checkpointer("commit_file")
step = int(sys.argv[2])
backend = ckpt.get_backend(root)
while True:
    ckptr.save(f"{root}/{step}", {"w": np.ones((256, 256), np.float32), "v": step})
    if step % 2:
        _sync.run(ckpt.delete_checkpoint(backend, ckpt.registry.to_path(f"{root}/{step}")))
    step += 1
"""


@pytest.mark.timeout(240)
def test_every_crash_leftover_is_removed_by_cleanup(tmp_path: Path) -> None:
    """SIGKILL a process that saves and deletes in a loop, at random moments; after each
    crash cleanup leaves only committed, readable checkpoints: no empty directories, no
    unknown entries, no unnamed writer directories."""
    rng = random.Random(11)
    root = tmp_path / "run"
    root.mkdir()
    for i in range(3):  # more kills at random moments: benchmarks/crash_torture.py
        proc = subprocess.Popen([sys.executable, "-c", _KILL_LOOP, str(root), str(i * 1000)])
        time.sleep(3.0 + rng.random() * 1.5)  # import (~2.5 s), then saves and deletes
        proc.kill()
        proc.wait()
        for strategy in STRATEGIES:  # whatever the configured strategy
            scan_state = {
                n: ckpt.path_state(root / n, atomicity=strategy)
                for n in os.listdir(root)
                if n != ".ckpt-writers"
            }
            assert ckpt.PathState.UNKNOWN not in scan_state.values(), scan_state
        ckpt.cleanup_temporary_paths(root, atomicity="commit_file")
        steps = ckpt.checkpoint_steps(root, atomicity="commit_file")
        names = sorted(n for n in os.listdir(root) if n != ".ckpt-writers")
        assert names == sorted(str(s) for s in steps), names
        for step in steps:
            assert ckpt.Checkpointer("commit_file").restore(root / str(step))["v"] == step
        writers = os.listdir(root / ".ckpt-writers") if (root / ".ckpt-writers").exists() else []
        assert len(writers) == len(steps), writers


# -- a commit whose durability cannot be confirmed --------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_not_durable_is_reported_and_known(tmp_path: Path, strategy: str) -> None:
    backend = InstrumentedBackend(LocalBackend())
    backend.fail_on["sync_dir"] = OSError(5, "fsync failed")
    with ckpt.CheckpointManager(
        tmp_path, atomicity=strategy, backend=backend, async_save=False
    ) as mngr:
        with pytest.raises(ckpt.CommitNotDurableError, match="is committed"):
            mngr.save(1, {"v": 1})
        assert mngr.all_steps() == [1]  # the manager knows the committed step
        del backend.fail_on["sync_dir"]
        assert mngr.restore(1) == {"v": 1}
    assert ckpt.all_temporary_paths(tmp_path) == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_not_durable_async(tmp_path: Path, strategy: str) -> None:
    backend = InstrumentedBackend(LocalBackend())
    backend.fail_on["sync_dir"] = OSError(5, "fsync failed")
    mngr = ckpt.CheckpointManager(tmp_path, atomicity=strategy, backend=backend)
    mngr.save(1, {"v": 1})
    with pytest.raises(ckpt.CommitNotDurableError):
        mngr.wait_until_finished()
    assert mngr.all_steps() == [1]
    del backend.fail_on["sync_dir"]
    mngr.close()
    assert ckpt.Checkpointer(strategy).restore(tmp_path / "1") == {"v": 1}


def test_exchange_primitive(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    try:
        _rename.exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    except NotImplementedError:
        pytest.skip("this filesystem has no RENAME_EXCHANGE")
    assert (tmp_path / "a" / "x").read_text() == "b"
    assert (tmp_path / "b" / "x").read_text() == "a"
    _sync.run(LocalBackend().exchange_dirs(UPath(tmp_path / "a"), UPath(tmp_path / "b")))
    assert (tmp_path / "a" / "x").read_text() == "a"
