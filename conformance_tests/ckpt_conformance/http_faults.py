"""HTTP faults, array I/O included: a fault-injecting HTTP proxy and the conformance tests
that save through it.

:class:`FaultProxy` is a real HTTP/1.1 reverse proxy on 127.0.0.1 in front of a test
server (an S3 or GCS emulator, ...). It forwards every request and counts it; after
:meth:`FaultProxy.arm` it faults the k-th request from then on, once, in one of four ways:

* ``fail``: answer 503 without forwarding (the request did not take effect); the body is in
  the store's dialect (S3 ``SlowDown`` XML, a GCS JSON error, or plain text), so that every
  client sees a retryable throttling answer;
* ``reset``: close the connection without forwarding or answering;
* ``after``: forward it (it takes effect), then close the connection without answering
  (the lost acknowledgement);
* ``hang``: hold it, neither forwarding nor answering, until the client gives up and
  closes the connection (or ``hang_limit_s`` passes: then the client never gave up, which
  :attr:`FaultProxy.hangs` records and the tests fail on).

Every request counts, whoever sends it: ckpt's own client (botocore, gcsfs, ...) and
tensorstore's array reads and writes, as long as both are pointed at :attr:`FaultProxy.url`.

:class:`HttpFaultConformance` is the test class an HTTP backend's test module subclasses,
providing one fixture (``http_fault_store``) that returns a :class:`ProxiedStore`: a proxy
in front of the backend's test server and a fresh root URL whose traffic goes through it.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

import ckpt
from ckpt import _sync, tree_format

__all__ = ["DIALECTS", "MODES", "FaultProxy", "HttpFaultConformance", "ProxiedStore"]

#: The ways a request can be faulted (see the module docstring).
MODES = ("fail", "reset", "after", "hang")

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade",
}  # fmt: skip

#: The 503 answer of ``fail``, per store dialect: ``(content type, body)``. botocore retries
#: a 503 whose XML code is ``SlowDown``; gcsfs retries any 5xx (it parses a JSON error body
#: when there is one, and falls back to the text); tensorstore retries any 503.
DIALECTS: dict[str, tuple[str, bytes]] = {
    "s3": (
        "application/xml",
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>injected fault</Message></Error>",
    ),
    "gcs": (
        "application/json; charset=UTF-8",
        b'{"error": {"code": 503, "message": "injected fault", "errors": [{"domain": '
        b'"global", "reason": "backendError", "message": "injected fault"}]}}',
    ),
    "plain": ("text/plain; charset=utf-8", b"injected fault"),
}

#: Called for every request with ``(method, target, headers)`` (a counter, a log); the
#: headers are an :class:`email.message.Message` (case-insensitive ``get``).
RequestHook = Callable[[str, str, Message], None]


class FaultProxy:
    """A fault-injecting reverse proxy in front of ``upstream`` (``http://host:port``).

    Attributes:
        url: the proxy's own ``http://127.0.0.1:port``; point the clients at it.
        count: requests seen since the last :meth:`arm`.
        injected: ``METHOD target`` of the request that was faulted, once it was.
        hangs: for each ``hang`` injected, the seconds until the client gave up, or
            ``None`` when it had not given up after ``hang_limit_s`` (the proxy then closed
            the connection itself).
    """

    def __init__(
        self,
        upstream: str,
        *,
        dialect: str = "plain",
        hang_limit_s: float = 120.0,
        on_request: RequestHook | None = None,
    ) -> None:
        """Start serving at once (a daemon thread); :meth:`close` stops it.

        Args:
            upstream: the server to forward to, ``http://host:port``.
            dialect: the body of the injected 503, a key of :data:`DIALECTS`.
            hang_limit_s: how long a ``hang`` waits for the client to give up.
            on_request: called for every request before it is forwarded or faulted.
        """
        if dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {dialect!r}; known: {', '.join(DIALECTS)}")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 80
        self.dialect = dialect
        self.hang_limit_s = hang_limit_s
        self.on_request = on_request
        self.lock = threading.Lock()
        self.count = 0
        self.k = 0
        self.mode = "fail"
        self.injected = ""
        self.hangs: list[float | None] = []
        self._closing = threading.Event()
        self.server = self._serve()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def arm(self, k: int, mode: str = "fail") -> None:
        """Count requests from now; fault the ``k``-th in ``mode`` (``k=0``: none)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        with self.lock:
            self.count, self.k, self.mode, self.injected = 0, k, mode, ""
            self.hangs = []

    def close(self) -> None:
        """Stop serving (held requests are released: their connections are closed)."""
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    def _take(self, what: str) -> str | None:
        with self.lock:
            self.count += 1
            if self.k and self.count == self.k:
                self.injected = what
                return self.mode
            return None

    def _hold(self, conn: socket.socket) -> None:
        """The ``hang``: wait until the client closes ``conn`` (or the limit passes)."""
        start = time.monotonic()
        deadline = start + self.hang_limit_s
        gave_up = False
        while not self._closing.is_set() and time.monotonic() < deadline:
            try:
                readable, _, _ = select.select([conn], [], [], 0.05)
                if readable and conn.recv(1, socket.MSG_PEEK) == b"":
                    gave_up = True
                    break
                if readable:  # bytes of a next request, without waiting for an answer
                    time.sleep(0.05)
            except OSError:  # reset by the client: it gave up too
                gave_up = True
                break
        with self.lock:
            self.hangs.append(time.monotonic() - start if gave_up else None)

    def _rewrite_location(self, value: str) -> str:
        """Absolute redirects and upload session URLs that name the upstream name the proxy
        instead, so that the client's next request comes through here too."""
        if value.startswith(self.upstream):
            return self.url + value[len(self.upstream) :]
        return value

    def _serve(self) -> http.server.ThreadingHTTPServer:
        proxy = self
        local = threading.local()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _upstream(self, body: bytes, headers: dict[str, str]) -> tuple[Any, bytes]:
                for attempt in range(2):
                    conn = getattr(local, "conn", None)
                    if conn is None:
                        conn = local.conn = http.client.HTTPConnection(
                            proxy.host, proxy.port, timeout=60
                        )
                    try:
                        conn.request(self.command, self.path, body=body, headers=headers)
                        response = conn.getresponse()
                        return response, response.read()
                    except (http.client.HTTPException, OSError):
                        conn.close()
                        local.conn = None
                        if attempt:
                            raise
                raise AssertionError("unreachable")

            def _forward(self) -> None:
                if proxy.on_request is not None:
                    proxy.on_request(self.command, self.path, self.headers)
                body = self._body()
                fault = proxy._take(f"{self.command} {self.path}")
                if fault == "fail":
                    content_type, error = DIALECTS[proxy.dialect]
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(error)
                    return
                if fault in ("reset", "hang"):
                    if fault == "hang":
                        proxy._hold(self.connection)
                    self._drop()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers.pop("Expect", None)
                if body or self.command in ("PUT", "POST", "PATCH"):
                    headers["Content-Length"] = str(len(body))
                response, data = self._upstream(body, headers)
                if fault == "after":
                    self._drop()
                    return
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    lower = key.lower()
                    if lower in _HOP_BY_HOP or lower == "content-length":
                        continue
                    if lower == "location":
                        value = proxy._rewrite_location(value)
                    self.send_header(key, value)
                if self.command == "HEAD":
                    length = response.getheader("Content-Length")
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _forward

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


# -- the conformance tests -------------------------------------------------------------------


@dataclasses.dataclass
class ProxiedStore:
    """What a backend's ``http_fault_store`` fixture provides.

    Attributes:
        proxy: the :class:`FaultProxy` in front of the backend's test server.
        root: a fresh root URL; every request that ckpt makes for it (its own client's and
            tensorstore's) goes through ``proxy``.
    """

    proxy: FaultProxy
    root: str


#: Packing threshold during these tests (bytes): "w" of :func:`_tree` is above it, so it
#: is a zarr3 array whose chunks tensorstore writes and reads.
_PACK_MAX_LEAF_BYTES = 1024


def _tree(seed: int) -> dict[str, Any]:
    # "w" (16 KiB, one chunk) is a zarr3 array written by tensorstore; "b" is packed with the
    # tree's other small leaves, in a file ckpt's own client writes.
    return {"w": np.full((4, 64, 16), seed, np.float32), "b": np.arange(seed + 3)}


def _same(a: Any, b: Any) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _leftovers(root: str, strategy: str, steps: list[int]) -> list[str]:
    """What is under ``root`` besides the committed ``steps`` and their content
    directories (one level down)."""
    base = ckpt.registry.to_path(root)
    backend = ckpt.get_backend(root).bind(base)
    keep = {str(s) for s in steps}
    for step in steps:
        content = _sync.run(ckpt.content_path(backend, base / str(step), atomicity=strategy))
        keep.add(str(content)[len(str(base)) + 1 :])
    found: list[str] = []
    for entry in _sync.run(backend.list_dir(base)):
        if entry.name in keep:
            continue
        if any(k.startswith(entry.name + "/") for k in keep):
            inside = _sync.run(backend.list_dir(base / entry.name))
            names = [f"{entry.name}/{e.name}" for e in inside]
            found += [name for name in names if name not in keep]
        else:
            found.append(entry.name)
    return found


def _strategy_names() -> list[str]:
    return list(ckpt.list_strategies())


class HttpFaultConformance:
    """A save whose k-th HTTP request is faulted, for every strategy the backend supports,
    every mode of :data:`MODES` and k spread over every request of the save.

    Subclass it and provide the ``http_fault_store`` fixture::

        class TestMyStoreHttpFaults(HttpFaultConformance):
            @pytest.fixture
            def http_fault_store(self, my_server):
                with FaultProxy(my_server.url, dialect="plain") as proxy:
                    ...  # point ckpt's client and tensorstore at proxy.url
                    yield ProxiedStore(proxy, f"mystore://bucket/{uuid.uuid4().hex}")

    The clients must give up on a hanging request (``hang``) within
    ``http_hang_bound_s``: configure short timeouts in the fixture (the defaults of most
    clients are a minute or more).

    One root per test: step 0 is saved clean, step 1 is saved clean while the requests are
    counted (N), then one step per sampled k is saved with the k-th request faulted. After
    each fault: the step is committed and restores exactly (the arrays compared), or it is
    invisible to discovery and the save raised an error with a message; every step
    committed before is still listed; cleanup leaves no temporaries and nothing else under
    the root but the committed steps; the next save of the step succeeds. At the end, steps
    0 and 1, committed before the first fault, restore exactly with checksums verified.
    ``CKPT_HTTP_FAULTS_VERBOSE=1`` prints each faulted request and how the save went.
    """

    #: Values of k per strategy and mode. The modes take turns over positions evenly
    #: spread from the first request to the last, so with 1 the four modes together fault
    #: the first request, two in between and the last (``CKPT_FAULT_ALL_CALLS=1``: every
    #: mode faults every k from 1 to N).
    http_fault_sample: int = 1
    #: Seconds within which the client must give up on a hanging request.
    http_hang_bound_s: float = 30.0

    @pytest.fixture
    def http_fault_store(self) -> Iterator[ProxiedStore]:
        raise NotImplementedError(
            "Provide an `http_fault_store` fixture returning a ProxiedStore (a FaultProxy in "
            "front of your test server and a root URL whose traffic goes through it)."
        )

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize ``http_strategy`` with the strategies registered at collection time."""
        if "http_strategy" in metafunc.fixturenames:
            metafunc.parametrize("http_strategy", _strategy_names())
        parent = getattr(super(), "pytest_generate_tests", None)
        if parent is not None:
            parent(metafunc)

    def _ks(self, n: int, mode: str) -> list[int]:
        if os.environ.get("CKPT_FAULT_ALL_CALLS") == "1":
            return list(range(1, n + 1))
        m = max(self.http_fault_sample * len(MODES), 2)
        spread = [1 + round(i * (n - 1) / (m - 1)) for i in range(m)]
        return sorted(set(spread[MODES.index(mode) :: len(MODES)]))

    @pytest.mark.parametrize("mode", MODES)
    def test_http_fault_at_every_request(
        self,
        http_fault_store: ProxiedStore,
        http_strategy: str,
        mode: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", _PACK_MAX_LEAF_BYTES)
        proxy, root, strategy = http_fault_store.proxy, http_fault_store.root, http_strategy
        backend = ckpt.get_backend(root).bind(ckpt.registry.to_path(root))
        works = ckpt.registry.supported_strategies(backend)
        if strategy not in works:
            pytest.skip(f"{backend.describe()} does not support {strategy!r} (it supports {works})")
        plain = ckpt.Checkpointer(strategy)
        verified = ckpt.Checkpointer(strategy, verify_checksums=True)

        def final(step: int) -> str:
            return f"{root}/{step}"

        proxy.arm(0)
        plain.save(final(0), _tree(0))
        committed = {0: _tree(0)}
        proxy.arm(0)
        ckpt.Checkpointer(strategy).save(final(1), _tree(1))
        n = proxy.count
        assert n > 3, f"only {n} requests went through the proxy: is the fixture's root on it?"
        committed[1] = _tree(1)
        injected = 0
        for step, k in enumerate(self._ks(n, mode), start=2):
            tree = _tree(step)
            proxy.arm(k, mode)
            start = time.monotonic()
            raised: BaseException | None = None
            try:
                ckpt.Checkpointer(strategy).save(final(step), tree)
            except (OSError, RuntimeError, ValueError) as exc:
                raised = exc
            took = time.monotonic() - start
            fault, hangs = proxy.injected, list(proxy.hangs)
            proxy.arm(0)
            injected += bool(fault)
            where = (
                f"{strategy}, {mode} request {k} of {n} ({fault or 'none reached'}), "
                f"raised {raised!r}, {took:.1f} s"
            )
            if os.environ.get("CKPT_HTTP_FAULTS_VERBOSE") == "1":
                print(where, f"hangs={hangs}")
            if mode == "hang" and fault:
                assert hangs and hangs[0] is not None, (
                    f"{where}: the client never gave up on the hanging request "
                    f"(held {proxy.hang_limit_s:g} s): it needs a read timeout"
                )
                assert hangs[0] <= self.http_hang_bound_s, (
                    f"{where}: the client gave up only after {hangs[0]:.1f} s"
                )
            if raised is not None:
                assert str(raised), f"{where}: an error without a message"
            steps = ckpt.checkpoint_steps(root, atomicity=strategy)
            lost = sorted(set(committed) - set(steps))
            assert not lost, f"{where}: committed steps {lost} lost"
            assert set(steps) <= set(committed) | {step}, f"{where}: unexpected steps {steps}"
            if step in steps:
                assert _same(plain.restore(final(step)), tree), f"{where}: committed but torn"
            else:
                assert raised is not None, f"{where}: reported success, not committed"
            ckpt.cleanup_temporary_paths(root, atomicity=strategy)
            assert ckpt.all_temporary_paths(root, atomicity=strategy) == [], where
            left = _leftovers(root, strategy, steps)
            assert not left, f"{where}: leftovers after cleanup {left}"
            if step not in steps:
                plain.save(final(step), tree)  # the next save of the step succeeds
                assert _same(plain.restore(final(step)), tree), f"{where}: the next save"
            committed[step] = tree
        assert injected >= max(1, len(self._ks(n, mode)) - 1), (
            f"only {injected} faults were injected"
        )
        assert ckpt.checkpoint_steps(root, atomicity=strategy) == sorted(committed)
        for step in (0, 1):  # committed before the first fault, intact after the last
            assert _same(verified.restore(final(step)), _tree(step)), f"step {step} changed"
