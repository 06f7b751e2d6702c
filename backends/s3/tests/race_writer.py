"""One racing writer process for test_s3_commit.py (not a test module).

Usage: race_writer.py ROOT WRITER ROUNDS START PERIOD

For each round r it saves step r under ROOT with commit_file: create and write before
START + r*PERIOD, then finalize at that instant, racing the other writer processes. Prints
one JSON line per round: {"step", "writer", "result": "won" | "conflict"}.
"""

from __future__ import annotations

import json
import sys
import time

import ckpt
from ckpt import _sync


def main() -> None:
    root, writer, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    start, period = float(sys.argv[4]), float(sys.argv[5])
    strategy = ckpt.get_strategy("commit_file")
    for step in range(rounds):
        tmp = strategy.from_final(f"{root}/{step}")
        backend = tmp.backend
        try:
            _sync.run(tmp.create())
        except ckpt.CommitConflictError:  # this writer is late: another one already won
            print(json.dumps({"step": step, "writer": writer, "result": "conflict"}), flush=True)
            continue
        _sync.run(backend.write_bytes(tmp.get() / "data.bin", f"writer {writer}".encode()))
        _sync.run(backend.write_bytes(tmp.get() / "sub" / "more.bin", bytes([writer]) * 100))
        delay = start + step * period - time.time()
        if delay > 0:
            time.sleep(delay)
        try:
            _sync.run(tmp.finalize())
            result = "won"
        except ckpt.CommitConflictError:
            result = "conflict"
        print(json.dumps({"step": step, "writer": writer, "result": result}), flush=True)


if __name__ == "__main__":
    main()
