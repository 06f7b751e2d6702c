"""Saves in progress when the script ends (no ``close()``) are finished before the process
exits, or the process exits non-zero with a message. Each case runs a real Python
subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run_script(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def test_issue_example_manager_save_without_close_commits(tmp_path: Path) -> None:
    proc = run_script(
        """
        import numpy as np, ckpt
        m = ckpt.CheckpointManager("run")
        m.save(0, {"w": np.ones(3)})      # script ends here, without close()
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cannot schedule new futures" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["0"]
    import ckpt

    restored = ckpt.Checkpointer().restore(tmp_path / "run" / "0")
    assert restored["w"].tolist() == [1.0, 1.0, 1.0]


def test_pending_saves_of_every_object_finish_at_exit(tmp_path: Path) -> None:
    # Several managers (with retention deletions queued) and a bare AsyncCheckpointer,
    # large enough that the writes are still running when the script ends.
    proc = run_script(
        """
        import numpy as np, ckpt
        big = {"w": np.ones((4096, 1024), np.float32), "b": [np.arange(10)] * 20}
        a = ckpt.CheckpointManager("a", max_to_keep=2)
        for step in range(4):
            a.save(step, big)
        b = ckpt.CheckpointManager("b")
        b.save(7, big)
        c = ckpt.AsyncCheckpointer()
        c.save("c/0", big)
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["2", "3"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["7"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["0"]


def test_save_that_times_out_at_exit_exits_non_zero_with_a_message(tmp_path: Path) -> None:
    # The commit is held (a storage call that never returns); the save's timeout_secs ends
    # it, the temporary is discarded and the process reports it and exits 1.
    proc = run_script(
        """
        import numpy as np, ckpt
        from ckpt_conformance.instrumented import InstrumentedBackend
        backend = InstrumentedBackend(ckpt.get_backend("."))
        backend.gate("write_bytes:_TREE.json")   # never released
        c = ckpt.AsyncCheckpointer(backend=backend, timeout_secs=2)
        c.save("ck", {"w": np.ones(3)})
        print("script done", flush=True)
        """,
        tmp_path,
    )
    assert "script done" in proc.stdout
    assert proc.returncode == 1
    assert "could not be finished at interpreter exit" in proc.stderr
    assert "TimeoutError" in proc.stderr and "timeout_secs=2" in proc.stderr
    assert not (tmp_path / "ck").exists()
    assert not any(tmp_path.iterdir())  # the temporary was discarded


def test_failed_save_at_exit_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the checkpoint's parent should be")
    proc = run_script(
        """
        import numpy as np, ckpt
        m = ckpt.CheckpointManager("blocker/run", cleanup_tmp_directories=False)
        m.save(0, {"w": np.ones(3)})
        """,
        tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "could not be finished at interpreter exit" in proc.stderr
    assert "blocker" in proc.stderr


@pytest.mark.parametrize("closed", [True, False])
def test_exit_hook_is_quiet_when_nothing_is_pending(tmp_path: Path, closed: bool) -> None:
    proc = run_script(
        f"""
        import numpy as np, ckpt
        m = ckpt.CheckpointManager("run")
        m.save(0, {{"w": np.ones(3)}})
        m.wait_until_finished()
        if {closed}:
            m.close()
        """,
        tmp_path,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""


def _wait_for_failure(name: str) -> str:
    """Script lines: wait until the background save of manager ``name`` has failed (its
    step is dropped from all_steps), then end the script without collecting the error."""
    return textwrap.dedent(f"""
        import time
        deadline = time.monotonic() + 60
        while {name}.all_steps() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        print("failed before exit", {name}.all_steps(), flush=True)
        """)


def test_save_that_failed_before_exit_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the checkpoint's parent should be")
    proc = run_script(
        textwrap.dedent("""
        import numpy as np, ckpt
        m = ckpt.CheckpointManager("blocker/run", cleanup_tmp_directories=False)
        m.save(0, {"w": np.ones(3)})
        """)
        + _wait_for_failure("m"),
        tmp_path,
    )
    assert "failed before exit []" in proc.stdout, proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert "failed and its error was never collected" in proc.stderr
    assert "blocker" in proc.stderr
    # Nobody collected it: its traceback is printed (once), after a one-line log record.
    assert proc.stderr.count("Traceback (most recent call last)") >= 1
    assert proc.stderr.count("failed (raised by the next call)") == 1


def test_save_on_a_read_only_mount_exits_non_zero(tmp_path: Path) -> None:
    """The reported case: a read-only file system, no close(); the save has failed by the
    time the script ends."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root (CI runs the tests as root)")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        proc = run_script(
            textwrap.dedent(f"""
            import numpy as np, ckpt
            m = ckpt.CheckpointManager({str(mnt / "run")!r})
            m.save(50, {{"a": np.ones(3)}})
            """)
            + _wait_for_failure("m"),
            tmp_path,
        )
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
    assert "failed before exit []" in proc.stdout, proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert "Read-only file system" in proc.stderr
