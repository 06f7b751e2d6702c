"""Entry for ``pytest --pyargs ckpt_conformance --ckpt-root URL``."""

from __future__ import annotations

import uuid

import pytest

from ckpt_conformance import BackendConformance


class TestConformance(BackendConformance):
    @pytest.fixture
    def ckpt_root(self, request: pytest.FixtureRequest) -> str:
        root = request.config.getoption("--ckpt-root")
        if not root:
            pytest.skip("pass --ckpt-root URL to run the ckpt conformance suite on a store")
        return f"{str(root).rstrip('/')}/ckpt-conformance-{uuid.uuid4().hex[:12]}"
