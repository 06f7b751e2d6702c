"""Crash torture: SIGKILL a saving process at random moments, then check the invariants.

    python benchmarks/crash_torture.py --n 500 [--strategy rename commit_file snapshot]

A child process saves steps in a loop (``CheckpointManager``, asynchronous saves, a packed
leaf and a 1.3 MB zarr3 array written by tensorstore per step) and reports each step once
``save`` + ``wait_until_finished`` returned. Under ``snapshot`` the child instead replaces
one committed step over and over with in-place snapshots (copy, rewrite a file, publish)
and reports each version once ``finalize`` returned. The parent SIGKILLs the child at a
random moment, then checks:

- torn checkpoints seen: a listed step that does not restore exactly, with checksums (or,
  under ``snapshot``, whose files do not match its manifest);
- committed steps lost: a step (or snapshot version) the child reported that is no longer
  listed (or that an older version replaced);
- leftovers not cleaned: ``cleanup_temporary_paths`` left a temporary (or a replaced
  checkpoint kept aside) behind;
- failed restarts: the next child did not start (manager start, cleanup of the leftovers,
  repair) or died by itself.

How a kill is made cheap without making it less real: a **zygote** process (this script
with ``--zygote``) imports numpy, jax, tensorstore, ckpt and its plugins once, checks that
it is still single-threaded (``/proc/self/task``: a fork copies only the calling thread,
so a thread pool started by an import would be broken in the children), and then
``os.fork()``s one fresh child per kill. The child starts its own ``CheckpointManager``
(tensorstore's thread pools and HTTP clients are created there, never in the zygote),
waits for the manager's cleanup of the previous child's leftovers, says ``ready`` and
saves. The parent sends ``SIGKILL`` to the child's pid (the whole process, every thread,
in the middle of whatever system call or HTTP request it was making) and asks the zygote
to reap it, which confirms that it died of that signal. Parent, zygote and child talk in
JSON lines on pipes (no pickle); the children inherit the parent's environment through the
zygote, so ``CKPT_CONFIG`` (the S3 and GCS test servers) reaches them.

The delay before each kill is uniform over three save periods after ``ready`` (the period
is measured as the run goes), so kills land in every phase of a save in proportion to its
duration: the first save after start-up, array writes, metadata, manifest, commit, the gap
between saves. Before cleaning up, the parent records which phase the kill hit from what
it left on storage (the files in the temporary, or a step committed but not yet reported).

The parent keeps the newest three steps and deletes the older ones it has verified (so
that 500 kills do not fill the disk or the test server's memory). Prints one table row per
configuration. Local disk here; the S3 and GCS runs go through pytest, which starts the
test servers (``backends/*/tests/test_*_crash_torture.py``, ``CKPT_TORTURE_N`` kills).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

#: Steps the parent keeps (older verified ones are deleted between kills).
KEEP = 3
#: Seconds to wait for a child's ``ready`` (a start-up that hangs is a failed restart).
READY_TIMEOUT_S = 120.0
#: The step the ``snapshot`` mode replaces again and again.
SNAPSHOT_STEP = 0
#: The file each snapshot version rewrites.
VERSION_FILE = "torture_version.json"


def expected(step: int) -> dict[str, Any]:
    """The tree saved at ``step``: a packed leaf, a zarr3 array (over the 1 MiB packing
    limit, so tensorstore writes it), a variable-length array and a scalar."""
    import numpy as np

    return {
        "w": np.full((256, 64), step, np.float32),
        "big": np.arange(1024 * 320, dtype=np.float32).reshape(1024, 320) + step,
        "b": np.arange(step % 97 + 1),
        "s": step,
    }


# --- the zygote and its children (run in the ``--zygote`` process) -------------------------


def _send(message: dict[str, Any]) -> None:
    """One JSON line to stdout in one ``write`` (under PIPE_BUF: never interleaved with
    another process's line, never cut by a kill)."""
    data = (json.dumps(message) + "\n").encode()
    assert len(data) < 4096
    os.write(1, data)


def _version_of(final: Any) -> int:
    """The snapshot version in the checkpoint ``final`` (0 before the first snapshot), read
    through ckpt's backend (so with the configured endpoint, not the default one)."""
    from ckpt import _sync
    from ckpt.registry import resolve

    backend = resolve(final, "snapshot").backend
    path = final / VERSION_FILE
    if not _sync.run(backend.exists(path)):
        return 0
    return int(json.loads(_sync.run(backend.read_bytes(path)))["version"])


def _child(command: dict[str, Any]) -> None:
    """The saving loop of one forked child (never returns normally)."""
    import ckpt
    from ckpt import _sync
    from ckpt.paths import to_path

    root, strategy = command["root"], command["strategy"]
    me = os.getpid()
    manager_strategy = "rename" if strategy == "snapshot" else strategy
    # Backend and strategy are resolved here, in the child: tensorstore's and fsspec's
    # threads and connections belong to it alone.
    manager = ckpt.CheckpointManager(root, atomicity=manager_strategy)
    manager.wait_until_finished()  # the cleanup of the previous child's leftovers
    if strategy != "snapshot":
        step = max(manager.all_steps() or [-1]) + 1
        _send({"pid": me, "ready": True})
        while True:
            manager.save(step, expected(step))
            manager.wait_until_finished()
            _send({"pid": me, "committed": step, "t": time.monotonic()})
            step += 1
    from ckpt_strategies.snapshot import SnapshotTemporaryPath, SnapshotType

    if SNAPSHOT_STEP not in manager.all_steps():
        manager.save(SNAPSHOT_STEP, expected(SNAPSHOT_STEP))
        manager.wait_until_finished()
        _send({"pid": me, "committed": SNAPSHOT_STEP, "t": time.monotonic()})
    final = to_path(f"{str(root).rstrip('/')}/{SNAPSHOT_STEP}")
    version = _version_of(final) + 1
    _send({"pid": me, "ready": True})

    async def replace(version: int) -> None:
        tmp = SnapshotTemporaryPath.from_final(final, snapshot_type=SnapshotType.IN_PLACE)
        where = await tmp.create()
        body = json.dumps({"version": version, "pad": "x" * (version % 4096)}).encode()
        await tmp.backend.write_bytes(where / VERSION_FILE, body)
        await tmp.finalize()

    while True:
        _sync.run(replace(version))  # on ckpt's I/O loop, where the backend's clients live
        _send({"pid": me, "version": version, "t": time.monotonic()})
        version += 1


def zygote(scheme: str) -> None:
    """Import what the children for ``scheme`` (``file``, ``s3``, ``gs``) need, once; then
    fork a child per ``{"op": "fork"}`` line on stdin and reap it on ``{"op": "reap"}``;
    answers are JSON lines on stdout."""
    import jax  # noqa: F401  (ckpt's checkpointing layer imports it)
    import numpy  # noqa: F401
    import tensorstore  # noqa: F401

    import ckpt
    import ckpt.async_checkpointer
    import ckpt.checkpointer
    import ckpt.manager
    import ckpt.partial
    import ckpt.plugins
    import ckpt_strategies.snapshot  # noqa: F401

    # The object store's client libraries: modules only, no client, session or loop yet.
    # gcsfs is left to the children: it imports gRPC, whose core is not fork-safe.
    preload = {
        "s3": ("ckpt_backend_s3", "s3fs", "aiobotocore.session", "botocore.session"),
        "gs": ("ckpt_backend_gcs.backend", "aiohttp", "google.auth"),
    }
    for name in preload.get(scheme, ()):
        __import__(name)
    ckpt.list_strategies()  # loads the plugins (entry points) without touching storage
    threads = len(os.listdir("/proc/self/task"))
    _send({"zygote": os.getpid(), "threads": threads})
    if threads != 1:
        sys.exit(f"zygote: {threads} threads after the imports; a fork would break them")
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "fork":
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)  # the zygote's commands are not the child's
                    _child(command)
                except BaseException:
                    traceback.print_exc()
                    _send({"pid": os.getpid(), "error": traceback.format_exc()[-2000:]})
                    code = 1
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            _send({"forked": pid})
        elif command["op"] == "reap":
            pid, status = os.waitpid(int(command["pid"]), 0)
            _send(
                {
                    "reaped": pid,
                    "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
                    "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                }
            )


# --- the parent --------------------------------------------------------------------------


def _scheme(root: str) -> str:
    """``s3``, ``gs`` (also for ``gcs://``) or ``file``."""
    scheme = root.split("://", 1)[0].lower() if "://" in root else "file"
    return "gs" if scheme == "gcs" else scheme


class _Child:
    """What the parent learned from one child's lines."""

    def __init__(self, pid: int, periods: list[float], firsts: list[float], quiet: bool):
        self.pid = pid
        self.ready = False
        self.reported: set[int] = set()  # steps it reported committed
        self.version = 0  # the newest snapshot version it reported
        self._count = 0
        self._last_t = 0.0
        self._periods, self._firsts, self._quiet = periods, firsts, quiet

    def take(self, message: dict[str, Any] | None) -> None:
        """Record ``message`` if it is this child's."""
        if message is None or message.get("pid") != self.pid:
            return
        if message.get("ready"):
            self.ready, self._last_t = True, time.monotonic()
        if "committed" in message:
            self.reported.add(int(message["committed"]))
        if "version" in message:
            self.version = max(self.version, int(message["version"]))
        if "t" in message and self.ready:  # save times after start-up only
            self._count += 1
            times = self._firsts if self._count == 1 else self._periods
            times.append(message["t"] - self._last_t)
            self._last_t = message["t"]
        if "error" in message and not self._quiet:
            print(message["error"], file=sys.stderr)


class Zygote:
    """The parent's handle on a zygote process (started with this process's environment)."""

    def __init__(self, log: Any, root: str) -> None:
        env = dict(os.environ)
        env.setdefault("OPENBLAS_NUM_THREADS", "1")  # else OpenBLAS starts a thread pool
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--zygote", _scheme(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self.get(READY_TIMEOUT_S)
        if hello is None or hello.get("threads") != 1:
            raise RuntimeError(f"the zygote did not start single-threaded: {hello}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next line (None when the zygote exited or nothing came within ``timeout``)."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def command(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _phase(root: str, strategy: str, unreported: bool) -> str:
    """Which phase of a save the kill hit, from what it left on storage."""
    import ckpt
    from ckpt import _sync
    from ckpt.paths import to_path
    from ckpt.registry import resolve

    if unreported:
        return "committed, not reported"
    temporaries = ckpt.all_temporary_paths(root, atomicity=strategy)
    backend = resolve(to_path(root), strategy).backend
    entries = {e.name for e in _sync.run(backend.list_dir(to_path(root)))}
    if any(".ckpt-replaced-" in name for name in entries):
        return "replace published, old version not yet removed"
    if not temporaries:
        return "no save in flight"
    names: set[str] = set()
    for tmp in temporaries:
        try:
            names |= set(_sync.run(backend.file_sizes(tmp.get())))
        except FileNotFoundError:
            pass
    if "commit_success.txt" in names:
        return "commit marker written"
    if "_CKPT_MANIFEST.json" in names:
        return "manifest written"
    if "_TREE.json" in names or VERSION_FILE in names:
        return "tree document written" if strategy != "snapshot" else "snapshot written"
    if any(n.startswith(("packed/", "big/")) for n in names):
        return "arrays written" if strategy != "snapshot" else "copying"
    return "temporary created"


def _check_snapshot(root: str, saver: Any) -> tuple[bool, int]:
    """(torn, version) of the snapshot step: torn unless it restores exactly and its files
    match its manifest (checksums); its version (-1 if unreadable)."""
    import numpy as np

    from ckpt import _sync
    from ckpt.manifest import check_files, read_manifest
    from ckpt.paths import to_path
    from ckpt.registry import resolve

    final = to_path(f"{root.rstrip('/')}/{SNAPSHOT_STEP}")
    try:
        got = saver.restore(str(final))
        want = expected(SNAPSHOT_STEP)
        torn = not (
            sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
        )
        backend = resolve(final, "snapshot").backend
        manifest = _sync.run(read_manifest(backend, final))
        problems = _sync.run(check_files(backend, final, manifest)) if manifest else [0]
        return torn or bool(problems), _version_of(final)
    except Exception:
        return True, -1


def torture(
    root: str, strategy: str, n: int, rng: random.Random, *, quiet: bool = True
) -> dict[str, Any]:
    """Kill ``n`` saving children under ``root`` (a path or URL; the children inherit this
    process's environment, so ``CKPT_CONFIG`` reaches them); return the counts."""
    import numpy as np

    import ckpt
    from ckpt import _sync
    from ckpt.committed import delete_checkpoint
    from ckpt.paths import to_path
    from ckpt.registry import resolve

    stats: dict[str, Any] = dict(
        kills=0, torn=0, lost=0, leftovers=0, failed_restarts=0, commits=0, phases=Counter()
    )
    committed: set[int] = set()
    deleted: set[int] = set()
    torn: set[int] = set()
    checked: set[int] = set()
    acked_version = 0  # the newest snapshot version reported (or found published)
    lost_versions = 0
    saver = ckpt.Checkpointer(strategy, verify_checksums=True)
    backend = resolve(to_path(root), strategy).backend
    periods: list[float] = [0.2]  # seconds between two reported commits
    firsts: list[float] = [0.5]  # seconds from ready to the first reported commit
    with tempfile.TemporaryFile() as log:
        zygote = Zygote(log, root)
        live: int | None = None  # the pid of a child not yet reaped
        try:
            for kill in range(n):
                zygote.command({"op": "fork", "root": root, "strategy": strategy})
                early = []  # the child's first lines may come before "forked"
                while (forked := zygote.get(READY_TIMEOUT_S)) is not None:
                    if "forked" in forked:
                        break
                    early.append(forked)
                assert forked is not None, "the zygote died"
                pid = live = int(forked["forked"])
                child = _Child(pid, periods, firsts, quiet)
                for message in early:
                    child.take(message)
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not child.ready and time.monotonic() < deadline:
                    message = zygote.get(deadline - time.monotonic())
                    child.take(message)
                    if message is None or "error" in message:
                        break
                if child.ready:
                    # Over the first save after start-up and two more save periods.
                    span = statistics.median(firsts[-50:]) + 2 * statistics.median(periods[-50:])
                    kill_at = time.monotonic() + rng.uniform(0.0, min(span, 20.0))
                    while (left := kill_at - time.monotonic()) > 0:
                        child.take(zygote.get(left))
                os.kill(pid, signal.SIGKILL)  # a zombie until reaped: the pid is not reused
                zygote.command({"op": "reap", "pid": pid})
                while (message := zygote.get(READY_TIMEOUT_S)) is not None:
                    if message.get("reaped") == pid:
                        break
                    child.take(message)
                assert message is not None, "the zygote died"
                live = None
                stats["kills"] += 1
                acked_version = max(acked_version, child.version)
                if not child.ready or message["signal"] != signal.SIGKILL:
                    stats["failed_restarts"] += 1
                    log.seek(0)
                    if not quiet:
                        print(log.read().decode(errors="replace")[-3000:], file=sys.stderr)
                committed |= child.reported
                steps = ckpt.checkpoint_steps(root, atomicity=strategy)
                interrupted = False
                if strategy == "snapshot" and SNAPSHOT_STEP in committed - set(steps):
                    # A replace killed between its two renames (no exchange_dirs): readers
                    # see no step until a repair (manager start, cleanup, gc, a restore)
                    # puts exactly one version back. Judge the state after that repair.
                    interrupted = True
                    ckpt.cleanup_temporary_paths(root, atomicity=strategy)
                    steps = ckpt.checkpoint_steps(root, atomicity=strategy)
                unreported = bool(set(steps) - committed - deleted)
                committed |= set(steps) - deleted  # a commit the kill kept from being reported
                stats["lost"] = len(committed - deleted - set(steps)) + lost_versions
                if strategy == "snapshot":
                    is_torn, version = _check_snapshot(root, saver)
                    if is_torn:
                        torn.add(kill)
                    # The last reported version, or the next one (published, not reported).
                    if not is_torn and not acked_version <= version <= acked_version + 1:
                        lost_versions += 1
                        stats["lost"] += 1
                    unreported = unreported or version == acked_version + 1
                    acked_version = max(acked_version, version)
                else:
                    # Every listed step restores exactly (the newest one after every kill).
                    for step in [s for s in steps if s not in checked] + steps[-1:]:
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
                    for step in steps[:-KEEP]:
                        if step not in torn:  # keep a torn one for inspection
                            path = to_path(f"{root.rstrip('/')}/{step}")
                            _sync.run(delete_checkpoint(backend, path, atomicity=strategy))
                            deleted.add(step)
                if interrupted:
                    stats["phases"]["between the two renames of a replace (repaired)"] += 1
                else:
                    stats["phases"][_phase(root, strategy, unreported)] += 1
                stats["torn"] = len(torn)
                ckpt.cleanup_temporary_paths(root, atomicity=strategy)
                entries = _sync.run(backend.list_dir(to_path(root)))
                if ckpt.all_temporary_paths(root, atomicity=strategy) or any(
                    ".ckpt-replaced-" in e.name for e in entries
                ):
                    stats["leftovers"] += 1
                if not quiet and (kill + 1) % 25 == 0:
                    print(f"  {kill + 1} kills: {_counts(stats)}", file=sys.stderr, flush=True)
        finally:
            if live is not None:  # an error in the parent: stop the child before anything
                os.kill(live, signal.SIGKILL)
            zygote.close()
    # Commits made: steps saved, plus snapshot versions published.
    stats["commits"] = len(committed) + acked_version
    stats["save_period_s"] = statistics.median(periods)
    return stats


def _counts(s: dict[str, Any]) -> str:
    keys = ("kills", "torn", "lost", "leftovers", "failed_restarts")
    return ", ".join(f"{k}={s[k]}" for k in keys)


HEADER = (
    "| backend | strategy | kills | torn checkpoints seen | committed steps lost "
    "| leftovers not cleaned | failed restarts | commits | time |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def row(backend: str, strategy: str, s: dict[str, Any], seconds: float) -> str:
    """One table row (see :data:`HEADER`)."""
    return (
        f"| {backend} | {strategy} | {s['kills']} | {s['torn']} | {s['lost']} | "
        f"{s['leftovers']} | {s['failed_restarts']} | {s['commits']} | {seconds:.0f} s |"
    )


def phases(backend: str, strategy: str, s: dict[str, Any]) -> str:
    """Where the kills landed, most frequent first."""
    spread = ", ".join(f"{name}: {count}" for name, count in s["phases"].most_common())
    return f"{backend} {strategy} (save period {s['save_period_s'] * 1000:.0f} ms): {spread}"


def main() -> None:
    if sys.argv[1:2] == ["--zygote"]:
        zygote(sys.argv[2] if len(sys.argv) > 2 else "file")
        return
    assert __doc__ is not None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="kills per strategy")
    parser.add_argument("--strategy", nargs="*", default=["rename", "commit_file", "snapshot"])
    parser.add_argument("--root", default=None, help="directory to use (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    for strategy in args.strategy:
        with tempfile.TemporaryDirectory(dir=args.root) as tmp:
            started = time.monotonic()
            s = torture(os.path.join(tmp, "root"), strategy, args.n, rng, quiet=False)
            took = time.monotonic() - started
        results.append((strategy, s, took))
        print(HEADER)
        for strategy, s, took in results:
            print(row("local", strategy, s, took))
        for strategy, s, _ in results:
            print(phases("local", strategy, s))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
