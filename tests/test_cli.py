"""The ``ckpt`` command line against real checkpoints on local disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import ckpt
from ckpt import _sync, tree_format, tree_snapshot, tree_write
from ckpt.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


def _save(final: Path, strategy: str = "rename", tree: object = None) -> None:
    tmp = ckpt.get_strategy(strategy).from_final(final)
    _sync.run(tmp.create())
    prepared = tree_snapshot.prepare(tree if tree is not None else {"w": np.arange(6.0)})
    _sync.run(tree_write.write(tmp.backend, tmp.get(), prepared))
    _sync.run(tmp.finalize())


def test_ls_shows_states(tmp_path: Path) -> None:
    _save(tmp_path / "1")
    _save(tmp_path / "2", "commit_file")
    _sync.run(ckpt.get_strategy("rename").from_final(tmp_path / "3").create())
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "data").write_bytes(b"copied without its marker")
    result = runner.invoke(app, ["ls", str(tmp_path), "--atomicity", "commit_file"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│")}
    assert "finalized" in lines["1"]  # rename writes the marker too
    assert "finalized" in lines["2"]
    assert "temporary" in lines[next(n for n in lines if n.startswith("3.orbax"))]
    assert "unknown" in lines["4"]
    assert not any(".ckpt-writer-" in n for n in lines)  # step 2's files are shown as step 2


def test_gc_dry_run_then_remove(tmp_path: Path) -> None:
    _save(tmp_path / "1")
    tmp = ckpt.get_strategy("rename").from_final(tmp_path / "2")
    _sync.run(tmp.create())
    (tmp_path / "3").mkdir()  # unknown under commit_file, finalized under rename: kept
    (tmp_path / "3" / "weights.h5").write_bytes(b"x")
    (tmp_path / "4").mkdir()  # empty: what an interrupted commit_file commit leaves
    result = runner.invoke(app, ["gc", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0 and "would remove" in result.output
    assert tmp.get().exists()
    result = runner.invoke(app, ["gc", str(tmp_path)])
    assert result.exit_code == 0 and "removed 2" in result.output
    assert not tmp.get().exists()
    assert sorted(os.listdir(tmp_path)) == ["1", "3"]


def test_verify_ok_and_broken(tmp_path: Path) -> None:
    _save(tmp_path / "1", tree={"a": np.ones((3, 3), np.float32), "s": "x"})
    result = runner.invoke(app, ["verify", str(tmp_path / "1")])
    assert result.exit_code == 0 and "OK" in result.output, result.output
    (tmp_path / "1" / tree_format.TREE_FILE).write_text("{broken")
    result = runner.invoke(app, ["verify", str(tmp_path / "1")])
    assert result.exit_code == 1
    tmp = ckpt.get_strategy("rename").from_final(tmp_path / "2")
    _sync.run(tmp.create())
    result = runner.invoke(app, ["verify", str(tmp.get())])
    assert result.exit_code == 1 and "temporary" in result.output


def test_backends_lists_local_and_resolution(tmp_path: Path) -> None:
    result = runner.invoke(app, ["backends", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "LocalBackend" in result.output and "atomic_dir_rename" in result.output
    assert "atomicity rename" in result.output


def test_console_script_runs(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "ckpt"
    proc = subprocess.run([str(exe), "ls", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "no checkpoints here" in proc.stdout


def test_demo_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "ckpt")
    env = dict(os.environ, COLUMNS="200", JAX_PLATFORMS="cpu")
    first = subprocess.run(
        [exe, "demo", str(tmp_path / "run"), "--steps", "4", "--max-to-keep", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    assert "training from scratch" in first.stdout and "identical" in first.stdout
    assert ckpt.checkpoint_steps(tmp_path / "run") == [2, 3]
    second = subprocess.run(
        [exe, "demo", str(tmp_path / "run"), "--steps", "2", "--max-to-keep", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr
    assert "resuming from step 3" in second.stdout
    assert ckpt.checkpoint_steps(tmp_path / "run") == [4, 5]
    assert ckpt.all_temporary_paths(tmp_path / "run") == []
