"""Benchmark: multi-process save and restore on local disk, 1, 2 and 4 processes.

Each job is N real processes (one CPU device each, ``jax.distributed`` on a loopback
coordinator) that save one global float32 array of ``--mb`` MiB sharded over their devices,
then restore it onto the same mesh (each process reading its own rows). The times are
measured inside process 0 between barriers (so they cover every process's work), medians
and min-max over ``--repeats`` jobs; a raw reference (one process writing and fsyncing the
same bytes, then reading them back) runs in the same invocation.

Usage::

    .venv/bin/python benchmarks/bench_multihost.py [--mb 256] [--repeats 3]

On a 2-core machine, 4 processes contend for the CPUs: the figures show the coordination
cost (2 barriers per save), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.processes,
        process_id=args.process,
    )
    from jax._src import distributed
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckpt

    client = distributed.global_state.client
    cols = 1024
    rows = args.mb * 1024 * 1024 // (4 * cols)
    rows -= rows % args.processes
    mesh = Mesh(np.array(jax.devices()), ("x",))
    sharding = NamedSharding(mesh, P("x", None))
    rng = np.random.default_rng(args.process)
    w = jax.make_array_from_callback(
        (rows, cols), sharding, lambda i: rng.standard_normal((rows, cols), np.float32)[i]
    )
    path = f"{args.root}/1"
    client.wait_at_barrier("bench-start", 600_000)
    start = time.perf_counter()
    ckpt.Checkpointer().save(path, {"w": w})
    client.wait_at_barrier("bench-saved", 600_000)
    saved = time.perf_counter() - start
    os.sync()
    target = {"w": jax.ShapeDtypeStruct((rows, cols), np.float32, sharding=sharding)}
    client.wait_at_barrier("bench-restore", 600_000)
    start = time.perf_counter()
    out = ckpt.Checkpointer().restore(path, target)
    jax.block_until_ready(out)
    client.wait_at_barrier("bench-restored", 600_000)
    restored = time.perf_counter() - start
    print("RESULT " + json.dumps({"save": saved, "restore": restored}), flush=True)
    client.wait_at_barrier("bench-exit", 60_000)
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job(processes: int, mb: int, root: Path) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--process",
                str(i),
                "--processes",
                str(processes),
                "--port",
                str(port),
                "--root",
                str(root),
                "--mb",
                str(mb),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for i in range(processes)
    ]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    line = next(x for x in outs[0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def raw(mb: int, root: Path) -> dict[str, float]:
    import numpy as np

    data = np.random.default_rng(0).standard_normal(mb * 1024 * 1024 // 4, np.float32)
    path = root / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    saved = time.perf_counter() - start
    os.sync()
    start = time.perf_counter()
    back = np.fromfile(path, np.float32)
    restored = time.perf_counter() - start
    assert back.size == data.size
    return {"save": saved, "restore": restored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--process", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    times: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for name, fn in [
            ("raw write+fsync / read, 1 process", lambda d: raw(args.mb, d)),
            *[(f"ckpt, {n} process(es)", lambda d, n=n: job(n, args.mb, d)) for n in (1, 2, 4)],
        ]:
            scratch = Path(tempfile.mkdtemp(prefix="ckpt-bench-mh-", dir=args.dir or "."))
            try:
                result = fn(scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            for k, v in result.items():
                times.setdefault(name, {}).setdefault(k, []).append(v)
    print(f"{args.mb} MiB float32, sharded by rows over the processes; {args.repeats} runs (s)")
    print(f"{'':36} {'save median':>12} {'min-max':>13} {'restore median':>15} {'min-max':>13}")
    for name, t in times.items():
        s, r = t["save"], t["restore"]
        print(
            f"{name:36} {statistics.median(s):12.3f} {min(s):6.3f}-{max(s):6.3f}"
            f" {statistics.median(r):15.3f} {min(r):6.3f}-{max(r):6.3f}"
        )


if __name__ == "__main__":
    main()
