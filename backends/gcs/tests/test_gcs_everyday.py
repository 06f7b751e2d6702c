"""Everyday correctness on GCS (flat and hierarchical-namespace buckets of the test
servers): saves pending at interpreter exit, storage errors users can catch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from upath import UPath

import ckpt


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),  # CKPT_CONFIG and tensorstore's test endpoint
    )


def test_manager_save_without_close_commits_at_exit(ckpt_config: str, root: UPath) -> None:
    url = str(root)
    proc = run_script(
        f"""
        import numpy as np, ckpt
        m = ckpt.CheckpointManager({url!r}, max_to_keep=1)
        m.save(0, {{"w": np.ones((512, 1024))}})
        m.save(1, {{"w": np.full((512, 1024), 2.0)}})
        """
    )
    assert proc.returncode == 0, proc.stderr
    with ckpt.CheckpointManager(url) as mngr:
        assert mngr.all_steps() == [1]
        assert float(mngr.restore()["w"][0, 0]) == 2.0
