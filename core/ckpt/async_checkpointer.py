"""``AsyncCheckpointer``: ``save`` returns after a short blocking part; the rest runs on a
background thread.

The blocking part validates the destination and snapshots the tree
(:func:`ckpt.tree_snapshot.prepare`: host copies of numpy arrays, device copies of jax
arrays), so the caller may change or donate its arrays as soon as ``save`` returns.
Everything that touches storage afterwards runs on one worker thread: creating the
temporary directory (never on the training thread, so a slow store cannot stall training,
orbax#179), writing the arrays, and the commit.

A save still in progress when the interpreter exits (a script that ends without
``close()``) is finished before the process exits; if it fails or times out, the error is
printed on stderr and the exit status is 1 (see :mod:`ckpt._exit`).

Errors are never lost: an error in the background is raised, once, by the next call to
``save``, ``restore``, ``metadata``, ``wait_until_finished``, ``check_for_errors`` or
``close``, and it is logged when it happens (one line, no traceback: the error itself
carries the detail). One that nobody collects is printed with its traceback at exit, and
the exit status is 1. A save that does not finish within
``timeout_secs`` is cancelled, its temporary data is discarded, and a ``TimeoutError``
explaining what to check is raised the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ckpt import _exit, tree_snapshot
from ckpt._sync import run as run_sync
from ckpt.backend import Backend
from ckpt.checkpointer import Checkpointer, SaveRequest, write_and_commit
from ckpt.errors import CommitNotDurableError
from ckpt.step_metadata import StepMetadata
from ckpt.strategy import FileOptions

__all__ = ["AsyncCheckpointer"]

logger = logging.getLogger("ckpt")


def _timeout_error(request: SaveRequest, timeout_secs: float) -> TimeoutError:
    phase = request.phase
    if phase in ("commit", "committed"):
        outcome = (
            "It timed out during the commit, so the checkpoint may or may not be committed: "
            f"check with ckpt.path_state({str(request.final)!r})."
        )
    else:
        outcome = (
            f"It timed out in the '{phase}' phase; nothing was committed and this "
            "writer's temporary data was discarded (or is left for cleanup)."
        )
    prepared = request.prepared
    nbytes = f"~{tree_snapshot.tree_nbytes(prepared)}" if prepared is not None else "all the"
    return TimeoutError(
        f"Asynchronous save of {request.final} did not finish within timeout_secs="
        f"{timeout_secs:g}. {outcome} Things to check: (1) the storage "
        f"({request.backend.describe()}) is reachable from this host and not throttling "
        "or rejecting requests; (2) its write throughput suffices for this checkpoint "
        f"({nbytes} bytes) within the timeout, and the job runs in the same region as "
        "the storage; (3) in a multi-host job, every process called save (a stuck "
        "multihost barrier waits for the missing ones); (4) the host is not starved of "
        "CPU or memory. Raise timeout_secs for very large checkpoints or slow stores."
    )


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (for a log record whose error is raised elsewhere)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class AsyncCheckpointer(Checkpointer):
    """Saves in the background; restores synchronously.

    Args:
        atomicity: the strategy name or ``auto``; None follows the configuration.
        timeout_secs: limit for the background part of one save (directory creation,
            write, commit). On expiry the save is cancelled and a ``TimeoutError`` is
            raised by the next call.
        post_finalization_callback: called with no arguments on the background thread
            after each save is committed (visible at its final path). If it raises, the
            error is reported like a failed save (the checkpoint stays committed).
        file_options: options for created directories.
        backend: a backend instance to use instead of the registered one.

    ``save`` waits for the previous save first (and raises its error, in which case the
    new save is not started). ``restore`` and ``metadata`` wait for a pending save too.
    """

    _snapshot_tree = True

    #: Extra time the caller waits for a worker whose I/O loop does not answer the
    #: timeout (e.g. a storage call that blocks the loop); the save is then abandoned.
    _HANG_GRACE_SECS = 60.0

    def __init__(
        self,
        atomicity: str | None = None,
        *,
        timeout_secs: float = 1200,
        post_finalization_callback: Callable[[], None] | None = None,
        file_options: FileOptions | None = None,
        backend: Backend | None = None,
        verify_checksums: bool | None = None,
    ) -> None:
        if timeout_secs <= 0:
            raise ValueError(f"timeout_secs must be positive, got {timeout_secs}.")
        super().__init__(
            atomicity,
            file_options=file_options,
            backend=backend,
            verify_checksums=verify_checksums,
        )
        self._timeout_secs = float(timeout_secs)
        self._post_finalization_callback = post_finalization_callback
        self._lock = threading.Lock()  # guards the fields below
        self._save_lock = threading.Lock()  # one save at a time
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._future: concurrent.futures.Future[None] | None = None
        self._request: SaveRequest | None = None
        self._deadline: float | None = None
        _exit.register(self)

    # -- background work -------------------------------------------------------------------
    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ckpt-async-save"
            )
        return self._executor

    def _run_in_background(
        self,
        request: SaveRequest,
        on_commit: Callable[[], None] | None,
        on_failure: Callable[[BaseException], None] | None,
    ) -> None:
        timeout = self._timeout_secs
        thread = threading.current_thread().name
        logger.info(
            "[thread=%s] Background save of %s started (timeout %gs).",
            thread,
            request.final,
            timeout,
        )

        async def bounded() -> None:
            deadline = asyncio.timeout(timeout)
            try:
                async with deadline:
                    await write_and_commit(request)
            except TimeoutError:
                if deadline.expired():  # ours, not a storage library's own timeout
                    raise _timeout_error(request, timeout) from None
                raise

        try:
            run_sync(bounded())
        except CommitNotDurableError as exc:
            request.prepared = None
            logger.error("Background save of %s: %s", request.final, exc)
            if on_commit is not None:  # committed: the step exists
                on_commit()
            raise
        except BaseException as exc:
            request.prepared = None  # free the snapshot (host or device memory) now
            # One line: the error itself is raised to the caller by the next call (or, if
            # nobody collects it, printed in full at interpreter exit: see ckpt._exit).
            logger.error(
                "Background save of %s failed (raised by the next call): %s",
                request.final,
                _one_line(exc),
            )
            if on_failure is not None:
                on_failure(exc)
            raise
        request.prepared = None  # free the snapshot (host or device memory) now
        logger.info("Background save of %s committed.", request.final)
        try:
            if on_commit is not None:  # internal bookkeeping (the manager's) first
                on_commit()
            if self._post_finalization_callback is not None:
                self._post_finalization_callback()
        except BaseException as exc:
            exc.add_note(
                f"Raised by a callback after {request.final} was committed; the checkpoint "
                "itself is complete."
            )
            logger.error("Post-commit callback of %s failed: %r", request.final, exc)
            raise

    # -- errors and waiting ------------------------------------------------------------------
    def _take(self, *, wait: bool) -> None:
        """Collect the pending save: wait for it (or only if done), raise its error once."""
        with self._lock:
            future, request, deadline = self._future, self._request, self._deadline
        if future is None or (not wait and not future.done()):
            return
        limit = None
        if deadline is not None:
            limit = max(0.0, deadline - time.monotonic()) + self._HANG_GRACE_SECS
        concurrent.futures.wait([future], timeout=limit)
        if not future.done():
            # The worker did not come back: abandon it (it may still finish).
            with self._lock:
                if self._future is future:
                    self._clear()
                    if self._executor is not None:
                        self._executor.shutdown(wait=False)
                        self._executor = None
            assert request is not None
            err = _timeout_error(request, self._timeout_secs)
            err.add_note(
                "The background worker did not respond to the timeout (a storage call may "
                "be blocking its event loop); it was abandoned."
            )
            raise err
        try:
            future.result()
        except BaseException:
            with self._lock:
                if self._future is not future:
                    return  # another thread collected (and raised) this error already
                self._clear()
            raise
        with self._lock:
            if self._future is future:
                self._clear()

    def _clear(self) -> None:
        self._future = self._request = self._deadline = None

    def check_for_errors(self) -> None:
        """Raise the error of a finished background save (once); never blocks."""
        self._take(wait=False)

    def wait_until_finished(self) -> None:
        """Block until the pending save (if any) is committed; raise its error (once)."""
        with self._lock:
            future, request = self._future, self._request
        if future is not None and not future.done() and request is not None:
            logger.info("Waiting for the background save of %s.", request.final)
        self._take(wait=True)

    # -- public API ------------------------------------------------------------------------
    def save(
        self,
        path: Any,
        tree: Any,
        *,
        force: bool = False,
        custom_metadata: dict[str, Any] | None = None,
    ) -> None:
        """Start saving ``tree`` to ``path``; returns after the blocking part.

        Waits for the previous save first and raises its error, if any (this save is then
        not started). Validation errors (existing destination, bad custom metadata,
        unsupported leaves) are raised here; storage errors by a later call. See
        :meth:`Checkpointer.save` for the arguments.
        """
        self._save(path, tree, force=force, custom_metadata=custom_metadata)

    def _save(
        self,
        path: Any,
        tree: Any,
        *,
        force: bool = False,
        custom_metadata: dict[str, Any] | None = None,
        on_commit: Callable[[], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        with self._save_lock:
            self.wait_until_finished()
            try:
                request = self._prepare(path, tree, force=force, custom_metadata=custom_metadata)
            except BaseException as exc:
                if on_failure is not None:
                    on_failure(exc)
                raise
            with self._lock:
                self._request = request
                self._deadline = time.monotonic() + self._timeout_secs
                self._future = self._worker().submit(
                    self._run_in_background, request, on_commit, on_failure
                )

    def restore(self, path: Any, target: Any = None) -> Any:
        """Wait for a pending save, then restore (see :meth:`Checkpointer.restore`)."""
        self.wait_until_finished()
        return super().restore(path, target)

    def metadata(self, path: Any) -> StepMetadata:
        """Wait for a pending save, then read the step metadata of ``path``."""
        self.wait_until_finished()
        return super().metadata(path)

    def close(self) -> None:
        """Wait for the pending save, raise its error if any, and stop the worker."""
        try:
            self.wait_until_finished()
        finally:
            with self._lock:
                executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=True)
            super().close()

    def _finish_at_exit(self) -> None:
        """At interpreter exit (see :mod:`ckpt._exit`): wait for a save in progress and
        raise its error; raise :class:`ckpt._exit.UncollectedError` from the error of one
        that already failed (the process then exits with status 1 either way)."""
        with self._lock:
            future, request = self._future, self._request
        if future is None:
            return
        if future.done():
            try:
                self._take(wait=False)
            except BaseException as exc:  # exit status 1, as for a save still running
                raise _exit.UncollectedError(str(exc)) from exc
            return
        if request is not None:
            logger.info("Interpreter exit: waiting for the background save of %s.", request.final)
        self.wait_until_finished()

    def __del__(self) -> None:
        future = getattr(self, "_future", None)
        if future is not None and not future.done():
            logger.warning(
                "AsyncCheckpointer deleted while a save is in progress; call "
                "wait_until_finished() or close() so that its errors are not lost."
            )
