"""Step discovery on local disk: ``find_all`` over 2,000 finalized steps + 50 temporaries.

Prints the median time of ckpt's ``standard_name_format().find_all`` (both strategies) and,
side by side in the same run, Orbax's (``orbax.checkpoint.path.step``) when installed.

    python benchmarks/bench_discovery.py [--steps 2000] [--temps 50] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import ckpt
from ckpt import _sync


def make_tree(root: str, steps: int, temps: int) -> None:
    backend = ckpt.get_backend(root)
    rename = ckpt.get_strategy("rename")

    async def build() -> None:
        for step in range(steps):
            tmp = rename.from_final(os.path.join(root, str(step)), backend=backend)
            await tmp.create()
            await tmp.finalize()
        for step in range(steps, steps + temps):
            await rename.from_final(os.path.join(root, str(step)), backend=backend).create()

    _sync.run(build())


def median_ms(fn, repeats: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    times, count = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        count = len(list(fn()))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="parent directory (default: a tempdir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        make_tree(root, args.steps, args.temps)
        rows = []
        for strategy in ("rename", "commit_file"):
            fmt = ckpt.standard_name_format(atomicity=strategy)
            ms, n = median_ms(lambda fmt=fmt: fmt.find_all(root), args.repeats)
            rows.append((f"ckpt find_all ({strategy})", ms, n))
        try:
            from orbax.checkpoint.path import step as orbax_step

            fmt = orbax_step.standard_name_format()
            ms, n = median_ms(lambda: fmt.find_all(root), max(1, args.repeats // 3))
            rows.append(("orbax find_all", ms, n))
        except ImportError:
            rows.append(("orbax find_all (not installed)", float("nan"), 0))
        print(f"find_all over {args.steps} finalized steps + {args.temps} temps, local disk")
        print(f"{'what':36s} {'median ms':>10s} {'steps found':>12s}")
        for name, ms, n in rows:
            print(f"{name:36s} {ms:10.2f} {n:12d}")
        if len(rows) == 3 and rows[2][1] == rows[2][1]:
            print(f"speed-up vs Orbax (rename): {rows[2][1] / rows[0][1]:.0f}x")


if __name__ == "__main__":
    main()
