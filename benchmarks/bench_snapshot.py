"""Benchmark: the time to snapshot a checkpoint, per copy method the store has.

Saves one checkpoint of ``--mb`` MB (``--arrays`` float32 arrays) under ``--root`` (a local
directory by default; any URL a backend serves, e.g. ``s3://bucket/prefix`` against a test
server, works too), then for each method of ``Backend.copy_tree`` on that store (cheapest
first: ``clone`` = FICLONE reflink, ``copy`` = in-kernel copy, ``server_side`` =
CopyObject / GCS rewrite, ``read_write`` = through the client) times ``--repeats`` copies of
the checkpoint and prints the median, the spread and the method actually used (a
filesystem without reflinks falls back from ``clone`` to ``copy``). Last, it times a whole
in-place snapshot (copy, one added file, manifest rebuilt, published by exchange).

Usage::

    .venv/bin/python benchmarks/bench_snapshot.py [--root DIR_OR_URL] [--mb 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

import ckpt
from ckpt import _sync
from ckpt.paths import to_path
from ckpt_strategies.snapshot import SnapshotTemporaryPath, SnapshotType


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="directory or URL (default: a temp dir)")
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--arrays", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="ckpt-bench-snapshot-")
    base = to_path(root)
    backend = ckpt.get_backend(base).bind(base)
    per_array = args.mb * 1024 * 1024 // 4 // args.arrays
    tree = {f"a{i}": np.random.default_rng(i).random(per_array, dtype=np.float32)
            for i in range(args.arrays)}
    source = base / "source"
    ckpt.Checkpointer().save(source, tree)
    size_mb = _sync.run(backend.tree_size(source)) / 2**20
    print(f"store: {backend.describe()} at {root}; checkpoint {size_mb:.0f} MB")
    print(f"{'method':<12} {'used':<12} {'median s':>9} {'min-max s':>15} {'MB/s':>8}")
    for method in backend.copy_methods():
        times, used = [], ""
        for i in range(args.repeats):
            dst = base / f"copy-{method}-{i}"
            start = time.perf_counter()
            used = _sync.run(backend.copy_tree(source, dst, method=method))
            times.append(time.perf_counter() - start)
            _sync.run(backend.remove_tree(dst))
        median = statistics.median(times)
        print(f"{method:<12} {used:<12} {median:>9.3f} {min(times):>7.3f}-{max(times):<7.3f} "
              f"{size_mb / median:>8.0f}")
    if "snapshot" in ckpt.registry.supported_strategies(backend):
        start = time.perf_counter()
        tmp = SnapshotTemporaryPath.from_final(source, snapshot_type=SnapshotType.IN_PLACE)
        where = _sync.run(tmp.create())
        _sync.run(tmp.backend.write_bytes(where / "note.txt", b"changed"))
        _sync.run(tmp.finalize())
        print(f"in-place snapshot (copy {tmp.copy_method}, publish): "
              f"{time.perf_counter() - start:.3f} s")
    _sync.run(backend.remove_tree(base if args.root is None else source))


if __name__ == "__main__":
    main()
