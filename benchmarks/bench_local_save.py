"""Benchmark: save and restore a pytree on local disk with ckpt, raw files and Orbax.

Prints medians over ``--repeats`` runs of:

* raw write+fsync (each array's bytes to its own file, fsync, fsync the directory) and
  raw read (cold page cache) of the same bytes, with 1 and with 8 threads;
* ckpt ``tree_format`` durable write (``prepare(copy=False)`` + write) and read (to numpy
  and to jax), the blocking time of an async save of numpy arrays (``prepare``: a copy),
  and the blocking and total time of an async save of jax arrays;
* Orbax ``StandardCheckpointer`` save (blocking part and total) and restore.

Reads are made cold by evicting the files from the page cache (``posix_fadvise``
``DONTNEED`` after ``os.sync``), so they hit the disk.

Usage::

    PYTHONPATH=core:backends/local:plugins python benchmarks/bench_local_save.py \\
        [--mb 512] [--arrays 16] [--repeats 3] [--dir DIR] [--no-orbax]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
for _sub in ("core", "backends/local", "plugins"):
    if str(_REPO / _sub) not in sys.path:
        sys.path.append(str(_REPO / _sub))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from upath import UPath  # noqa: E402

from ckpt import _sync  # noqa: E402
from ckpt import tree_format as tf  # noqa: E402
from ckpt_backend_local import LocalBackend  # noqa: E402


def make_tree(total_mb: int, n_arrays: int) -> dict[str, np.ndarray]:
    """``n_arrays`` float32 arrays of ``total_mb`` MB in all (rows of 1024 values)."""
    per_array = total_mb * 1024 * 1024 // n_arrays
    rows = max(1, per_array // 4096)
    rng = np.random.default_rng(0)
    return {
        f"layer_{i:02d}": rng.standard_normal((rows, 1024), dtype=np.float32)
        for i in range(n_arrays)
    }


def evict(path: Path) -> None:
    """Drop ``path``'s files from the page cache so the next read hits the disk."""
    os.sync()
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, array: np.ndarray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(np.ascontiguousarray(array)).cast("B")  # type: ignore[arg-type]
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path, like: np.ndarray) -> np.ndarray:
    buf = np.empty_like(like)
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf).cast("B")  # type: ignore[arg-type]
        while view:
            view = view[f.readinto(view) :]
    return buf


def raw_write(directory: Path, tree: dict[str, np.ndarray], threads: int) -> None:
    """One file per array, each fsync'ed, then the directory; ``threads`` files at a time."""
    directory.mkdir(parents=True)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: _write_file(directory / kv[0], kv[1]), tree.items()))
    fsync_dir(directory)
    fsync_dir(directory.parent)


def raw_read(directory: Path, tree: dict[str, np.ndarray], threads: int) -> dict[str, np.ndarray]:
    with ThreadPoolExecutor(threads) as pool:
        arrays = pool.map(lambda kv: _read_file(directory / kv[0], kv[1]), tree.items())
        return dict(zip(tree, arrays, strict=True))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class Results:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float | None:
        values = self.times.get(name)
        return statistics.median(values) if values else None


