"""Array I/O included: ckpt's HTTP fault conformance (``ckpt_conformance.http_faults``) on
fake-gcs-server, flat bucket and HNS bucket, through a fault-injecting proxy in front of
it. gcsfs (ckpt's own requests) is pointed at the proxy by ``endpoint_url``, tensorstore
(array data) by ``TENSORSTORE_GCS_HTTP_URL``; short timeouts make both give up on a
hanging request within seconds (``read_timeout_s`` here, tensorstore's
``TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS`` in conftest.py). Storage Control calls (the
HNS folder rename) are gRPC to the project's test server and do not pass the proxy."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ckpt import _sync
from ckpt.plugins import manager
from ckpt_backend_gcs import GCSBackend
from ckpt_conformance.http_faults import FaultProxy, HttpFaultConformance, ProxiedStore

#: gcsfs's connect and read timeouts through the proxy (the backend's defaults: 30 / 60).
TIMEOUT_S = 2


def _reset_instances() -> None:
    for instance in list(manager.registry().instances.values()):
        if isinstance(instance, GCSBackend):
            instance.close()
    manager.reset_instances()


class _GCSHttpFaults(HttpFaultConformance):
    http_hang_bound_s = 15.0
    bucket = ""

    @pytest.fixture
    def http_fault_store(
        self,
        fake_gcs: Any,
        gcs_options: dict[str, Any],
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> Iterator[ProxiedStore]:
        with FaultProxy(fake_gcs.url, dialect="gcs") as proxy:
            options = {
                **gcs_options,
                "endpoint_url": proxy.url,
                "connect_timeout_s": TIMEOUT_S,
                "read_timeout_s": TIMEOUT_S,
            }
            lines = []
            for scheme in ("gs", "gcs"):
                lines.append(f"[backends.{scheme}]")
                lines += [
                    f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"'
                    for key, value in options.items()
                ]
            config = tmp_path / "ckpt.toml"
            config.write_text("\n".join(lines) + "\n", encoding="utf-8")
            monkeypatch.setenv("CKPT_CONFIG", str(config))
            monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", proxy.url)
            monkeypatch.delenv("CKPT_ATOMICITY", raising=False)
            _reset_instances()
            try:
                yield ProxiedStore(proxy, f"gs://{self.bucket}/http-faults-{uuid.uuid4().hex[:12]}")
            finally:
                _reset_instances()


class TestFlatBucketHttpFaults(_GCSHttpFaults):
    bucket = "ckpt-flat"


class TestHNSBucketHttpFaults(_GCSHttpFaults):
    bucket = "ckpt-hns"


def test_read_timeout_s_bounds_a_hanging_request(fake_gcs: Any) -> None:
    """``read_timeout_s`` reaches gcsfs: a request that hangs is given up after it (gcsfs's
    default was aiohttp's 300 s, then a failure) and retried, and the call succeeds."""
    with FaultProxy(fake_gcs.url, dialect="gcs") as proxy:
        backend = GCSBackend({"endpoint_url": proxy.url, "read_timeout_s": 1, "layout": "flat"})
        try:
            path = backend.path(f"gs://ckpt-flat/read-timeout-{uuid.uuid4().hex[:8]}")
            _sync.run(backend.write_bytes(path, b"x"))
            proxy.arm(1, "hang")
            start = time.monotonic()
            assert _sync.run(backend.read_bytes(path)) == b"x"
            took = time.monotonic() - start
        finally:
            backend.close()
        assert proxy.injected.startswith("GET "), proxy.injected
        assert len(proxy.hangs) == 1 and proxy.hangs[0] is not None
        assert 0.8 < proxy.hangs[0] < 5, proxy.hangs
        assert took < 10, took
