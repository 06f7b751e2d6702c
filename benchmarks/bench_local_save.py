"""Benchmark: save and restore a pytree on local disk with ckpt, raw files and Orbax.

One process, side by side, medians over ``--repeats`` runs (after one untimed warm-up run):

* raw: each array's bytes to its own file, fsync, fsync the directory (1 and 8 threads),
  and reading them back cold: the physical reference;
* ckpt, through the public API: ``ckpt.Checkpointer().save(path, tree)`` (durable:
  tensorstore fsyncs every file, the commit fsyncs the directories) of numpy and of jax
  arrays; ``.restore(path)`` to numpy and ``.restore(path, target)`` to jax with a
  ``jax.ShapeDtypeStruct`` target; ``ckpt.AsyncCheckpointer().save`` of jax arrays: the
  blocking time (until ``save`` returns) and the total (until ``wait_until_finished()``);
* Orbax: ``StandardCheckpointer`` (an ``AsyncCheckpointer``) save, blocking and total, and
  restore to jax with an abstract target; ``PyTreeCheckpointer`` (synchronous) save.

Reads are cold: the files are dropped from the page cache (``os.sync`` then
``posix_fadvise(DONTNEED)``) before each. Within a run the order of the saves, and of the
restores, rotates from run to run, so that no measurement always follows the same one
(on a VM, how expensive fresh memory is depends on what ran just before).

Usage::

    .venv/bin/python benchmarks/bench_local_save.py [--mb 512] [--arrays 16] \\
        [--repeats 3] [--dir DIR] [--no-orbax] [--jax-device cpu|gpu|tpu]

``--jax-device gpu`` keeps the jax arrays on the first GPU: the async blocking part is
then an on-device copy plus the start of the device-to-host transfer, and jax restores
place the arrays on that GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
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
import numpy as np  # noqa: E402

import ckpt  # noqa: E402


def make_tree(total_mb: int, n_arrays: int) -> dict[str, np.ndarray]:
    """``n_arrays`` float32 arrays of ``total_mb`` MiB in all (rows of 1024 values)."""
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


class Results:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float | None:
        values = self.times.get(name)
        return statistics.median(values) if values else None


def check_equal(out: Any, tree: dict[str, np.ndarray]) -> None:
    assert set(out) == set(tree), sorted(out)
    for key, value in tree.items():
        assert np.array_equal(np.asarray(out[key]), value), key


# Names of the measurements (also the row order of the table).
RAW_W1, RAW_W8 = "raw write+fsync (1 thread)", "raw write+fsync (8 threads)"
RAW_R1, RAW_R8 = "raw read (1 thread)", "raw read (8 threads)"
CK_SAVE_NP, CK_SAVE_JAX = "ckpt save numpy", "ckpt save jax"
CK_ASYNC_BLOCK, CK_ASYNC_TOTAL = "ckpt async save jax: blocking", "ckpt async save jax: total"
CK_RESTORE_NP, CK_RESTORE_JAX = "ckpt restore -> numpy", "ckpt restore -> jax"
OB_SAVE_SYNC = "orbax PyTreeCheckpointer save"
OB_BLOCK, OB_TOTAL = "orbax async save: blocking", "orbax async save: total"
OB_RESTORE = "orbax restore -> jax"


class Run:
    """One timed run: every save, then every restore of what was saved."""

    def __init__(
        self,
        base: Path,
        tree: dict[str, np.ndarray],
        jax_tree: dict[str, jax.Array],
        target: dict[str, jax.ShapeDtypeStruct],
        results: Results,
        use_orbax: bool,
        tag: str,
    ) -> None:
        self.base, self.tree, self.jax_tree, self.target = base, tree, jax_tree, target
        self.results, self.use_orbax, self.tag = results, use_orbax, tag
        self.dirs: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        return self.base / f"{name}-{self.tag}"

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        gc.collect()
        start = time.perf_counter()
        result = fn()
        self.results.add(name, time.perf_counter() - start)
        return result

    # -- saves --------------------------------------------------------------------
    def save_raw(self) -> None:
        for threads, name in ((1, RAW_W1), (8, RAW_W8)):
            self.dirs[name] = self.path(f"raw{threads}")
            os.sync()
            self.timed(name, lambda: raw_write(self.dirs[name], self.tree, threads))  # noqa: B023

    def save_ckpt(self) -> None:
        ckptr = ckpt.Checkpointer()
        for name, tree in ((CK_SAVE_NP, self.tree), (CK_SAVE_JAX, self.jax_tree)):
            self.dirs[name] = self.path(name.replace(" ", "-"))
            os.sync()
            self.timed(name, lambda: ckptr.save(self.dirs[name], tree))  # noqa: B023

    def save_ckpt_async(self) -> None:
        path = self.dirs[CK_ASYNC_TOTAL] = self.path("ckpt-async")
        ckptr = ckpt.AsyncCheckpointer()
        os.sync()
        gc.collect()
        start = time.perf_counter()
        ckptr.save(path, self.jax_tree)
        self.results.add(CK_ASYNC_BLOCK, time.perf_counter() - start)
        ckptr.wait_until_finished()
        self.results.add(CK_ASYNC_TOTAL, time.perf_counter() - start)
        ckptr.close()

    def save_orbax(self) -> None:
        import orbax.checkpoint as ocp

        path = self.dirs[OB_TOTAL] = self.path("orbax")
        ckptr = ocp.StandardCheckpointer()
        os.sync()
        gc.collect()
        start = time.perf_counter()
        ckptr.save(path, self.jax_tree)
        self.results.add(OB_BLOCK, time.perf_counter() - start)
        ckptr.wait_until_finished()
        self.results.add(OB_TOTAL, time.perf_counter() - start)
        ckptr.close()

        sync_path = self.path("orbax-sync")
        with ocp.PyTreeCheckpointer() as sync_ckptr:
            os.sync()
            self.timed(OB_SAVE_SYNC, lambda: sync_ckptr.save(sync_path, self.jax_tree))
        shutil.rmtree(sync_path)

    # -- restores -----------------------------------------------------------------
    def restore_raw(self) -> None:
        for threads, name, saved in ((1, RAW_R1, RAW_W1), (8, RAW_R8, RAW_W8)):
            evict(self.dirs[saved])
            out = self.timed(name, lambda: raw_read(self.dirs[saved], self.tree, threads))  # noqa: B023
            check_equal(out, self.tree)
            del out

    def restore_ckpt(self) -> None:
        ckptr = ckpt.Checkpointer()
        path = self.dirs[CK_SAVE_JAX]
        evict(path)
        out = self.timed(CK_RESTORE_NP, lambda: ckptr.restore(path))
        assert all(isinstance(v, np.ndarray) for v in out.values())
        check_equal(out, self.tree)
        del out
        path = self.dirs[CK_SAVE_NP]
        evict(path)
        out = self.timed(
            CK_RESTORE_JAX, lambda: jax.block_until_ready(ckptr.restore(path, self.target))
        )
        assert all(isinstance(v, jax.Array) for v in out.values())
        check_equal(out, self.tree)
        del out
        check_equal(ckptr.restore(self.dirs[CK_ASYNC_TOTAL]), self.tree)

    def restore_orbax(self) -> None:
        import orbax.checkpoint as ocp

        path = self.dirs[OB_TOTAL]
        with ocp.StandardCheckpointer() as ckptr:
            evict(path)
            out = self.timed(
                OB_RESTORE, lambda: jax.block_until_ready(ckptr.restore(path, self.target))
            )
        check_equal(out, self.tree)
        del out

    def run(self, rotation: int) -> None:
        saves = [self.save_raw, self.save_ckpt, self.save_ckpt_async]
        restores = [self.restore_raw, self.restore_ckpt]
        if self.use_orbax:
            saves.append(self.save_orbax)
            restores.append(self.restore_orbax)
        for step in saves[rotation % len(saves) :] + saves[: rotation % len(saves)]:
            step()
        for step in restores[rotation % len(restores) :] + restores[: rotation % len(restores)]:
            step()
        for path in self.dirs.values():
            shutil.rmtree(path)


def describe_disk(path: Path) -> str:
    """``device (fstype) mounted on mountpoint`` for the filesystem holding ``path``."""
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                if str(path).startswith(mount.rstrip("/") + "/") and len(mount) > len(best[2]):
                    best = (device, fstype, mount)
    except OSError:
        pass
    return f"{best[0]} ({best[1]}) mounted on {best[2] or '?'}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="tree size in MiB (default 512)")
    parser.add_argument("--arrays", type=int, default=16, help="number of float32 arrays")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; medians are shown")
    parser.add_argument("--dir", default=None, help="scratch directory (default: under CWD)")
    parser.add_argument("--no-orbax", action="store_true", help="skip the Orbax runs")
    parser.add_argument(
        "--jax-device",
        default=None,
        help="platform of the jax arrays (cpu, gpu, tpu; default: jax's default backend)",
    )
    args = parser.parse_args(argv)
    logging.getLogger("ckpt").setLevel(logging.WARNING)

    try:
        device = jax.devices(args.jax_device)[0] if args.jax_device else jax.devices()[0]
    except RuntimeError as e:
        parser.error(f"--jax-device {args.jax_device}: {e}")
    sharding = jax.sharding.SingleDeviceSharding(device)
    tree = make_tree(args.mb, args.arrays)
    jax_tree = {k: jax.device_put(v, device) for k, v in tree.items()}
    jax.block_until_ready(jax_tree)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in tree.items()}
    nbytes = sum(a.nbytes for a in tree.values())
    mb = nbytes / 1e6
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir or os.getcwd())).resolve()
    results = Results()
    use_orbax = not args.no_orbax
    try:
        # One untimed run first (imports, thread pools, jit caches, the page cache).
        Run(base, tree, jax_tree, target, Results(), use_orbax, "warmup").run(0)
        for repeat in range(args.repeats):
            Run(base, tree, jax_tree, target, results, use_orbax, str(repeat)).run(repeat)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    versions = f"jax {jax.__version__}"
    if use_orbax:
        from importlib.metadata import version

        versions += f", orbax-checkpoint {version('orbax-checkpoint')}"
    print(
        f"{len(tree)} float32 arrays, {mb:.1f} MB ({nbytes} bytes); medians of "
        f"{args.repeats} run(s); {datetime.date.today()}; {os.cpu_count()} CPUs "
        f"({platform.machine()}); scratch {base.parent} on {describe_disk(base.parent)}; "
        f"jax arrays on {device.platform} ({device.device_kind}); {versions}"
    )
    print(f"{'measure':34s} {'median s':>9s} {'MB/s':>8s} {'best s':>8s}   runs (s)")
    for name in (
        RAW_W1,
        RAW_W8,
        RAW_R1,
        RAW_R8,
        CK_SAVE_NP,
        CK_SAVE_JAX,
        CK_ASYNC_BLOCK,
        CK_ASYNC_TOTAL,
        CK_RESTORE_NP,
        CK_RESTORE_JAX,
        OB_SAVE_SYNC,
        OB_BLOCK,
        OB_TOTAL,
        OB_RESTORE,
    ):
        seconds = results.median(name)
        if seconds is None:
            continue
        runs = " ".join(f"{t:.3f}" for t in results.times[name])
        rate = f"{mb / seconds:8.0f}" if seconds > 0 else f"{'inf':>8s}"
        print(f"{name:34s} {seconds:9.3f} {rate} {min(results.times[name]):8.3f}   {runs}")

    def best(*names: str) -> str:
        return min(names, key=lambda n: results.median(n) or float("inf"))

    raw_w, raw_r = best(RAW_W1, RAW_W8), best(RAW_R1, RAW_R8)

    def ratio(slow: str, fast: str, target: float | None, label: str) -> None:
        t_slow, t_fast = results.median(slow), results.median(fast)
        if t_slow is None or t_fast is None:
            return
        value = t_slow / t_fast if t_fast > 0 else float("inf")
        verdict = "" if target is None else (" met" if value >= target else " NOT met")
        goal = "" if target is None else f"(target >= {target:g})"
        print(f"  {label:58s} {value:7.2f} {goal}{verdict}")

    print("ratios (time of the first / time of the second; > 1: the second is faster):")
    if use_orbax:
        ratio(OB_TOTAL, CK_SAVE_JAX, 2.0, "orbax async save total / ckpt save jax")
        ratio(OB_SAVE_SYNC, CK_SAVE_JAX, None, "orbax PyTreeCheckpointer save / ckpt save jax")
        ratio(OB_TOTAL, CK_ASYNC_TOTAL, None, "orbax async save total / ckpt async save total")
        ratio(OB_RESTORE, CK_RESTORE_JAX, 3.0, "orbax restore / ckpt restore -> jax")
        ratio(OB_RESTORE, CK_RESTORE_NP, None, "orbax restore / ckpt restore -> numpy")
        ratio(OB_BLOCK, CK_ASYNC_BLOCK, 1.0, "orbax blocking / ckpt blocking")
    ratio(raw_w, CK_SAVE_JAX, 0.8, f"{raw_w} / ckpt save jax")
    ratio(raw_w, CK_SAVE_NP, None, f"{raw_w} / ckpt save numpy")
    ratio(raw_r, CK_RESTORE_JAX, None, f"{raw_r} / ckpt restore -> jax")
    ratio(raw_r, CK_RESTORE_NP, None, f"{raw_r} / ckpt restore -> numpy")


if __name__ == "__main__":
    main()
