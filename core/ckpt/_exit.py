"""Finish pending background saves when the interpreter exits.

A script that ends right after ``manager.save(...)`` (no ``close()``) must not lose the
save. At exit Python first runs the hooks registered with ``threading._register_atexit``
(newest first), then joins non-daemon threads, then runs :mod:`atexit` callbacks.
``concurrent.futures`` registers such a hook that makes every executor refuse new work
(``cannot schedule new futures after interpreter shutdown``): a background save that is
still writing then fails, because ``asyncio.to_thread`` needs the loop's executor. ckpt's
hook, registered after that one and so run before it, waits for every live
:class:`~ckpt.AsyncCheckpointer` and :class:`~ckpt.CheckpointManager`.

A save that fails, or does not finish within its ``timeout_secs`` (plus a grace period), is
reported on stderr (with its traceback: nobody else will see that error) and the process
exits with status 1 (``os._exit``: a hung worker thread could otherwise never be joined).
So does a save that had already failed before the exit and whose error nobody collected
(no later ``save``, ``wait_until_finished`` or ``close``): a job scheduler never sees
success for a run whose last checkpoint was not written.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import traceback
import weakref
from typing import Any, Protocol

logger = logging.getLogger("ckpt")

#: Exit status when a background save could not be finished at interpreter exit.
EXIT_STATUS_ON_FAILURE = 1


class UncollectedError(Exception):
    """Raised (from the save's error) by ``_finish_at_exit`` for a background save that
    had already failed before the interpreter exit, its error never collected."""


class _Finishable(Protocol):
    def _finish_at_exit(self) -> None: ...


# Managers first: a manager's own checkpointer is then idle when its turn comes.
_managers: weakref.WeakSet[Any] = weakref.WeakSet()
_checkpointers: weakref.WeakSet[Any] = weakref.WeakSet()
_registered = False
_lock = threading.Lock()


def register(obj: _Finishable, *, manager: bool = False) -> None:
    """Finish ``obj``'s background work at interpreter exit (held weakly)."""
    global _registered
    with _lock:
        (_managers if manager else _checkpointers).add(obj)
        if not _registered:
            _registered = True
            # Importing concurrent.futures.thread registers its hook first, so ours runs
            # before it (the hooks run newest first).
            import concurrent.futures.thread  # noqa: F401

            register_hook = getattr(threading, "_register_atexit", None)
            if register_hook is not None:
                register_hook(_finish_all)
            else:  # pragma: no cover - every CPython since 3.9 has it
                atexit.register(_finish_all)


def _finish_all() -> None:
    failures: list[tuple[str, BaseException]] = []
    for group in (_managers, _checkpointers):
        for obj in list(group):
            try:
                obj._finish_at_exit()
            except UncollectedError as exc:
                error = exc.__cause__ if exc.__cause__ is not None else exc
                failures.append(
                    ("an earlier background save failed and its error was never collected", error)
                )
            except BaseException as exc:  # report every failure, then exit non-zero
                failures.append(
                    ("a background save could not be finished at interpreter exit", exc)
                )
    if not failures:
        return
    for what, error in failures:
        traceback.print_exception(error, file=sys.stderr)
        print(f"ckpt: {what}: {type(error).__name__}: {error}", file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(EXIT_STATUS_ON_FAILURE)
