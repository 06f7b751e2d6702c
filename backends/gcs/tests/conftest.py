"""Fixtures of the GCS backend tests: a real fake-gcs-server (JSON API emulator) and the
project's Storage Control TEST SERVER, both on 127.0.0.1 and started here.

Two buckets: ``ckpt-flat`` (flat) and ``ckpt-hns`` (reported as hierarchical namespace by
the test server). Every test works under its own random prefix.
"""

from __future__ import annotations

import os

# gcsfs >= 2026 turns on its experimental HNS code at import unless told otherwise; against
# the emulator every operation would then wait ~60 s for a Storage Control API over TLS.
# ckpt_backend_gcs never uses that code path, but raw gcsfs in these tests would.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
# tensorstore (libcurl) gives up on a transfer that moved under 256 bytes/s for this many
# seconds (default 60), then retries it. It reads the variable once, when it makes its
# first HTTP request, hence here, before any test: the HTTP fault tests hang requests and
# must not wait a minute for each (a healthy local server answers in milliseconds).
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "3")

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from upath import UPath

from ckpt import _sync
from ckpt.plugins import manager
from ckpt_backend_gcs import GCSBackend, GCSBucketBackend
from ckpt_backend_gcs.testing import FakeGCS, StorageControlTestServer

FLAT_BUCKET = "ckpt-flat"
HNS_BUCKET = "ckpt-hns"


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[FakeGCS]:
    with FakeGCS() as server:
        server.create_bucket(FLAT_BUCKET)
        server.create_bucket(HNS_BUCKET)
        # tensorstore's gcs driver has no endpoint member: it reads these (only for array
        # data; the backend itself gets the endpoint through its options).
        saved = {k: os.environ.get(k) for k in _TS_ENV}
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "test-token"
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


_TS_ENV = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


@pytest.fixture(scope="session")
def storage_control(fake_gcs: FakeGCS) -> Iterator[StorageControlTestServer]:
    with StorageControlTestServer(fake_gcs.url, hns_buckets=[HNS_BUCKET]) as server:
        yield server


@pytest.fixture(scope="session")
def gcs_options(fake_gcs: FakeGCS, storage_control: StorageControlTestServer) -> dict[str, Any]:
    """The ``[backends.gs]`` table that points the backend at the test servers."""
    return {
        "endpoint_url": fake_gcs.url,
        "storage_control_endpoint": storage_control.endpoint,
    }


@pytest.fixture(scope="session")
def gcs_backend(gcs_options: dict[str, Any]) -> Iterator[GCSBackend]:
    backend = GCSBackend(gcs_options)
    yield backend
    backend.close()


@pytest.fixture
def flat(gcs_backend: GCSBackend) -> GCSBucketBackend:
    return gcs_backend.bind(f"gs://{FLAT_BUCKET}/")


@pytest.fixture
def hns(gcs_backend: GCSBackend) -> GCSBucketBackend:
    return gcs_backend.bind(f"gs://{HNS_BUCKET}/")


@pytest.fixture(params=["flat", "hns"])
def bucket_backend(request: pytest.FixtureRequest, gcs_backend: GCSBackend) -> GCSBucketBackend:
    """The view of each bucket in turn."""
    bucket = FLAT_BUCKET if request.param == "flat" else HNS_BUCKET
    return gcs_backend.bind(f"gs://{bucket}/")


def _fresh(bucket: str) -> UPath:
    return UPath(f"gs://{bucket}/t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def root(bucket_backend: GCSBucketBackend) -> UPath:
    """A fresh prefix in the bucket of ``bucket_backend``."""
    return _fresh(bucket_backend.bucket)


@pytest.fixture
def flat_root() -> UPath:
    return _fresh(FLAT_BUCKET)


@pytest.fixture
def hns_root() -> UPath:
    return _fresh(HNS_BUCKET)


@pytest.fixture(scope="session")
def raw_fs(fake_gcs: FakeGCS) -> Any:
    """Plain gcsfs (sync API) to check what the backend did, out of band."""
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(
        endpoint_url=fake_gcs.url,
        token="anon",
        project="test",
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@pytest.fixture
def run() -> Any:
    """Run a coroutine on ckpt's I/O loop (where the backend's clients live)."""
    return _sync.run


@pytest.fixture
def ckpt_config(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, gcs_options: dict[str, Any]
) -> Iterator[str]:
    """A ckpt config file with ``[backends.gs]`` and ``[backends.gcs]`` for the test servers
    (``CKPT_CONFIG`` names it); backend instances are rebuilt around the test."""
    lines = []
    for scheme in ("gs", "gcs"):
        lines.append(f"[backends.{scheme}]")
        lines += [f'{key} = "{value}"' for key, value in gcs_options.items()]
    path = tmp_path / "ckpt.toml"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("CKPT_CONFIG", str(path))
    monkeypatch.delenv("CKPT_ATOMICITY", raising=False)
    _reset_instances()
    yield str(path)
    _reset_instances()


def _reset_instances() -> None:
    for instance in list(manager.registry().instances.values()):
        if isinstance(instance, GCSBackend):
            instance.close()
    manager.reset_instances()
