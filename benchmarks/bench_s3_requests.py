"""Benchmark: HTTP requests that ckpt sends to S3 for a save and for discovery.

Starts moto on 127.0.0.1 and a counting reverse proxy in front of it (also on 127.0.0.1:
``ckpt_conformance.http_faults.FaultProxy``, never armed, with a hook that counts); ckpt's
S3 backend, and tensorstore through the backend's kvstore spec, talk to the proxy, so every
request is counted at the HTTP level, whoever sends it. Prints the requests by kind for:

* one small ``commit_file`` save: create, a few small files via ``backend.write_bytes``,
  finalize (target: the data PUTs + at most 3 more);
* one small pytree save through ``ckpt.tree_format`` (prepare + write) inside a commit;
* ``find_all`` / ``checkpoint_steps`` over 1,000 committed steps (target: LIST pages only,
  ceil(names / 1000) of them).

Usage::

    python benchmarks/bench_s3_requests.py [--steps 1000] [--files 3]

Needs ``moto[s3]``, ``flask``, ``flask-cors``, ``boto3`` and the ``ckpt-backend-s3`` and
``ckpt-conformance`` distributions (``pip install -e backends/s3 -e conformance_tests``). No
network beyond loopback; the AWS credentials in this process are replaced by dummy ones so
none is ever sent anywhere.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

_REPO = Path(__file__).resolve().parent.parent
for _sub in ("core", "backends/local", "backends/s3", "plugins", "conformance_tests"):
    if str(_REPO / _sub) not in sys.path:
        sys.path.append(str(_REPO / _sub))


def classify(method: str, target: str, headers: Any) -> str:
    """A short name for one S3 request: ``LIST``, ``GET``, ``HEAD``, ``PUT``,
    ``PUT if-none-match``, ``DELETE objects``, ``multipart ...``."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    path = parts.path.strip("/")
    is_bucket = "/" not in path
    if method == "GET" and is_bucket and "list-type" in query:
        return "LIST"
    if method == "GET" and is_bucket and "uploads" in query:
        return "LIST multipart uploads"
    if method == "POST" and "delete" in query:
        return "POST delete objects"
    if "uploads" in query and method == "POST":
        return "multipart create"
    if "uploadId" in query:
        kind = {"PUT": "part", "POST": "complete", "DELETE": "abort", "GET": "list parts"}
        return f"multipart {kind.get(method, method)}"
    if method == "PUT" and headers.get("If-None-Match"):
        return "PUT if-none-match"
    return method


class Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def take(self) -> collections.Counter[str]:
        with self._lock:
            out, self.counts = self.counts, collections.Counter()
        return out


def counting_proxy(port: int, counter: Counter) -> Any:
    """A request-counting HTTP proxy in front of the S3 server on 127.0.0.1:``port``
    (``ckpt_conformance.http_faults.FaultProxy``, never armed): ``.url``, ``.close()``."""
    from ckpt_conformance.http_faults import FaultProxy

    return FaultProxy(
        f"http://127.0.0.1:{port}",
        dialect="s3",
        on_request=lambda method, target, headers: counter.add(classify(method, target, headers)),
    )


