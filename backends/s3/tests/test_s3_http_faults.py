"""Array I/O included: ckpt's HTTP fault conformance (``ckpt_conformance.http_faults``) on
moto and on SeaweedFS, through a fault-injecting proxy in front of each. botocore (ckpt's
own requests) and tensorstore (array data) both go through it; short timeouts make both
give up on a hanging request within seconds (``read_timeout_s`` here, tensorstore's
``TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS`` in conftest.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ckpt.plugins
import ckpt_backend_s3
from ckpt import _sync
from ckpt_conformance.http_faults import FaultProxy, HttpFaultConformance, ProxiedStore

#: botocore's connect and read timeouts through the proxy (the backend's defaults: 5 / 15).
TIMEOUT_S = 2


class TestS3HttpFaults(HttpFaultConformance):
    http_hang_bound_s = 15.0

    @pytest.fixture
    def http_fault_store(
        self, s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[ProxiedStore]:
        with FaultProxy(s3_server.endpoint, dialect="s3") as proxy:
            config = tmp_path / "ckpt.toml"
            config.write_text(
                f'[backends.s3]\nendpoint_url = "{proxy.url}"\n'
                f"connect_timeout_s = {TIMEOUT_S}\nread_timeout_s = {TIMEOUT_S}\n",
                encoding="utf-8",
            )
            monkeypatch.setenv("CKPT_CONFIG", str(config))
            monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
            ckpt.plugins.manager.reset_instances()
            yield ProxiedStore(
                proxy, f"s3://{s3_server.bucket}/http-faults-{uuid.uuid4().hex[:12]}"
            )
            ckpt.plugins.manager.reset_instances()


def test_read_timeout_s_bounds_a_hanging_request(s3_server: Any, tmp_path: Path) -> None:
    """``read_timeout_s`` reaches botocore: a request that hangs is given up after it (not
    after the default 15 s) and retried, and the call succeeds."""
    with FaultProxy(s3_server.endpoint, dialect="s3") as proxy:
        backend = ckpt_backend_s3.S3Backend({"endpoint_url": proxy.url, "read_timeout_s": 1})
        path = backend.path(f"s3://{s3_server.bucket}/read-timeout-{uuid.uuid4().hex[:8]}")
        _sync.run(backend.write_bytes(path, b"x"))
        proxy.arm(1, "hang")
        start = time.monotonic()
        assert _sync.run(backend.read_bytes(path)) == b"x"
        took = time.monotonic() - start
        assert proxy.injected.startswith("GET "), proxy.injected
        assert len(proxy.hangs) == 1 and proxy.hangs[0] is not None
        assert 0.8 < proxy.hangs[0] < 5, proxy.hangs
        assert took < 10, took
