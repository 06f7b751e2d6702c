"""Benchmark: trees of many leaves (and the 512 MiB tree) with ckpt, Orbax and a raw reference.

Three trees:

* ``small``: 4,800 small leaves: shapes of 1 to 64K elements, float32 / bfloat16 / float16
  arrays and int32 scalars;
* ``transformer``: a 48-layer transformer's parameters plus two Adam moments (about 2,300
  leaves, about 1 GiB), plus step counters;
* ``big``: 512 MiB in 16 float32 arrays.

Local disk (``--local``), side by side in one run, medians and min-max over ``--repeats``:
raw (one file per leaf, written and fsynced by 8 threads; read back by 8 threads), ckpt
(sync save; async save: blocking and total; restore to numpy; restore to jax), Orbax
(``StandardCheckpointer`` async save: blocking and total; restore to jax).

The previous release (``--baseline REF``, default :data:`BASELINE`: the code the issue
measured, before packed leaves) runs the same saves and restores in a subprocess, in the
same repeats, for the trees in ``--baseline-trees`` (default ``big``), so "loses nothing
against the previous release" is measured in one run, not across days.

S3 (``--s3``, moto on 127.0.0.1 behind a request-counting proxy): ckpt save and restore with
their HTTP requests counted, beside tensorstore writing and reading the same bytes as one
object per leaf (the raw reference on S3).

Usage::

    .venv/bin/python benchmarks/bench_many_leaves.py [--trees small,transformer,big]
        [--repeats 3] [--local] [--s3] [--no-orbax] [--baseline REF] [--baseline-trees big]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import ml_dtypes
import numpy as np
from bench_local_save import evict, fsync_dir

import ckpt


def small_tree(n: int = 4800) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    dtypes = [np.float32, ml_dtypes.bfloat16, np.float16]
    tree: dict[str, Any] = {}
    for i in range(n):
        if i % 10 == 9:
            tree[f"leaf_{i:04d}"] = np.int32(i)
            continue
        size = int(rng.integers(1, 64 * 1024))
        dtype = dtypes[i % len(dtypes)]
        tree[f"leaf_{i:04d}"] = rng.standard_normal(size, np.float32).astype(dtype)
    return tree


def transformer_tree(layers: int = 48, d: int = 384) -> dict[str, Any]:
    rng = np.random.default_rng(1)

    def params() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for layer in range(layers):
            p: dict[str, Any] = {}
            for name in ("q", "k", "v", "o"):
                p[f"attn_{name}"] = {
                    "kernel": rng.standard_normal((d, d), np.float32),
                    "bias": rng.standard_normal(d, np.float32),
                }
            p["mlp_in"] = {
                "kernel": rng.standard_normal((d, 4 * d), np.float32),
                "bias": rng.standard_normal(4 * d, np.float32),
            }
            p["mlp_out"] = {
                "kernel": rng.standard_normal((4 * d, d), np.float32),
                "bias": rng.standard_normal(d, np.float32),
            }
            for ln in ("ln1", "ln2"):
                p[ln] = {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}
            out[f"layer_{layer:02d}"] = p
        return out

    return {
        "params": params(),
        "mu": params(),
        "nu": params(),
        "step": np.int32(1000),
        "count": np.int32(1000),
    }


def big_tree(mb: int = 512, n: int = 16) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    rows = mb * 1024 * 1024 // n // 4096
    return {f"layer_{i:02d}": rng.standard_normal((rows, 1024), np.float32) for i in range(n)}


TREES: dict[str, Callable[[], dict[str, Any]]] = {
    "small": small_tree,
    "transformer": transformer_tree,
    "big": big_tree,
}


def leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in leaves(tree))


def same(a: Any, b: Any) -> None:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


# -- raw references ---------------------------------------------------------------------
def raw_write(directory: Path, tree: Any) -> None:
    directory.mkdir(parents=True)
    arrays = leaves(tree)

    def one(i: int) -> None:
        fd = os.open(directory / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(np.ascontiguousarray(arrays[i]).reshape(-1).view(np.uint8))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(len(arrays))))
    fsync_dir(directory)


def raw_read(directory: Path, tree: Any) -> list[np.ndarray]:
    arrays = leaves(tree)

    def one(i: int) -> np.ndarray:
        out = np.empty_like(arrays[i])
        with open(directory / str(i), "rb", buffering=0) as f:
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(len(arrays))))


class Times:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str], list[float]] = {}

    def add(self, tree: str, name: str, seconds: float) -> None:
        self.values.setdefault((tree, name), []).append(seconds)

    def timed(self, tree: str, name: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        start = time.perf_counter()
        out = fn()
        self.add(tree, name, time.perf_counter() - start)
        return out

    def median(self, tree: str, name: str) -> float | None:
        v = self.values.get((tree, name))
        return statistics.median(v) if v else None

    def show(self) -> None:
        current = None
        for (tree, name), v in self.values.items():
            if tree != current:
                print(f"\n{tree}")
                current = tree
            print(f"  {name:52} {statistics.median(v):8.3f} s   ({min(v):.3f}-{max(v):.3f})")


def time_async_save(times: Times, name: str, label: str, path: Any, tree: Any) -> None:
    """Time ``AsyncCheckpointer.save`` (``<label>: blocking``) and until it is committed
    (``<label>: total``)."""
    with ckpt.AsyncCheckpointer() as ac:
        start = time.perf_counter()
        ac.save(path, tree)
        times.add(name, f"{label}: blocking", time.perf_counter() - start)
        ac.wait_until_finished()
        times.add(name, f"{label}: total", time.perf_counter() - start)


def local_run(name: str, tree: Any, root: Path, times: Times, orbax: bool) -> None:
    jax_tree = jax.tree_util.tree_map(jax.numpy.asarray, tree)
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), jax_tree
    )
    paths = {k: root / f"{name}-{k}" for k in ("raw", "sync", "async", "orbax")}
    times.timed(name, "raw write+fsync (8 threads)", lambda: raw_write(paths["raw"], tree))
    times.timed(name, "ckpt save (sync)", lambda: ckpt.Checkpointer().save(paths["sync"], tree))
    time_async_save(times, name, "ckpt async save", paths["async"], jax_tree)
    if orbax:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as oc:
            start = time.perf_counter()
            oc.save(paths["orbax"], jax_tree)
            times.add(name, "orbax async save: blocking", time.perf_counter() - start)
            oc.wait_until_finished()
            times.add(name, "orbax async save: total", time.perf_counter() - start)
    for p in paths.values():
        if p.exists():
            evict(p)
    times.timed(name, "raw read (8 threads)", lambda: raw_read(paths["raw"], tree))
    out = times.timed(
        name, "ckpt restore (numpy)", lambda: ckpt.Checkpointer().restore(paths["sync"])
    )
    same(out, tree)
    del out
    evict(paths["async"])
    out = times.timed(
        name,
        "ckpt restore (jax)",
        lambda: jax.block_until_ready(ckpt.Checkpointer().restore(paths["async"], target)),
    )
    same(out, tree)
    del out
    if orbax:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as oc:
            out = times.timed(
                name,
                "orbax restore (jax)",
                lambda: jax.block_until_ready(oc.restore(paths["orbax"], target)),
            )
        same(out, tree)
        del out
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)


#: The ckpt the issue about many leaves measured (end of 2026-11-24, before packed leaves).
BASELINE = "25c6c6d"
REPO = Path(__file__).resolve().parent.parent


def baseline_tree(ref: str) -> Path:
    """The core, local backend and strategies of ckpt at git ``ref``, extracted (cached)
    into a directory whose ``core``, ``backends/local`` and ``plugins`` go on PYTHONPATH."""
    target = Path(tempfile.gettempdir()) / f"ckpt-baseline-{ref}"
    if not (target / "core" / "ckpt" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "core", "backends/local", "plugins"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def baseline_run(ref: str, name: str, root: Path, times: Times) -> None:
    """One repeat of ``name`` with ckpt at ``ref`` (a subprocess; see :func:`worker`)."""
    tree_dir = baseline_tree(ref)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        str(tree_dir / p) for p in ("core", "backends/local", "plugins")
    )
    out = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--dir", str(root)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for what, seconds in json.loads(out.splitlines()[-1]).items():
        times.add(name, f"previous release ({ref}): {what}", seconds)


def worker(name: str, root: Path) -> None:
    """Save and restore tree ``name`` with whatever ``ckpt`` is importable; print the
    times as one JSON line (run by :func:`baseline_run` with the previous release)."""
    assert Path(ckpt.__file__).resolve().parents[2] != REPO, "not the previous release"
    tree = TREES[name]()
    jax_tree = jax.tree_util.tree_map(jax.numpy.asarray, tree)
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), jax_tree
    )
    times = Times()
    paths = {k: root / f"{name}-previous-{k}" for k in ("sync", "async")}
    times.timed(name, "save (sync)", lambda: ckpt.Checkpointer().save(paths["sync"], tree))
    time_async_save(times, name, "async save", paths["async"], jax_tree)
    for p in paths.values():
        evict(p)
    out = times.timed(name, "restore (numpy)", lambda: ckpt.Checkpointer().restore(paths["sync"]))
    same(out, tree)
    del out
    out = times.timed(
        name,
        "restore (jax)",
        lambda: jax.block_until_ready(ckpt.Checkpointer().restore(paths["async"], target)),
    )
    same(out, tree)
    del out
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
    print(json.dumps({what: v[0] for (_, what), v in times.values.items()}))


def ratios(times: Times, name: str) -> None:
    def r(a: str, b: str) -> str:
        x, y = times.median(name, a), times.median(name, b)
        return f"{y / x:.2f}x" if x and y else "-"

    print(
        f"  ckpt vs orbax: save total {r('ckpt async save: total', 'orbax async save: total')}"
        f" faster, restore {r('ckpt restore (jax)', 'orbax restore (jax)')} faster (target 3x)"
    )
    print(
        f"  raw vs ckpt: save {r('raw write+fsync (8 threads)', 'ckpt save (sync)')} of raw,"
        f" restore {r('raw read (8 threads)', 'ckpt restore (numpy)')} of raw (target <= 2x)"
    )
    previous = sorted(
        {
            w.split(":")[0]
            for t, w in times.values
            if t == name and ":" in w and w.startswith("previous release")
        }
    )
    for prefix in previous:
        pairs = [
            ("save (sync)", "ckpt save (sync)"),
            ("async save: total", "ckpt async save: total"),
            ("restore (numpy)", "ckpt restore (numpy)"),
            ("restore (jax)", "ckpt restore (jax)"),
        ]
        print(
            f"  vs {prefix} (> 1: now faster): "
            + ", ".join(f"{old} {r(new, f'{prefix}: {old}')}" for old, new in pairs)
        )


async def _ts_put(spec: dict[str, Any], arrays: list[np.ndarray]) -> None:
    import tensorstore as ts

    kv = await ts.KvStore.open(spec)
    await asyncio.gather(*(kv.write(str(i), a.tobytes()) for i, a in enumerate(arrays)))


async def _ts_get(spec: dict[str, Any], n: int) -> list[bytes]:
    import tensorstore as ts

    kv = await ts.KvStore.open(spec)
    got = await asyncio.gather(*(kv.read(str(i)) for i in range(n)))
    return [g.value for g in got]


def s3_run(names: list[str], repeats: int) -> None:
    import logging

    from bench_s3_requests import Counter, counting_proxy
    from moto.server import ThreadedMotoServer

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true"
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    assert moto._server is not None
    counter = Counter()
    proxy = counting_proxy(moto._server.server_port, counter)
    url = proxy.url
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
    cfg = Path(tempfile.mkdtemp()) / "ckpt.toml"
    cfg.write_text(f'[backends.s3]\nendpoint_url = "{url}"\n')
    os.environ["CKPT_CONFIG"] = str(cfg)
    times = Times()
    requests: dict[tuple[str, str], int] = {}
    for name in names:
        tree = TREES[name]()
        arrays = leaves(tree)
        for rep in range(repeats):
            root = f"s3://bench/{name}-{rep}"
            backend = ckpt.get_backend(root)
            kv_spec = backend.kvstore_spec(backend.path(root + "/raw"))
            counter.take()
            start = time.perf_counter()
            asyncio.run(_ts_put(kv_spec, arrays))
            times.add(name, "tensorstore: one object per leaf, write", time.perf_counter() - start)
            requests[(name, "tensorstore write")] = sum(counter.take().values())
            save = functools.partial(ckpt.Checkpointer().save, root + "/ck", tree)
            times.timed(name, "ckpt save (sync)", save)
            requests[(name, "ckpt save")] = sum(counter.take().values())
            start = time.perf_counter()
            asyncio.run(_ts_get(kv_spec, len(arrays)))
            times.add(name, "tensorstore: one object per leaf, read", time.perf_counter() - start)
            requests[(name, "tensorstore read")] = sum(counter.take().values())
            restore = functools.partial(ckpt.Checkpointer().restore, root + "/ck")
            out = times.timed(name, "ckpt restore (numpy)", restore)
            requests[(name, "ckpt restore")] = sum(counter.take().values())
            same(out, tree)
            del out
            jax_tree = jax.tree_util.tree_map(jax.numpy.asarray, tree)
            time_async_save(times, name, "ckpt async save", root + "/async", jax_tree)
            requests[(name, "ckpt async save")] = sum(counter.take().values())
            target = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), jax_tree
            )
            restore_jax = functools.partial(ckpt.Checkpointer().restore, root + "/async", target)
            out = times.timed(name, "ckpt restore (jax)", restore_jax)
            jax.block_until_ready(out)
            requests[(name, "ckpt restore (jax)")] = sum(counter.take().values())
            same(out, tree)
            del out, jax_tree
    print("\n== S3 (moto on loopback, requests counted at the HTTP level)")
    times.show()
    for (name, what), n in requests.items():
        print(f"  {name:12} {what:22} {n:7d} requests (last run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="small,transformer,big")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--s3", action="store_true")
    parser.add_argument("--no-orbax", action="store_true")
    parser.add_argument("--baseline", default=BASELINE, help="git ref of the previous release")
    parser.add_argument("--baseline-trees", default="big", help="'' for none")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.dir))
        return
    baseline_names = [n for n in args.baseline_trees.split(",") if n]
    names = [n for n in args.trees.split(",") if n]
    if not (args.local or args.s3):
        args.local = args.s3 = True
    if args.local:
        times = Times()
        root = Path(tempfile.mkdtemp(prefix="ckpt-bench-leaves-", dir=args.dir or ".")).resolve()
        try:
            for name in names:
                tree = TREES[name]()
                print(
                    f"{name}: {len(leaves(tree))} leaves, {nbytes(tree) / 2**20:.0f} MiB",
                    flush=True,
                )
                for _ in range(args.repeats):
                    local_run(name, tree, root, times, orbax=not args.no_orbax)
                    if name in baseline_names:
                        baseline_run(args.baseline, name, root, times)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print("\n== local disk")
        times.show()
        for name in names:
            print(f"\n{name}")
            ratios(times, name)
    if args.s3:
        s3_run(names, args.repeats)


if __name__ == "__main__":
    main()