def show(title: str, counts: collections.Counter[str], note: str = "") -> None:
    total = sum(counts.values())
    print(f"\n{title}: {total} requests" + (f"  ({note})" if note else ""))
    for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {kind:28s} {n:6d}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps for discovery")
    parser.add_argument("--files", type=int, default=3, help="small files in the save")
    args = parser.parse_args(argv)

    # Dummy credentials only: nothing real is ever sent, and only to 127.0.0.1.
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench-access-key",
        AWS_SECRET_ACCESS_KEY="bench-secret-key",
        AWS_EC2_METADATA_DISABLED="true",
    )
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    assert moto._server is not None
    moto_port = moto._server.server_port
    counter = Counter()
    proxy = counting_proxy(moto_port, counter)
    proxy_url = proxy.url
    bucket = "ckpt-bench"
    direct = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1"
    )
    direct.create_bucket(Bucket=bucket)

    with tempfile.TemporaryDirectory() as tmpdir:
        config = Path(tmpdir) / "ckpt.toml"
        config.write_text(f'[backends.s3]\nendpoint_url = "{proxy_url}"\n', encoding="utf-8")
        os.environ["CKPT_CONFIG"] = str(config)

        import ckpt
        from ckpt import _sync

        print(f"moto on 127.0.0.1:{moto_port}, counting proxy at {proxy_url}")
        root = f"s3://{bucket}/bench"
        strategy = ckpt.get_strategy("commit_file")
        backend = ckpt.get_backend(root)
        print(f"backend: {backend!r}")

        # Warm up the client (the first request opens the connection pool).
        _sync.run(backend.exists(backend.path(root) / "warmup"))
        counter.take()

        # 1. A small commit_file save.
        tmp = strategy.from_final(f"{root}/save/1")
        _sync.run(tmp.create())
        created = counter.take()
        for i in range(args.files):
            _sync.run(backend.write_bytes(tmp.get() / f"file_{i}.bin", os.urandom(1024)))
        data = counter.take()
        _sync.run(tmp.finalize())
        finalized = counter.take()
        show("save: create", created)
        show(f"save: {args.files} data files (backend.write_bytes)", data)
        show("save: finalize", finalized)
        overhead = sum(created.values()) + sum(finalized.values())
        print(
            f"  => a commit costs the {sum(data.values())} data PUTs + {overhead} requests "
            f"(of which {created['PUT'] + finalized['PUT']} are _CHECKPOINT_METADATA PUTs)"
        )

        # 2. A small pytree save through tree_format, inside a commit.
        try:
            from ckpt import tree_format, tree_read, tree_snapshot, tree_write
        except ImportError:
            tree_format = None  # type: ignore[assignment]
        if tree_format is not None and hasattr(tree_format, "prepare"):
            import numpy as np

            tree: dict[str, Any] = {
                "params": {
                    "w": np.arange(64, dtype=np.float32).reshape(8, 8),
                    "b": np.zeros(8, dtype=np.float32),
                },
                "step": 1,
            }
            tmp = strategy.from_final(f"{root}/tree/1")
            counter.take()
            _sync.run(tmp.create())
            prepared = tree_snapshot.prepare(tree)
            _sync.run(tree_write.write(backend, tmp.get() / "state", prepared))
            _sync.run(tmp.finalize())
            show(
                "pytree save (2 arrays + 1 scalar) via tree_format, create..finalize",
                counter.take(),
                "includes tensorstore's requests",
            )
            restored: Any = _sync.run(tree_read.read(backend, tmp.get() / "state"))
            assert np.array_equal(restored["params"]["w"], tree["params"]["w"])
            show("pytree read via tree_format", counter.take())
        else:
            print("\n(ckpt.tree_snapshot.prepare not available: pytree save skipped)")

        # 3. Discovery over N committed steps, each with its writer directory, as
        # commit_file leaves them (made directly on moto, not counted).
        n = args.steps
        base = "bench/steps"
        marker = b"Checkpoint commit was successful"

        def put_step(step: int) -> None:
            writer = f"{step}.ckpt-writer-{time.time_ns()}-1-{step:012x}"
            direct.put_object(
                Bucket=bucket,
                Key=f"{base}/{step}/commit_success.txt",
                Body=marker + f"\nckpt-writer: .ckpt-writers/{writer}\n".encode(),
            )
            direct.put_object(
                Bucket=bucket,
                Key=f"{base}/.ckpt-writers/{writer}/_CHECKPOINT_METADATA",
                Body=b"{}",
            )

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put_step, range(n)))
        counter.take()
        steps_root = f"s3://{bucket}/{base}"
        found = list(ckpt.standard_name_format().find_all(steps_root))
        assert len(found) == n, len(found)
        show(
            f"find_all over {n} steps",
            counter.take(),
            f"{n + 1} names listed: the steps + the one .ckpt-writers/ prefix",
        )
        assert len(ckpt.checkpoint_steps(steps_root)) == n
        show(f"checkpoint_steps over {n} steps", counter.take())
        latest = ckpt.latest_step_metadata(steps_root)
        assert latest is not None and latest.step == n - 1
        show("latest_step_metadata", counter.take())
        _sync.run(backend.remove_tree(backend.path(steps_root)))
        show(f"remove_tree of {n} steps ({2 * n} objects)", counter.take())

    proxy.close()
    moto.stop()


if __name__ == "__main__":
    main()
