"""The local POSIX backend passes the shared conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_conformance import BackendConformance


class TestLocalConformance(BackendConformance):
    @pytest.fixture
    def ckpt_root(self, tmp_path: Path) -> str:
        return str(tmp_path / "root")
