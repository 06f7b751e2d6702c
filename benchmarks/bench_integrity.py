"""Benchmark: what the integrity manifest costs, on local disk, beside raw files and Orbax.

Side by side in one process, ``--repeats`` timed runs (after one warm-up), in rotating order:

* save: ``ckpt.Checkpointer().save`` as shipped (CRC32C of every chunk computed from the
  arrays in memory while tensorstore writes them, a manifest written before the commit),
  and the same save with the checksum computation switched off (the cost of manifests);
  raw files (write + fsync, 8 threads) and Orbax ``PyTreeCheckpointer`` for reference;
* restore (cold: page cache dropped before each): ckpt with the always-on presence and size
  checks; the same bytes with no manifest claimed (checks off: a checkpoint from before
  manifests); ckpt with ``verify_checksums=True``; raw reads and Orbax for reference.

Prints medians and the spread (min-max) in seconds, and the overheads against the targets
(save with manifests within 10% of without; restore with size checks within 3%).

Usage::

    .venv/bin/python benchmarks/bench_integrity.py [--mb 512] [--arrays 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np
from bench_local_save import evict, make_tree, raw_read, raw_write

import ckpt
from ckpt import tree_format, tree_write
from ckpt.manifest import MANIFEST_FILE

SAVE = "ckpt save (manifest)"
SAVE_OFF = "ckpt save (no checksums)"
RAW_W = "raw write+fsync (8 threads)"
OB_SAVE = "orbax PyTreeCheckpointer save"
RESTORE = "ckpt restore (size checks)"
RESTORE_OFF = "ckpt restore (no manifest)"
RESTORE_CRC = "ckpt restore (verify_checksums)"
RAW_R = "raw read (8 threads)"
OB_RESTORE = "orbax restore"


def _no_checksums(data: np.ndarray, chunks: tuple[int, ...], origin: Any = None) -> dict[str, Any]:
    return {}


class Bench:
    def __init__(self, root: Path, tree: dict[str, np.ndarray], orbax: bool) -> None:
        self.root = root
        self.tree = tree
        self.orbax = orbax
        self.times: dict[str, list[float]] = {}
        self.n = 0

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def fresh(self, name: str) -> Path:
        self.n += 1
        return self.root / f"{name}-{self.n}"

    def run(self, rotation: int) -> None:
        saves = [self.save, self.save_off, self.save_raw]
        if self.orbax:
            saves.append(self.save_orbax)
        saves = saves[rotation % len(saves) :] + saves[: rotation % len(saves)]
        for fn in saves:
            fn()
        restores = [self.restore, self.restore_off, self.restore_crc, self.restore_raw]
        if self.orbax:
            restores.append(self.restore_orbax)
        restores = restores[rotation % len(restores) :] + restores[: rotation % len(restores)]
        for fn in restores:
            fn()
        for child in self.root.iterdir():
            shutil.rmtree(child)

    # -- saves ------------------------------------------------------------------------
    def save(self) -> None:
        self.path_on = self.fresh("on")
        self.timed(SAVE, lambda: ckpt.Checkpointer().save(self.path_on, self.tree))

    def save_off(self) -> None:
        real = tree_write._chunk_records
        tree_write._chunk_records = _no_checksums  # type: ignore[assignment]
        try:
            self.path_off = self.fresh("off")
            self.timed(SAVE_OFF, lambda: ckpt.Checkpointer().save(self.path_off, self.tree))
        finally:
            tree_write._chunk_records = real  # type: ignore[assignment]
        # The same files, claiming no manifest: what a restore of an older checkpoint does.
        doc_path = self.path_off / tree_format.TREE_FILE
        doc = json.loads(doc_path.read_text())
        del doc["manifest"]
        doc_path.write_text(json.dumps(doc))
        (self.path_off / MANIFEST_FILE).unlink()

    def save_raw(self) -> None:
        self.path_raw = self.fresh("raw")
        self.timed(RAW_W, lambda: raw_write(self.path_raw, self.tree, 8))

    def save_orbax(self) -> None:
        import orbax.checkpoint as ocp

        self.path_orbax = self.fresh("orbax")
        with ocp.PyTreeCheckpointer() as c:
            self.timed(OB_SAVE, lambda: c.save(self.path_orbax, self.tree))

    # -- restores ----------------------------------------------------------------------
    def _restore(self, name: str, path: Path, **kwargs: Any) -> None:
        evict(path)
        out = self.timed(name, lambda: ckpt.Checkpointer(**kwargs).restore(path))
        assert all(np.array_equal(out[k], v) for k, v in self.tree.items())

    def restore(self) -> None:
        self._restore(RESTORE, self.path_on)

    def restore_off(self) -> None:
        self._restore(RESTORE_OFF, self.path_off)

    def restore_crc(self) -> None:
        self._restore(RESTORE_CRC, self.path_on, verify_checksums=True)

    def restore_raw(self) -> None:
        evict(self.path_raw)
        self.timed(RAW_R, lambda: raw_read(self.path_raw, self.tree, 8))

    def restore_orbax(self) -> None:
        import orbax.checkpoint as ocp

        evict(self.path_orbax)
        with ocp.PyTreeCheckpointer() as c:
            self.timed(OB_RESTORE, lambda: jax.block_until_ready(c.restore(self.path_orbax)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--arrays", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--no-orbax", action="store_true")
    args = parser.parse_args(argv)
    tree = make_tree(args.mb, args.arrays)
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-integrity-", dir=args.dir or ".")).resolve()
    try:
        bench = Bench(root, tree, orbax=not args.no_orbax)
        bench.run(0)  # warm-up, not counted
        bench.times.clear()
        for i in range(args.repeats):
            bench.run(i + 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.mb} MiB in {args.arrays} float32 arrays, {args.repeats} runs (seconds)")
    print(f"{'':34} {'median':>8} {'min':>8} {'max':>8}")
    for name, values in bench.times.items():
        print(f"{name:34} {statistics.median(values):8.3f} {min(values):8.3f} {max(values):8.3f}")

    def overhead(with_: str, without: str, target: float) -> None:
        a, b = statistics.median(bench.times[with_]), statistics.median(bench.times[without])
        pct = 100 * (a / b - 1)
        verdict = "met" if pct <= target else "NOT met"
        print(f"{with_} vs {without}: {pct:+.1f}% (target <= {target:.0f}%: {verdict})")

    overhead(SAVE, SAVE_OFF, 10)
    overhead(RESTORE, RESTORE_OFF, 3)
    overhead(RESTORE_CRC, RESTORE_OFF, float("inf"))


if __name__ == "__main__":
    main()
