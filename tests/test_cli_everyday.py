"""The CLI's everyday mistakes (one line on stderr, non-zero exit, no traceback), ls of
non-step directories, gc --older-than by modification time, the demo's hint; plain
progress lines without a terminal; FileOptions' mode on every directory. Real
subprocesses, real files."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import tree_format

CKPT = [sys.executable, "-m", "ckpt"]


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [*CKPT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250", **(env or {})},
        cwd=cwd,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "╭" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_scheme_is_backend_not_installed() -> None:
    proc = cli("ls", "foo://b/x")
    assert_one_line_error(proc, "BackendNotInstalledError", "foo://", "Install")
    with pytest.raises(ckpt.BackendNotInstalledError):
        ckpt.Checkpointer().restore("foo://b/x")


def test_missing_credentials_name_the_variables(tmp_path: Path) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_PROFILE": "",
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        [*CKPT, "ls", "s3://some-bucket/run"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **{k: v for k, v in env.items() if v}},
    )
    assert_one_line_error(proc, "credentials", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    proc = cli(
        "ls",
        "gs://some-bucket/run",
        env={"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json")},
    )
    assert_one_line_error(proc, "credentials", "GOOGLE_APPLICATION_CREDENTIALS")


def test_missing_path_and_file_instead_of_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for command in ("ls", "gc"):
        assert_one_line_error(cli(command, str(missing)), str(missing), "does not exist")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for command in ("ls", "gc"):
        assert_one_line_error(cli(command, str(afile)), str(afile), "is a file")
    assert_one_line_error(cli("verify", str(missing)), str(missing), "does not exist")
    assert_one_line_error(cli("demo", str(afile)), str(afile), "is a file")
    assert afile.read_text() == "x"


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = cli("--debug", "ls", str(tmp_path / "nope"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unknown_strategy(tmp_path: Path) -> None:
    proc = cli("ls", str(tmp_path), "--atomicity", "nope")
    assert_one_line_error(proc, "Unknown atomicity strategy 'nope'", "rename")


def test_verify_on_a_checkpoint_root(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(3, {"w": np.ones(2)})
    proc = cli("verify", str(tmp_path / "run"))
    assert_one_line_error(proc, "checkpoint root", f"{tmp_path / 'run'}/<step>")
    assert cli("verify", str(tmp_path / "run" / "3")).returncode == 0


def test_ls_lists_non_step_directories_apart(tmp_path: Path) -> None:
    with ckpt.CheckpointManager(tmp_path, async_save=False) as mngr:
        mngr.save(1, {"w": np.ones(2)})
    (tmp_path / "notes").mkdir()  # not empty (an empty directory is a leftover to clean up)
    (tmp_path / "notes" / "todo.txt").write_text("more layers")
    (tmp_path / "step_7").mkdir()
    (tmp_path / "step_7" / "data").write_text("?")
    proc = cli("ls", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert any(" 1 " in r and "finalized" in r for r in rows)
    assert any("step_7" in r for r in rows)
    assert not any("notes" in r for r in rows)
    assert "not checkpoint steps" in proc.stdout and "notes/" in proc.stdout


def test_gc_older_than_spares_young_temporaries_by_mtime(tmp_path: Path) -> None:
    young = tmp_path / "5.orbax-checkpoint-tmp"  # Orbax's name: no time in it
    young.mkdir()
    (young / "data").write_bytes(b"being written")
    old = tmp_path / "4.orbax-checkpoint-tmp"
    old.mkdir()
    (old / "data").write_bytes(b"abandoned")
    hour_ago = time.time() - 3600
    for p in (old / "data", old):
        os.utime(p, (hour_ago, hour_ago))
    proc = cli("gc", str(tmp_path), "--older-than", "600")
    assert proc.returncode == 0, proc.stderr
    assert young.exists() and not old.exists()
    assert "sparing 1" in proc.stdout
    # A temporary with a recent file deep inside is young too.
    os.utime(young, (hour_ago, hour_ago))
    assert cli("gc", str(tmp_path), "--older-than", "600").returncode == 0
    assert young.exists()
    assert cli("gc", str(tmp_path)).returncode == 0
    assert not young.exists()


def test_demo_hint_works_from_the_readme_setup(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "ckpt"
    proc = subprocess.run(
        [str(exe), "demo", "d", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "250", "PATH": "/usr/bin:/bin"},  # no venv on PATH
    )
    assert proc.returncode == 0, proc.stderr
    hint = [line for line in proc.stdout.splitlines() if line.startswith("run ")][-1]
    command = hint.removeprefix("run ").removesuffix(" to see the checkpoints")
    ran = subprocess.run(
        command,
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    )
    assert ran.returncode == 0, (command, ran.stderr)
    assert "finalized" in ran.stdout
    assert shlex.split(command)[-2:] == ["ls", "d"]


def test_progress_without_a_terminal_prints_plain_lines(tmp_path: Path) -> None:
    code = (
        "import numpy as np, ckpt\n"
        "c = ckpt.Checkpointer(progress=True)\n"
        f"c.save({str(tmp_path / 'c')!r}, {{'a': np.ones(1000), 'b': np.ones(3000)}})\n"
        f"c.restore({str(tmp_path / 'c')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.strip() for line in lines), repr(proc.stderr)
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    assert any(line.startswith(f"saving {tmp_path / 'c'}: 100%") for line in lines)
    assert any(line.startswith(f"restoring {tmp_path / 'c'}: 100%") for line in lines)


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
@pytest.mark.parametrize("async_save", [False, True])
def test_path_permission_mode_on_every_directory(
    tmp_path: Path, strategy: str, async_save: bool
) -> None:
    old = os.umask(0o077)
    try:
        options = ckpt.FileOptions(path_permission_mode=0o751)
        with ckpt.CheckpointManager(
            tmp_path / "a" / "b", atomicity=strategy, file_options=options, async_save=async_save
        ) as mngr:
            # A leaf large enough for its own zarr array (tensorstore makes its chunk
            # directories), the others packed.
            big = np.ones(2 * tree_format.PACK_MAX_LEAF_BYTES // 8)
            mngr.save(0, {"w": big, "l": [np.ones(2), {"x": np.zeros(1)}]})
    finally:
        os.umask(old)
    dirs = [Path(d) for d, _, _ in os.walk(tmp_path / "a")]
    assert len(dirs) > 5
    for d in dirs:
        assert oct(d.stat().st_mode & 0o777) == oct(0o751), d