def run_once(
    base: Path, tree: dict[str, np.ndarray], results: Results, use_orbax: bool, repeat: int
) -> None:
    backend = LocalBackend()
    jax_tree = {k: jnp.asarray(v) for k, v in tree.items()}
    jax.block_until_ready(jax_tree)

    # -- raw files --------------------------------------------------------------
    for threads, label in ((1, ""), (8, " (8 threads)")):
        raw_dir = base / f"raw-{repeat}-{threads}"
        seconds, _ = timed(lambda: raw_write(raw_dir, tree, threads))  # noqa: B023
        results.add(f"raw write+fsync{label}", seconds)
        evict(raw_dir)
        seconds, out = timed(lambda: raw_read(raw_dir, tree, threads))  # noqa: B023
        results.add(f"raw read{label}", seconds)
        assert all(np.array_equal(out[k], tree[k]) for k in tree)
        shutil.rmtree(raw_dir)
        del out

    # -- ckpt tree_format ---------------------------------------------------------
    ck_dir = UPath(base / f"ckpt-{repeat}")
    seconds, _ = timed(lambda: _sync.run(tf.write(backend, ck_dir, tf.prepare(tree, copy=False))))
    results.add("ckpt sync save numpy (durable)", seconds)
    seconds, _ = timed(lambda: tf.prepare(tree))
    results.add("ckpt async save numpy: blocking (copy)", seconds)
    evict(Path(str(ck_dir)))
    seconds, out = timed(lambda: _sync.run(tf.read(backend, ck_dir)))
    results.add("ckpt read -> numpy", seconds)
    assert all(np.array_equal(out[k], tree[k]) for k in tree)
    del out
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tree.items()}
    evict(Path(str(ck_dir)))
    seconds, out = timed(lambda: jax.block_until_ready(_sync.run(tf.read(backend, ck_dir, target))))
    results.add("ckpt read -> jax", seconds)
    del out
    shutil.rmtree(str(ck_dir))

    ck_dir = UPath(base / f"ckpt-jax-{repeat}")
    start = time.perf_counter()
    prepared = tf.prepare(jax_tree)
    results.add("ckpt async save: blocking (jax)", time.perf_counter() - start)
    _sync.run(tf.write(backend, ck_dir, prepared))
    results.add("ckpt async save: total (jax)", time.perf_counter() - start)
    del prepared
    shutil.rmtree(str(ck_dir))

    # -- Orbax --------------------------------------------------------------------
    if use_orbax:
        import orbax.checkpoint as ocp

        ob_dir = base / f"orbax-{repeat}"
        ckptr = ocp.StandardCheckpointer()
        start = time.perf_counter()
        ckptr.save(ob_dir, jax_tree)
        results.add("orbax async save: blocking (jax)", time.perf_counter() - start)
        ckptr.wait_until_finished()
        results.add("orbax save: total (jax)", time.perf_counter() - start)
        evict(ob_dir)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tree.items()}
        seconds, out = timed(lambda: jax.block_until_ready(ckptr.restore(ob_dir, abstract)))
        results.add("orbax restore -> jax", seconds)
        assert all(np.array_equal(np.asarray(out[k]), tree[k]) for k in tree)
        del out
        ckptr.close()
        shutil.rmtree(ob_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="tree size in MB (default 512)")
    parser.add_argument("--arrays", type=int, default=16, help="number of float32 arrays")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians are shown")
    parser.add_argument("--dir", default=None, help="scratch directory (default: under CWD)")
    parser.add_argument("--no-orbax", action="store_true", help="skip the Orbax runs")
    args = parser.parse_args(argv)

    tree = make_tree(args.mb, args.arrays)
    nbytes = sum(a.nbytes for a in tree.values())
    mb = nbytes / 1e6
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or os.getcwd()))
    results = Results()
    try:
        # One untimed round first (thread pools, imports, the kernel's page cache).
        run_once(base, tree, Results(), not args.no_orbax, -1)
        for repeat in range(args.repeats):
            run_once(base, tree, results, not args.no_orbax, repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(
        f"{len(tree)} float32 arrays, {mb:.1f} MB, medians of {args.repeats} run(s), "
        f"scratch {base.parent}, jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(f"{'measure':38s} {'seconds':>9s} {'MB/s':>9s}")
    for name in results.times:
        seconds = results.median(name)
        assert seconds is not None
        print(f"{name:38s} {seconds:9.3f} {mb / seconds:9.1f}")

    def ratio(a: str, b: str, label: str) -> None:
        ta, tb = results.median(a), results.median(b)
        if ta and tb:
            print(f"  {label:64s} {tb / ta:6.2f}x")

    def best(*names: str) -> str:
        return min(names, key=lambda n: results.median(n) or float("inf"))

    raw_w = best("raw write+fsync", "raw write+fsync (8 threads)")
    raw_r = best("raw read", "raw read (8 threads)")
    print("ratios (>1: ckpt faster; vs raw: ckpt bandwidth / best raw bandwidth):")
    ratio("ckpt sync save numpy (durable)", raw_w, f"ckpt numpy save / {raw_w}")
    ratio("ckpt async save: total (jax)", raw_w, f"ckpt jax save / {raw_w}")
    ratio("ckpt read -> numpy", raw_r, f"ckpt read -> numpy / {raw_r}")
    ratio("ckpt async save: total (jax)", "orbax save: total (jax)", "orbax save / ckpt save")
    ratio(
        "ckpt async save: blocking (jax)",
        "orbax async save: blocking (jax)",
        "orbax blocking / ckpt blocking",
    )
    ratio("ckpt read -> jax", "orbax restore -> jax", "orbax restore / ckpt read (jax)")


if __name__ == "__main__":
    main()
