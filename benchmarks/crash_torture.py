"""Crash torture: SIGKILL a saving process at random moments, then check the invariants.

    python benchmarks/crash_torture.py --n 500 [--strategy rename commit_file] [--root DIR]

A child process saves steps in a loop (``CheckpointManager``, asynchronous saves, a few
arrays per step, no retention) and prints each step once ``save`` + ``wait`` returned. The
parent kills it with SIGKILL after a random delay, then checks: every listed step restores
exactly with checksums (else: a torn checkpoint), every step the child reported committed is
still listed (else: a committed step lost), cleanup leaves nothing but committed steps
(else: leftovers not cleaned), and the next child starts and saves (else: a failed
restart). Prints one table row per strategy. Local disk only for now (see reliability.md).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, numpy as np, ckpt
root, strategy, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = ckpt.CheckpointManager(root, atomicity=strategy)
step = max(m.all_steps() or [start - 1]) + 1
print("ready", flush=True)
while True:
    tree = {"w": np.full((256, 64), step, np.float32), "b": np.arange(step % 97 + 1), "s": step}
    m.save(step, tree)
    m.wait_until_finished()
    print(step, flush=True)
    step += 1
"""


def expected(step: int) -> dict:
    import numpy as np

    return {"w": np.full((256, 64), step, np.float32), "b": np.arange(step % 97 + 1), "s": step}


def torture(root: str, strategy: str, n: int, rng: random.Random) -> dict[str, int]:
    """Kill ``n`` saving children under ``root`` (a path or URL; the children inherit this
    process's environment, so ``CKPT_CONFIG`` reaches them); return the counts."""
    import numpy as np

    import ckpt

    stats = dict(kills=0, torn=0, lost=0, leftovers=0, failed_restarts=0)
    committed: set[int] = set()
    torn: set[int] = set()
    saver = ckpt.Checkpointer(strategy, verify_checksums=True)
    checked: set[int] = set()
    for _ in range(n):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, root, strategy, "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            stats["failed_restarts"] += 1
        time.sleep(rng.uniform(0.0, 0.8))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
        stats["kills"] += 1
        committed |= {int(s) for s in out.split() if s.isdigit()}
        steps = ckpt.checkpoint_steps(root, atomicity=strategy)
        stats["lost"] = len(committed - set(steps))
        # Every listed step restores exactly (the newest ones are checked after every kill).
        for step in [s for s in steps if s not in checked] + steps[-2:]:
            try:
                got = saver.restore(f"{root.rstrip('/')}/{step}")
                want = expected(step)
                ok = sorted(got) == sorted(want) and all(
                    np.array_equal(got[k], want[k]) for k in want
                )
            except Exception:  # any failure to restore a listed step: torn
                ok = False
            if not ok:
                torn.add(step)
            checked.add(step)
        stats["torn"] = len(torn)
        ckpt.cleanup_temporary_paths(root, atomicity=strategy)
        if ckpt.all_temporary_paths(root, atomicity=strategy):
            stats["leftovers"] += 1
    return stats


HEADER = (
    "| backend | strategy | kills | torn checkpoints seen | committed steps lost "
    "| leftovers not cleaned | failed restarts | time |\n|---|---|---|---|---|---|---|---|"
)


def row(backend: str, strategy: str, s: dict[str, int], seconds: float) -> str:
    return (
        f"| {backend} | {strategy} | {s['kills']} | {s['torn']} | {s['lost']} | "
        f"{s['leftovers']} | {s['failed_restarts']} | {seconds:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="kills per strategy")
    parser.add_argument("--strategy", nargs="*", default=["rename", "commit_file"])
    parser.add_argument("--root", default=None, help="directory to use (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(HEADER)
    for strategy in args.strategy:
        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            started = time.monotonic()
            s = torture(os.path.join(tmp, "root"), strategy, args.n, rng)
            took = time.monotonic() - started
        print(row("local", strategy, s, took), flush=True)


if __name__ == "__main__":
    main()
