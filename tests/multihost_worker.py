"""One process of a multi-process ckpt job (run by tests/test_multihost.py, N at a time).

    python multihost_worker.py SCENARIO ROOT --process I --processes N --port P [--spec S]

Each process has one CPU device and joins ``jax.distributed`` on a loopback coordinator.
It prints one JSON line ``RESULT {...}`` and leaves with ``os._exit`` (a dead peer must not
make ``jax.distributed.shutdown`` wait).

Scenarios:
- ``save``: a global (256*N, 1024) float32 array sharded over the N processes' devices, a
  replicated array and a scalar, saved with ``Checkpointer`` to ``ROOT/1``.
- ``save_async``: the same with ``AsyncCheckpointer``.
- ``manager``: ``CheckpointManager(ROOT, max_to_keep=2)`` saves steps 0..3 (async).
- ``restore``: restore ``ROOT/1`` onto this job's mesh with partition spec ``--spec``
  (``rows`` or ``cols``) or, with ``--spec none``, to numpy; check the values.
- ``partial``: the same tree in two partial saves, then ``partial.finalize``.
- ``kill``: as ``save``, but process 1 SIGKILLs itself when it starts writing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

ROWS_PER_PROCESS = 256
COLUMNS = 1024  # a shard: 1 MiB of float32


def expected(n_writers: int) -> dict[str, np.ndarray]:
    rows = ROWS_PER_PROCESS * n_writers
    return {
        "w": np.arange(rows * COLUMNS, dtype=np.float32).reshape(rows, COLUMNS),
        "r": np.array([1.0, 2.0, 3.0, 4.0], np.float32),
    }


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("root")
    parser.add_argument("--process", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--writers", type=int, default=0)
    parser.add_argument("--spec", default="rows")
    args = parser.parse_args()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.processes,
        process_id=args.process,
        initialization_timeout=60,
    )
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckpt
    from ckpt import multihost, tree_write

    coordinator = multihost.current()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    out: dict[str, Any] = {"process": args.process}

    def global_tree() -> dict[str, Any]:
        values = expected(args.processes)
        w = jax.make_array_from_callback(
            values["w"].shape, NamedSharding(mesh, P("x", None)), lambda i: values["w"][i]
        )
        r = jax.make_array_from_callback(
            values["r"].shape, NamedSharding(mesh, P()), lambda i: values["r"][i]
        )
        return {"w": w, "r": r, "step": 1}

    if args.scenario in ("save", "kill", "save_async"):
        if args.scenario == "kill" and args.process == 1:
            real = tree_write.write

            async def die(*a: Any, **k: Any) -> Any:
                os.kill(os.getpid(), signal.SIGKILL)
                return await real(*a, **k)

            tree_write.write = die  # type: ignore[assignment]
        tree = global_tree()
        before = coordinator.barriers
        if args.scenario == "save_async":
            with ckpt.AsyncCheckpointer() as ckptr:
                ckptr.save(f"{args.root}/1", tree)
                ckptr.wait_until_finished()
        else:
            try:
                ckpt.Checkpointer().save(f"{args.root}/1", tree)
            except TimeoutError as exc:
                out["timeout"] = str(exc)
                return out
        out["barriers"] = coordinator.barriers - before
    elif args.scenario == "manager":
        tree = global_tree()
        counts = []
        with ckpt.CheckpointManager(args.root, max_to_keep=2) as manager:
            for step in range(4):
                before = coordinator.barriers
                manager.save(step, dict(tree, step=step))
                manager.wait_until_finished()
                counts.append(coordinator.barriers - before)
            out["steps"] = manager.all_steps()
            out["latest"] = manager.latest_step()
        out["barriers_per_save"] = counts
    elif args.scenario == "partial":
        tree = global_tree()
        before = coordinator.barriers
        ckpt.partial.save(f"{args.root}/1", {"w": tree["w"]})
        ckpt.partial.save(f"{args.root}/1", {"r": tree["r"], "step": 1})
        ckpt.partial.finalize(f"{args.root}/1")
        out["barriers"] = coordinator.barriers - before
    elif args.scenario == "restore":
        values = expected(args.writers)
        start = bytes_read()
        if args.spec == "none":
            restored = ckpt.Checkpointer().restore(f"{args.root}/1")
            assert isinstance(restored["w"], np.ndarray)
            assert np.array_equal(restored["w"], values["w"])
        else:
            spec = P("x", None) if args.spec == "rows" else P(None, "x")
            target = {
                "w": jax.ShapeDtypeStruct(
                    values["w"].shape, jnp_float32(), sharding=NamedSharding(mesh, spec)
                ),
                "r": jax.ShapeDtypeStruct((4,), np.float32, sharding=NamedSharding(mesh, P())),
                "step": 0,
            }
            restored = ckpt.Checkpointer().restore(f"{args.root}/1", target)
            w = restored["w"]
            assert w.shape == values["w"].shape and w.sharding == target["w"].sharding
            for shard in w.addressable_shards:
                assert np.array_equal(np.asarray(shard.data), values["w"][shard.index])
            for shard in restored["r"].addressable_shards:
                assert np.array_equal(np.asarray(shard.data), values["r"])
        assert restored["step"] == 1
        out["bytes_read"] = bytes_read() - start
        out["barriers"] = coordinator.barriers
    else:
        raise SystemExit(f"unknown scenario {args.scenario}")
    return out


def jnp_float32() -> Any:
    return np.float32


if __name__ == "__main__":
    try:
        result = main()
    except BaseException as exc:  # reported to the test, which asserts on it
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    # Leave together: a process whose coordinator (process 0) is gone is terminated by
    # jax's runtime. After a dead peer this times out; the result is printed already.
    try:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier("worker-exit", 10_000)
    except Exception:
        pass
    os._exit(0)
