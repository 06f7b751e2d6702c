"""A fault at every storage call: each operation is rerun once per call it makes, failing
call k (k = 1..N), in two modes: the call fails before it takes effect (``before``), or it
takes effect and then reports failure (``after``: a lost acknowledgement).

After every fault: the step is either committed and restores exactly, or invisible to
discovery; every step committed before is intact; cleanup removes the leftovers (nothing
but committed steps is left under the root); and the next attempt succeeds. An operation
that reports success must have done its work.

The calls counted are the backend's primitives (metadata, tree and manifest files,
directories, the commit, deletes); array chunks go through tensorstore and are not counted.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import ckpt
from ckpt import _sync
from ckpt.cleanup import cleanup_temporary_paths_async
from ckpt.committed import delete_with
from ckpt_conformance.instrumented import InstrumentedBackend

OPERATIONS = (
    "sync_save",
    "async_save",
    "finalize",
    "cleanup",
    "manager_delete",
    "retention",
    "partial_finalize",
    "snapshot_replace",
)
MODES = ("before", "after")
#: Operations of one strategy only (the others run under every strategy).
STRATEGY_OPERATIONS = {"snapshot_replace": "snapshot"}
#: The file an in-place snapshot adds to the checkpoint it replaces.
SNAPSHOT_FILE = "eval.bin"


def fault_parameters(strategies: list[str]) -> list[tuple[str, str]]:
    """``(strategy, op)`` pairs of the fault-at-every-call test: every operation under
    every strategy, except the operations of one strategy (``snapshot_replace``)."""
    return [
        (strategy, op)
        for strategy in strategies
        for op in OPERATIONS
        if STRATEGY_OPERATIONS.get(op, strategy) == strategy
    ]


def _tree(seed: int) -> dict[str, Any]:
    return {"w": np.arange(8, dtype=np.float32) + seed, "b": np.full((2,), seed, np.int64)}


def _same(a: Any, b: Any) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


class _Case:
    """One operation on a fresh root: ``setup`` (no faults), then ``run`` (faults armed)."""

    def __init__(self, op: str, root: str, strategy: str, backend: InstrumentedBackend):
        self.op, self.root, self.strategy, self.fb = op, root, strategy, backend
        self.cls = ckpt.get_strategy(strategy)
        self.base = ckpt.registry.to_path(root)
        #: step -> tree of every step committed before the operation that must stay.
        self.kept: dict[int, dict[str, Any]] = {}
        #: Steps the operation may remove (a delete, retention).
        self.may_go: dict[int, dict[str, Any]] = {}
        self.target = 2
        self.tree = _tree(2)
        self.pending: Any = None

    def plain(self) -> ckpt.Checkpointer:
        return ckpt.Checkpointer(self.strategy)

    def setup(self) -> None:
        self.plain().save(_join(self.root, "0"), _tree(0))
        self.kept[0] = _tree(0)
        if self.op in ("manager_delete", "retention"):
            self.plain().save(_join(self.root, "1"), _tree(1))
            if self.op == "manager_delete":
                self.target = 1
                self.may_go[1] = _tree(1)
            else:  # max_to_keep=2: saving step 2 retires step 0
                self.kept, self.may_go = {1: _tree(1)}, {0: _tree(0)}
        if self.op == "finalize":
            tmp = self.cls.from_final(_join(self.root, "2"), backend=self.fb)
            self.fb.fail_call(0)  # unarmed while the checkpoint is written
            _sync.run(tmp.create())
            _sync.run(self.fb.inner.write_bytes(tmp.get() / "data.bin", b"payload"))
            self.pending = tmp
        if self.op == "cleanup":
            for name in ("3", "4"):
                tmp = self.cls.from_final(_join(self.root, name))
                _sync.run(tmp.create())
                _sync.run(tmp.backend.write_bytes(tmp.get() / "data.bin", b"partial"))
            self.target = -1
        if self.op == "partial_finalize":
            final = _join(self.root, "2")
            ckpt.partial.save(final, {"w": self.tree["w"]}, atomicity=self.strategy)
            ckpt.partial.save(final, {"b": self.tree["b"]}, atomicity=self.strategy)
        if self.op == "snapshot_replace":  # the committed step an in-place snapshot replaces
            self.plain().save(_join(self.root, "2"), self.tree)

    def replace(self, backend: ckpt.Backend) -> None:
        """An in-place snapshot of the target step that adds :data:`SNAPSHOT_FILE`."""
        final = _join(self.root, str(self.target))
        snapshot: Any = self.cls  # the snapshot strategy's from_final takes snapshot_type
        tmp = snapshot.from_final(final, backend=backend, snapshot_type="in_place")
        where = _sync.run(tmp.create())
        _sync.run(backend.write_bytes(where / SNAPSHOT_FILE, b"new"))
        _sync.run(tmp.finalize())

    def snapshot_version(self) -> str:
        """``old`` or ``new``: which version the target step is, once it is checked to be
        whole (it restores exactly; every file matches its manifest, checksums included)."""
        from ckpt.manifest import check_files, read_manifest

        inner = self.fb.inner
        final = self.base / str(self.target)
        assert _same(
            ckpt.Checkpointer(self.strategy, verify_checksums=True).restore(
                _join(self.root, str(self.target))
            ),
            self.tree,
        ), "tree changed"
        manifest = _sync.run(read_manifest(inner, final))
        assert manifest is not None, "no manifest"
        problems = _sync.run(check_files(inner, final, manifest))
        assert not problems, problems
        if not _sync.run(inner.exists(final / SNAPSHOT_FILE)):
            return "old"
        assert _sync.run(inner.read_bytes(final / SNAPSHOT_FILE)) == b"new"
        assert SNAPSHOT_FILE in manifest.files, "the snapshot's file is not in the manifest"
        return "new"

    def run(self) -> None:
        final = _join(self.root, str(self.target))
        if self.op == "sync_save":
            ckpt.Checkpointer(self.strategy, backend=self.fb).save(final, self.tree)
        elif self.op == "async_save":
            saver = ckpt.AsyncCheckpointer(self.strategy, backend=self.fb)
            try:
                saver.save(final, self.tree)
                saver.wait_until_finished()
            finally:
                saver.close()
        elif self.op == "finalize":
            _sync.run(self.pending.finalize())
        elif self.op == "cleanup":
            _sync.run(cleanup_temporary_paths_async(self.base, self.fb, strategy=self.cls))
        elif self.op == "manager_delete":
            _sync.run(delete_with(self.fb, ckpt.registry.to_path(final), self.cls))
        elif self.op == "retention":
            manager = ckpt.CheckpointManager(
                self.root,
                max_to_keep=2,
                atomicity=self.strategy,
                async_save=False,
                backend=self.fb,
            )
            try:
                manager.save(self.target, self.tree)
            finally:
                manager.close()
        elif self.op == "partial_finalize":
            ckpt.partial.finalize(final, atomicity=self.strategy, backend=self.fb)
        elif self.op == "snapshot_replace":
            self.replace(self.fb)

    def retry(self) -> None:
        """The next attempt of the operation, without faults."""
        final = _join(self.root, str(self.target))
        if self.op == "finalize":
            tmp = self.cls.from_final(final)
            _sync.run(tmp.create())
            _sync.run(tmp.backend.write_bytes(tmp.get() / "data.bin", b"payload"))
            _sync.run(tmp.finalize())
        elif self.op == "cleanup":
            ckpt.cleanup_temporary_paths(self.root, atomicity=self.strategy)
        elif self.op == "manager_delete":
            _sync.run(delete_with(self.fb.inner, ckpt.registry.to_path(final), self.cls))
        elif self.op == "partial_finalize":
            ckpt.partial.finalize(final, atomicity=self.strategy)
        elif self.op == "snapshot_replace":
            self.replace(self.fb.inner)
        else:
            self.plain().save(final, self.tree)

    def restores(self, step: int) -> Any:
        final = _join(self.root, str(step))
        if self.op == "finalize" and step == self.target:
            content = _sync.run(ckpt.content_path(self.fb.inner, ckpt.registry.to_path(final)))
            return _sync.run(self.fb.inner.read_bytes(content / "data.bin"))
        return ckpt.Checkpointer(self.strategy, verify_checksums=True).restore(final)

    def expected(self, step: int) -> Any:
        if self.op == "finalize" and step == self.target:
            return b"payload"
        return {**self.kept, **self.may_go}.get(step, self.tree)

    def matches(self, step: int) -> bool:
        if self.op == "snapshot_replace" and step == self.target:
            self.snapshot_version()  # old or new, but whole
            return True
        got, want = self.restores(step), self.expected(step)
        return got == want if isinstance(want, bytes) else _same(got, want)


def _leftovers(c: _Case, steps: list[int]) -> list[str]:
    """What is under the root besides the committed steps and their content directories."""
    inner = c.fb.inner
    keep: set[str] = set()
    for step in steps:
        final = c.base / str(step)
        keep.add(str(step))
        content = _sync.run(ckpt.content_path(inner, final, atomicity=c.strategy))
        keep.add(str(content)[len(str(c.base)) + 1 :])
    found: list[str] = []
    for entry in _sync.run(inner.list_dir(c.base)):
        if entry.name in keep:
            continue
        inside = [f"{entry.name}/{e.name}" for e in _sync.run(inner.list_dir(c.base / entry.name))]
        if (entry.is_dir and any(k.startswith(entry.name + "/") for k in keep)) or not inside:
            found += [name for name in inside if name not in keep]
        else:
            found.append(entry.name)
    return found


class FaultConformance:
    """Mixed into :class:`ckpt_conformance.BackendConformance` (its fixtures apply)."""

    #: ``None``: fail every call k = 1..N. A number: fail that many calls, evenly spread
    #: from the first to the last (remote stores, where each rerun costs seconds, set it so
    #: the suite stays fast; ``CKPT_FAULT_ALL_CALLS=1`` fails every call regardless).
    fault_sample: int | None = None

    def _ks(self, n: int) -> list[int]:
        if self.fault_sample is None or os.environ.get("CKPT_FAULT_ALL_CALLS") == "1":
            return list(range(1, n + 1))
        m = max(self.fault_sample, 2)
        return sorted({1 + round(i * (n - 1) / (m - 1)) for i in range(m)})

    @pytest.mark.parametrize("mode", MODES)
    def test_fault_at_every_call(
        self, op: str, mode: str, strategy: str, root: str, backend: ckpt.Backend
    ) -> None:
        inner = backend.bind(ckpt.registry.to_path(root))

        def case(k: int) -> _Case:
            fb = InstrumentedBackend(inner)
            return _Case(op, _join(root, f"k{k}"), strategy, fb)

        # Count the calls of a clean run.
        clean = case(0)
        clean.setup()
        clean.fb.fail_call(0)
        clean.run()
        n = clean.fb.call_count
        assert n > 0, f"{op} made no storage call"
        self._check(clean, k=0, mode=mode, raised=None)
        injected = 0
        for k in self._ks(n):
            c = case(k)
            c.setup()
            c.fb.fail_call(k, after=mode == "after")
            raised: BaseException | None = None
            try:
                c.run()
            except (OSError, RuntimeError, ValueError) as exc:
                raised = exc
            injected += bool(c.fb.injected)
            self._check(c, k=k, mode=mode, raised=raised)
        assert injected >= len(self._ks(n)) - 1, f"only {injected} of {n} faults were injected"

    @staticmethod
    def _check(c: _Case, *, k: int, mode: str, raised: BaseException | None) -> None:
        where = f"{c.op}, {mode} call {k} ({c.fb.injected or 'no fault'}), raised {raised!r}"
        steps = ckpt.checkpoint_steps(c.root, atomicity=c.strategy)
        for step in c.kept:
            assert step in steps, f"{where}: committed step {step} lost"
            assert c.matches(step), f"{where}: committed step {step} changed"
        for step in c.may_go:
            if step in steps:
                assert c.matches(step), f"{where}: step {step} torn"
        target_committed = c.target in steps
        if target_committed:
            assert c.matches(c.target), f"{where}: step {c.target} committed but torn"
        version = None
        if c.op == "snapshot_replace" and target_committed:
            version = c.snapshot_version()
            assert raised is not None or version == "new", f"{where}: replace reported success"
        if raised is None:
            if c.op == "manager_delete":
                assert not target_committed, f"{where}: delete reported success"
            elif c.op != "cleanup":
                assert target_committed, f"{where}: reported success, not committed"
        allowed = set(c.kept) | set(c.may_go) | {c.target}
        assert set(steps) <= allowed, f"{where}: unexpected steps {steps}"
        # Cleanup removes the leftovers; then the next attempt succeeds.
        if c.op == "partial_finalize" and not target_committed:
            c.retry()
        ckpt.cleanup_temporary_paths(c.root, atomicity=c.strategy)
        assert ckpt.all_temporary_paths(c.root, atomicity=c.strategy) == [], where
        steps = ckpt.checkpoint_steps(c.root, atomicity=c.strategy)
        leftovers = _leftovers(c, steps)
        assert not leftovers, f"{where}: leftovers after cleanup {leftovers}"
        if c.op == "manager_delete":
            if target_committed:
                c.retry()
            assert c.target not in ckpt.checkpoint_steps(c.root, atomicity=c.strategy), where
        elif c.op == "cleanup":
            c.retry()
        elif c.op == "snapshot_replace":
            # Cleanup (repair) leaves exactly one committed version: the one readers saw.
            assert c.target in steps, f"{where}: the replaced step is gone after cleanup"
            after_cleanup = c.snapshot_version()
            assert version in (None, after_cleanup), f"{where}: cleanup changed the version"
            assert raised is not None or after_cleanup == "new", where
            c.retry()
            assert c.snapshot_version() == "new", f"{where}: the next replace did not publish"
        elif not (target_committed or c.op == "partial_finalize"):
            c.retry()
            assert c.matches(c.target), f"{where}: the next save did not restore"
        for step in c.kept:
            assert c.matches(step), f"{where}: committed step {step} changed"
        c.plain().save(_join(c.root, "9"), _tree(9))
        assert _same(c.plain().restore(_join(c.root, "9")), _tree(9)), where


def _race_writer(
    strategy: str,
    final: str,
    tree: dict[str, Any],
    barrier: Any,
    outcome: dict[int, BaseException | None],
    i: int,
) -> None:
    saver = ckpt.Checkpointer(strategy)
    barrier.wait()
    try:
        saver.save(final, tree)
        outcome[i] = None
    except BaseException as exc:  # recorded and checked by the test
        outcome[i] = exc


class RaceConformance:
    """Writers racing to commit one step (mixed into :class:`BackendConformance`)."""

    race_rounds = 6
    race_writers = 3

    def test_racing_writers_of_one_step_have_one_winner(
        self, strategy: str, root: str, backend: ckpt.Backend
    ) -> None:
        import threading

        cls = ckpt.get_strategy(strategy)
        b = backend.bind(ckpt.registry.to_path(root))
        exclusive = [c for c in ("conditional_put", "atomic_dir_rename") if c in cls.requires]
        if not exclusive:
            pytest.skip(
                f"strategy {strategy!r} on {b.describe()} commits without conditional_put or "
                "atomic_dir_rename: it lacks the one-winner guarantee (two writers of one step "
                "may both report success, the last commit wins)"
            )
        conflicts = 0
        for r in range(self.race_rounds):
            final = _join(root, str(r))
            barrier = threading.Barrier(self.race_writers)
            outcome: dict[int, BaseException | None] = {}

            threads = [
                threading.Thread(
                    target=_race_writer,
                    args=(strategy, final, _tree(100 * r + i), barrier, outcome, i),
                )
                for i in range(self.race_writers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            winners = [i for i, exc in outcome.items() if exc is None]
            assert len(outcome) == self.race_writers, f"round {r}: a writer hung"
            assert len(winners) == 1, f"round {r}: winners {winners}, outcomes {outcome}"
            for i, exc in outcome.items():
                if exc is not None:
                    # CommitConflictError when it lost at the commit; "already exists" when the
                    # winner had committed before it started (its save is refused up front).
                    late = isinstance(exc, ValueError) and "already exists" in str(exc)
                    assert isinstance(exc, FileExistsError) or late, f"round {r}: {i}: {exc!r}"
                    conflicts += isinstance(exc, ckpt.CommitConflictError)
            restored = ckpt.Checkpointer(strategy, verify_checksums=True).restore(final)
            assert _same(restored, _tree(100 * r + winners[0])), f"round {r}: not the winner's"
            ckpt.cleanup_temporary_paths(root, atomicity=strategy)
            assert ckpt.all_temporary_paths(root, atomicity=strategy) == []
        assert ckpt.checkpoint_steps(root, atomicity=strategy) == list(range(self.race_rounds))
        # Evidence the writers did race: at least one loser got as far as the commit.
        assert conflicts > 0, "no writer lost at the commit: the race never happened"
