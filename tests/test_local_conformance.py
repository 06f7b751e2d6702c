"""The local POSIX backend passes the shared conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_conformance import BackendConformance


class TestLocalConformance(BackendConformance):
    @pytest.fixture
    def ckpt_root(self, tmp_path: Path) -> str:
        return str(tmp_path / "root")


def test_suite_runs_against_a_root_url(tmp_path: Path) -> None:
    """`pytest --pyargs ckpt_conformance --ckpt-root URL` (the pytest11 plugin's option)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "ckpt_conformance",
            "--ckpt-root",
            str(tmp_path),
            "-k",  # TestLocalConformance runs these (a fault at every call: ~80 s)
            "not fault_at_every_call",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert any(p.name.startswith("ckpt-conformance-") for p in tmp_path.iterdir())
