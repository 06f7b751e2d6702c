"""A fault-injecting HTTP proxy in front of an S3 test server (after the request-counting
proxy of ``benchmarks/bench_s3_requests.py``): it forwards every request, and fails the
k-th one after :meth:`FaultProxy.arm`, once, in one of three ways:

* ``fail``: answer ``503 SlowDown`` without forwarding (the request did not take effect);
* ``reset``: close the connection without forwarding or answering;
* ``after``: forward it (it takes effect), then close the connection without answering
  (the lost acknowledgement).

Every request counts: ckpt's own (botocore) and tensorstore's array reads and writes.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade",
}  # fmt: skip
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>injected fault</Message></Error>"
)
MODES = ("fail", "reset", "after")


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.lock = threading.Lock()
        self.count = 0
        self.k = 0
        self.mode = "fail"
        #: ``METHOD path`` of the request that was failed, once it was.
        self.injected = ""
        self.server = self._serve()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def arm(self, k: int, mode: str = "fail") -> None:
        """Count requests from now; fail the ``k``-th (0: none)."""
        with self.lock:
            self.count, self.k, self.mode, self.injected = 0, k, mode, ""

    def _take(self, what: str) -> str | None:
        with self.lock:
            self.count += 1
            if self.k and self.count == self.k:
                self.injected = what
                return self.mode
            return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

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

            def _forward(self) -> None:
                body = self._body()
                fault = proxy._take(f"{self.command} {self.path}")
                if fault == "fail":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOW_DOWN)
                    return
                if fault == "reset":
                    self._drop()
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP
                }
                headers.pop("Expect", None)
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                for attempt in range(2):
                    conn = getattr(local, "conn", None)
                    if conn is None:
                        conn = local.conn = http.client.HTTPConnection(
                            proxy.host, proxy.port, timeout=60
                        )
                    try:
                        conn.request(self.command, self.path, body=body, headers=headers)
                        response = conn.getresponse()
                        data = response.read()
                        break
                    except (http.client.HTTPException, OSError):
                        conn.close()
                        local.conn = None
                        if attempt:
                            raise
                if fault == "after":
                    self._drop()
                    return
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
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

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
