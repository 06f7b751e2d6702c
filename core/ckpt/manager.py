"""``CheckpointManager``: numbered steps in one directory, with retention and cleanup.

Steps are subdirectories named by a :class:`ckpt.NameFormat` (``0``, ``step_0042``, ...).
The manager finds committed steps with one listing (``name_format.find_all``), saves new
steps through an :class:`~ckpt.AsyncCheckpointer` (or a :class:`~ckpt.Checkpointer`) and
keeps the newest ``max_to_keep`` steps.

Background work never delays training and never endangers a checkpoint:

- old steps beyond ``max_to_keep`` are deleted only after the new step is committed, on a
  background thread (a failed save deletes nothing);
- stale temporary checkpoints are removed on a background thread started with the
  manager, so the first save does not wait for it. Only temporaries whose names record a
  creation time before the manager started are removed (plus Orbax-named ones, which
  carry no time), so a writer that started later, in this process or another, is safe.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from types import TracebackType
from typing import Any, Self

from upath import UPath

from ckpt import _exit, multihost
from ckpt._sync import run as run_sync
from ckpt.async_checkpointer import AsyncCheckpointer
from ckpt.backend import Backend
from ckpt.checkpointer import Checkpointer
from ckpt.cleanup import all_temporary_paths_async, remove_temporaries, repair_async
from ckpt.committed import delete_with
from ckpt.paths import to_path
from ckpt.registry import resolve
from ckpt.step import (
    NameFormat,
    build_step_path,
    has_commit_evidence,
    newest_with_evidence,
    standard_name_format,
)
from ckpt.step_metadata import StepMetadata
from ckpt.strategy import FileOptions

__all__ = ["CheckpointManager"]

logger = logging.getLogger("ckpt")


class CheckpointManager:
    """Saves, finds, restores and garbage-collects numbered checkpoints in ``directory``.

    Args:
        directory: the root directory of the steps (local path or URL).
        max_to_keep: keep at most this many committed steps (the newest); None keeps all.
        step_prefix: step names are ``<prefix>_<step>``.
        step_format_fixed_length: zero-pad step numbers to this many digits.
        name_format: a custom :class:`ckpt.NameFormat` (instead of the two above). Build
            it with the same ``atomicity`` as the manager.
        atomicity: the strategy name or ``auto``; None follows the configuration.
        async_save: save in the background (:class:`~ckpt.AsyncCheckpointer`).
        cleanup_tmp_directories: remove stale temporary checkpoints in the background.
        timeout_secs: limit of one background save (with ``async_save``).
        file_options: options for created directories.
        backend: a backend instance to use instead of the registered one.
        verify_checksums: restores check every file's CRC32C against the manifest (see
            :class:`ckpt.Checkpointer`); None follows the configuration.

    Example::

        with ckpt.CheckpointManager("/ckpts", max_to_keep=3) as mngr:
            for step in range(start, end):
                state = train_step(state)
                if step % 1000 == 0:
                    mngr.save(step, state)
    """

    def __init__(
        self,
        directory: Any,
        *,
        max_to_keep: int | None = None,
        step_prefix: str | None = None,
        step_format_fixed_length: int | None = None,
        name_format: NameFormat | None = None,
        atomicity: str | None = None,
        async_save: bool = True,
        cleanup_tmp_directories: bool = True,
        timeout_secs: float = 1200,
        file_options: FileOptions | None = None,
        backend: Backend | None = None,
        verify_checksums: bool | None = None,
    ) -> None:
        self._start_ns = time.time_ns()
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}.")
        if name_format is not None and (
            step_prefix is not None or step_format_fixed_length is not None
        ):
            raise ValueError(
                "Pass either name_format or step_prefix/step_format_fixed_length, not both."
            )
        self.directory: UPath = to_path(directory)
        self._resolution = resolve(self.directory, atomicity, backend=backend)
        self._backend = self._resolution.backend
        self._max_to_keep = max_to_keep
        self._name_format = name_format or standard_name_format(
            step_prefix, step_format_fixed_length, atomicity=atomicity
        )
        checkpointer: Checkpointer
        if async_save:
            checkpointer = AsyncCheckpointer(
                atomicity,
                timeout_secs=timeout_secs,
                file_options=file_options,
                backend=backend,
                verify_checksums=verify_checksums,
            )
        else:
            checkpointer = Checkpointer(
                atomicity,
                file_options=file_options,
                backend=backend,
                verify_checksums=verify_checksums,
            )
        self._checkpointer = checkpointer
        self._lock = threading.Lock()
        self._steps: dict[int, UPath] = {}  # committed steps known to this manager
        self._committed_here: set[int] = set()  # steps this manager committed
        self._pending: tuple[int, UPath] | None = None  # the save in progress
        self._background = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ckpt-delete"
        )
        self._deletions: list[concurrent.futures.Future[Any]] = []
        self._closed = False
        # Several processes (jax.distributed): the primary lists, cleans up and deletes; the
        # others learn the steps from it (see ckpt.multihost).
        self._coordinator = multihost.current()
        self.reload()
        # Its own thread: a slow cleanup delays neither saves nor deletions (nor restores).
        self._cleanup_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._cleanup: concurrent.futures.Future[Any] | None = None
        if cleanup_tmp_directories and self._coordinator.is_primary:
            self._cleanup_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ckpt-cleanup"
            )
            self._cleanup = self._cleanup_executor.submit(self._cleanup_temporaries)
        _exit.register(self, manager=True)

    def _finish_at_exit(self) -> None:
        """At interpreter exit (see :mod:`ckpt._exit`): finish the pending save, the
        deletions of old steps and the cleanup; raise a failed save's error."""
        if self._closed:
            return
        try:
            if isinstance(self._checkpointer, AsyncCheckpointer):
                self._checkpointer._finish_at_exit()
        finally:
            self._wait_for_deletions()
            if self._cleanup is not None:
                concurrent.futures.wait([self._cleanup])

    # -- background work -------------------------------------------------------------------
    def _cleanup_temporaries(self) -> None:
        strategy = self._resolution.strategy
        try:
            # First repair what an interrupted commit or replace left (the strategies'
            # own recovery), and learn the steps that brings back.
            entries, repaired = run_sync(repair_async(self.directory, self._backend, strategy))
            if repaired:
                names = {p.name for p in repaired}
                back = {
                    m.step: m.path
                    for m in self._name_format.find_all(self.directory)
                    if m.name in names
                }
                with self._lock:
                    for step, path in back.items():
                        self._steps.setdefault(step, path)
            temps = run_sync(
                all_temporary_paths_async(
                    self.directory,
                    self._backend,
                    strategy=strategy,
                    created_before_ns=self._start_ns,
                    entries=entries,
                )
            )
            removed = run_sync(remove_temporaries(self._backend, temps))
        except Exception as exc:  # cleanup is best effort; the next manager retries
            logger.warning("Cleanup of temporary checkpoints in %s failed: %r", self.directory, exc)
            return
        # A step name the listing took for a step but that was a leftover (e.g. an empty
        # directory: see reload) is gone now: forget it, unless this manager committed a
        # new checkpoint under that name since.
        gone = {str(p) for p in removed}
        with self._lock:
            for step, path in list(self._steps.items()):
                if str(path) in gone and step not in self._committed_here:
                    del self._steps[step]
        if removed:
            logger.info("Removed %d temporary checkpoint(s) in %s.", len(removed), self.directory)

    def _delete_in_background(self, doomed: dict[int, UPath]) -> None:
        for step, path in sorted(doomed.items()):
            try:
                if self._backend.names_decide_commit and not has_commit_evidence(
                    self._resolution, path
                ):
                    # Listed by name only, never committed: another writer's save in
                    # progress, or a copy without its marker. Not ours to delete.
                    logger.warning(
                        "Not deleting step %d (%s): it has no commit evidence.", step, path
                    )
                    continue
                logger.info("Deleting step %d (%s): beyond max_to_keep.", step, path)
                run_sync(delete_with(self._backend, path, self._resolution.strategy))
            except Exception as exc:  # keep it known; the next save retries
                logger.warning("Could not delete old step %d (%s): %r", step, path, exc)
                with self._lock:
                    self._steps[step] = path

    def _on_commit(self, step: int, path: UPath) -> None:
        """After ``step`` is committed (on the saving thread): record it, retire old steps."""
        with self._lock:
            self._steps[step] = path
            self._committed_here.add(step)
            if self._pending is not None and self._pending[0] == step:
                self._pending = None
            doomed: dict[int, UPath] = {}
            if self._max_to_keep is not None:
                for old in sorted(self._steps)[: -self._max_to_keep]:
                    doomed[old] = self._steps.pop(old)
            if doomed and self._coordinator.is_primary:  # retention: the primary's job
                self._deletions = [f for f in self._deletions if not f.done()]
                self._deletions.append(self._background.submit(self._delete_in_background, doomed))

    def _on_failure(self, step: int) -> None:
        with self._lock:
            if self._pending is not None and self._pending[0] == step:
                self._pending = None

    def _wait_for_deletions(self) -> None:
        with self._lock:
            pending = list(self._deletions)
        concurrent.futures.wait(pending)

    def _collect(self) -> None:
        """Wait for the pending save; on failure forget its step and re-raise the error."""
        try:
            if isinstance(self._checkpointer, AsyncCheckpointer):
                self._checkpointer.wait_until_finished()
        except BaseException:
            with self._lock:
                self._pending = None
            raise
        with self._lock:
            self._pending = None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"CheckpointManager for {self.directory} is closed.")

    # -- steps -----------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the committed steps from storage (one listing).

        The latest step is confirmed by the classifier restores use
        (:func:`ckpt.path_state`: a few checks of that one step); steps above the newest
        finalized one are dropped: an empty step directory (left by a ``commit_file`` save
        killed at its commit, or made by hand), a prefix copied without its marker, another
        writer's save in progress. Such a leftover further down is dropped once the
        background cleanup has removed it.

        With several processes only the primary lists; the others receive its result (so
        N processes cost the store one listing)."""
        op = (
            self._coordinator.operation("reload", self.directory)
            if self._coordinator.multiprocess
            else None
        )
        found: dict[int, UPath] = {}
        if op is None or self._coordinator.is_primary:
            listed = list(self._name_format.find_all(self.directory))
            latest = newest_with_evidence(self._resolution, listed)
            found = {m.step: m.path for m in listed if latest is not None and m.step <= latest.step}
        if op is not None:
            shared = op.broadcast(
                "steps", json.dumps({str(k): str(v) for k, v in found.items()}).encode()
            )
            found = {int(k): to_path(v) for k, v in json.loads(shared).items()}
        with self._lock:
            self._steps = found

    def all_steps(self) -> list[int]:
        """Committed steps, ascending, plus the step of a save still in progress (as in
        Orbax; :meth:`restore` waits for it, and it disappears if that save fails)."""
        with self._lock:
            steps = set(self._steps)
            if self._pending is not None:
                steps.add(self._pending[0])
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The highest step of :meth:`all_steps`, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_path(self, step: int) -> UPath:
        with self._lock:
            if step in self._steps:
                return self._steps[step]
        try:
            return self._name_format.find_step(self.directory, step).path
        except ValueError:
            raise FileNotFoundError(
                f"No committed checkpoint for step {step} in {self.directory} "
                f"(name format {self._name_format})."
            ) from None

    # -- public API ------------------------------------------------------------------------
    def save(self, step: int, tree: Any, custom_metadata: dict[str, Any] | None = None) -> bool:
        """Save ``tree`` as ``step``. Returns True if a save was started, False if ``step``
        is lower than the latest step (nothing is saved, as in Orbax).

        With ``async_save`` it returns after the blocking part (see
        :class:`~ckpt.AsyncCheckpointer`); it first waits for the previous save and raises
        its error, if any (this save is then not started).

        Raises:
            ValueError: ``step`` already exists (committed or being saved).
        """
        self._check_open()
        step = int(step)
        self._collect()
        with self._lock:
            exists = step in self._steps
            latest = max(self._steps, default=None)
        if exists:
            raise ValueError(
                f"Step {step} already exists in {self.directory}; delete it first to save it again."
            )
        if latest is not None and step < latest:
            logger.info("Not saving step %d: the latest step is %d.", step, latest)
            return False
        path = build_step_path(self.directory, self._name_format, step)
        with self._lock:
            self._pending = (step, path)
        self._checkpointer._save(
            path,
            tree,
            custom_metadata=custom_metadata,
            on_commit=lambda: self._on_commit(step, path),
            on_failure=lambda exc: self._on_failure(step),
        )
        return True

    def restore(self, step: int | None = None, target: Any = None) -> Any:
        """Restore ``step`` (default: the latest committed step); waits for a pending save
        and for deletions in progress first.

        Raises:
            FileNotFoundError: there is no committed step (or not this one).
        """
        self._check_open()
        self._collect()
        self._wait_for_deletions()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No committed checkpoint found in {self.directory}.")
        return self._checkpointer.restore(self._step_path(int(step)), target)

    def metadata(self, step: int | None = None) -> StepMetadata:
        """The step metadata (``_CHECKPOINT_METADATA``) of ``step`` (default: latest)."""
        self._check_open()
        self._collect()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No committed checkpoint found in {self.directory}.")
        return self._checkpointer.metadata(self._step_path(int(step)))

    def delete(self, step: int) -> None:
        """Delete ``step`` now (uncommitted first, then its files; see
        :func:`ckpt.delete_checkpoint`). Waits for a pending save first.

        Raises:
            FileNotFoundError: ``step`` is not a committed step.
        """
        self._check_open()
        self._collect()
        self._wait_for_deletions()
        path = self._step_path(int(step))
        op = self._coordinator.operation("delete", path) if self._coordinator.multiprocess else None
        if op is None or self._coordinator.is_primary:
            run_sync(delete_with(self._backend, path, self._resolution.strategy))
        if op is not None:
            op.barrier("deleted")  # every process returns once the step is gone
        with self._lock:
            self._steps.pop(int(step), None)

    def wait_until_finished(self) -> None:
        """Wait for the pending save, old-step deletions and the temporary cleanup; raise
        the error of a failed save (once)."""
        try:
            self._collect()
        finally:
            self._wait_for_deletions()
            if self._cleanup is not None:
                concurrent.futures.wait([self._cleanup])

    def close(self) -> None:
        """Wait for all background work (raising a failed save's error) and stop."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            try:
                self._checkpointer.close()
            finally:
                self._background.shutdown(wait=True)
                if self._cleanup_executor is not None:
                    self._cleanup_executor.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, name_format={self._name_format})"
