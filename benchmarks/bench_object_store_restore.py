"""Benchmark: restores of large arrays from S3 and GCS against raw tensorstore reads.

Starts the servers itself on 127.0.0.1: moto for S3 (``--stores s3``) and
fake-gcs-server for GCS (``--stores gcs``). For each store it saves one tree of large
float32 arrays with ckpt (``--arrays 16x32``: 16 arrays of 32 MiB; ``4x128``: 4 arrays of
128 MiB, two 64 MiB chunks each), then, ``--repeats`` times, in an order that rotates
from round to round, in the same process:

* ``ckpt restore -> numpy``: ``ckpt.Checkpointer().restore(path)`` (commit checks,
  ``_TREE.json``, manifest, one listing, the arrays);
* ``ckpt restore -> jax``: the same with a ``jax.ShapeDtypeStruct`` target (CPU);
* ``ckpt restore -> numpy, verify_checksums``: with the CRC32C of every file checked
  (``--verify``; it reads every chunk twice, see docs/performance.md);
* ``raw tensorstore read``: the reference. tensorstore opens each zarr3 array ckpt wrote
  (``ts.open``, which GETs its ``zarr.json``) and reads it whole (``.read()``), all arrays
  concurrently, with a fresh ``ts.Context`` per round as ckpt uses one per restore. That
  is what a tensorstore user reading these arrays would write, it yields the same numpy
  arrays, and it skips everything ckpt adds (commit checks, tree document, manifest,
  listing). Reading the chunk objects as plain kvstore values (``KvStore.read``) is no
  fairer floor: through the Python API it was 8x (S3) to 30x (GCS) slower than the
  zarr3 read on this machine.

Prints median and min-max seconds, MB/s, and ckpt / raw ratios of the medians (target
<= 1.05). With ``--count`` (S3 only), one more untimed ckpt restore and raw read go
through a counting HTTP proxy and their requests are printed.

Usage::

    .venv/bin/python benchmarks/bench_object_store_restore.py [--stores s3,gcs]
        [--arrays 16x32,4x128] [--repeats 5] [--no-jax] [--verify] [--count]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import gc
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs >= 2026 would otherwise ask a Storage Control API over TLS (absent here).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import jax
import numpy as np
import tensorstore as ts
from upath import UPath

import ckpt
from ckpt.checkpointer import committed_content

MiB = 1024 * 1024


def make_tree(spec: str) -> dict[str, np.ndarray]:
    """``"16x32"``: 16 float32 arrays of 32 MiB each (rows of 1024 floats)."""
    count, mb = (int(x) for x in spec.split("x"))
    rng = np.random.default_rng(count * 1000 + mb)
    rows = mb * MiB // 4096
    return {f"w{i:02d}": rng.standard_normal((rows, 1024), np.float32) for i in range(count)}


def write_config(text: str) -> None:
    cfg = Path(tempfile.mkdtemp(prefix="ckpt-bench-cfg-")) / "ckpt.toml"
    cfg.write_text(text)
    os.environ["CKPT_CONFIG"] = str(cfg)


@contextmanager
def s3_server() -> Iterator[tuple[str, int]]:
    """moto on 127.0.0.1 with a bucket ``bench``; yields ``(root URL, moto's port)``."""
    from moto.server import ThreadedMotoServer

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true"
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        assert moto._server is not None
        port = moto._server.server_port
        url = f"http://127.0.0.1:{port}"
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
        write_config(f'[backends.s3]\nendpoint_url = "{url}"\n')
        yield "s3://bench", port
    finally:
        moto.stop()


@contextmanager
def gcs_server() -> Iterator[tuple[str, int]]:
    """fake-gcs-server on 127.0.0.1 with a bucket ``bench``; yields ``(root URL, port)``."""
    from ckpt_backend_gcs.testing import FakeGCS

    with FakeGCS() as server:
        server.create_bucket("bench")
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "bench"
        write_config(f'[backends.gs]\nendpoint_url = "{server.url}"\nlayout = "flat"\n')
        yield "gs://bench", server.port


SERVERS = {"s3": s3_server, "gcs": gcs_server}


def content_dir(path: str) -> UPath:
    """Where the committed checkpoint ``path`` keeps its files."""
    final, resolution = ckpt.Checkpointer()._resolve(path)
    return asyncio.run(committed_content(resolution, final))


class Raw:
    """Raw tensorstore reads of the arrays of one checkpoint (specs prepared untimed)."""

    def __init__(self, path: str, tree: dict[str, np.ndarray]) -> None:
        import json

        content = content_dir(path)
        backend = ckpt.get_backend(str(content))
        doc = json.loads(asyncio.run(backend.read_bytes(content / "_TREE.json")))
        self.specs = [
            {"driver": "zarr3", "kvstore": backend.kvstore_spec(content / m["path"])}
            for m in doc["leaves"]
            if m.get("path") and "offset" not in m
        ]
        assert len(self.specs) == len(tree), "every array should have its own zarr3 array"

    def read(self) -> list[np.ndarray]:
        async def run() -> list[np.ndarray]:
            context = ts.Context()
            stores = await asyncio.gather(
                *(ts.open(s, open=True, context=context) for s in self.specs)
            )
            return list(await asyncio.gather(*(s.read() for s in stores)))

        return asyncio.run(run())


def restore_jax(path: str, target: Any) -> Any:
    return jax.block_until_ready(ckpt.Checkpointer().restore(path, target))


def check(out: Any, tree: dict[str, np.ndarray]) -> None:
    values = out.values() if isinstance(out, dict) else out
    got = sorted((np.asarray(v) for v in values), key=lambda a: float(a.reshape(-1)[0]))
    want = sorted(tree.values(), key=lambda a: float(a.reshape(-1)[0]))
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def bench_store(
    store: str, sizes: list[str], repeats: int, jax_too: bool, verify: bool, count: bool
) -> list[tuple[str, str, str, list[float], int]]:
    rows: list[tuple[str, str, str, list[float], int]] = []
    with SERVERS[store]() as (root, port):
        for size in sizes:
            tree = make_tree(size)
            nbytes = sum(a.nbytes for a in tree.values())
            path = f"{root}/{size}"
            start = time.perf_counter()
            ckpt.Checkpointer().save(path, tree)
            print(
                f"{store} {size}: saved {nbytes / MiB:.0f} MiB in "
                f"{time.perf_counter() - start:.2f} s",
                flush=True,
            )
            raw = Raw(path, tree)
            target = {k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in tree.items()}
            restore = ckpt.Checkpointer().restore
            measures: dict[str, Callable[[], Any]] = {
                "raw tensorstore read": raw.read,
                "ckpt restore -> numpy": functools.partial(restore, path),
            }
            if jax_too:
                measures["ckpt restore -> jax"] = functools.partial(restore_jax, path, target)
            if verify:
                measures["ckpt restore -> numpy, verify"] = functools.partial(
                    ckpt.Checkpointer(verify_checksums=True).restore, path
                )
            times: dict[str, list[float]] = {k: [] for k in measures}
            names = list(measures)
            for name in names:  # one untimed warm-up each (connections, imports)
                check(measures[name](), tree)
            for r in range(repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    gc.collect()
                    t0 = time.perf_counter()
                    out = measures[name]()
                    times[name].append(time.perf_counter() - t0)
                    del out
            for name in names:
                rows.append((store, size, name, times[name], nbytes))
            if count and store == "s3":
                count_requests(port, path, raw)
    return rows


def count_requests(port: int, path: str, raw: Raw) -> None:
    """One ckpt restore and one raw read through a counting proxy in front of moto."""
    from bench_s3_requests import Counter, counting_proxy

    counter = Counter()
    proxy = counting_proxy(port, counter)
    url = proxy.url
    saved = os.environ["CKPT_CONFIG"]
    write_config(f'[backends.s3]\nendpoint_url = "{url}"\n')
    try:
        for spec in raw.specs:
            spec["kvstore"]["endpoint"] = url
        counter.take()
        raw.read()
        print(f"  raw tensorstore read: {dict(counter.take())} requests")
        ckpt.Checkpointer().restore(path)
        print(f"  ckpt restore: {dict(counter.take())} requests")
    finally:
        os.environ["CKPT_CONFIG"] = saved
        proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="s3,gcs")
    parser.add_argument("--arrays", default="16x32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--count", action="store_true")
    args = parser.parse_args()
    rows = []
    for store in args.stores.split(","):
        rows += bench_store(
            store, args.arrays.split(","), args.repeats, not args.no_jax, args.verify, args.count
        )
    print(
        f"\n{datetime.date.today()}; {os.cpu_count()} CPUs ({platform.machine()}); "
        f"load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}, order rotating"
    )
    print(
        f"{'store':5} {'arrays':7} {'measure':32} {'median s':>9} {'MB/s':>6} {'min-max s':>13}"
        f" {'/ raw':>6}"
    )
    raw_median: dict[tuple[str, str], float] = {}
    for store, size, name, values, nbytes in rows:
        med = statistics.median(values)
        if name == "raw tensorstore read":
            raw_median[(store, size)] = med
        ratio = med / raw_median[(store, size)]
        print(
            f"{store:5} {size:7} {name:32} {med:9.3f} {nbytes / med / 1e6:6.0f} "
            f"{min(values):6.3f}-{max(values):6.3f} {ratio:6.2f}"
        )
    sys.stdout.flush()
    os._exit(0)  # the backends' client sessions and threads need not be torn down


if __name__ == "__main__":
    main()
