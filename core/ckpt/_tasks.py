"""Waiting for every task a coroutine started: a failed save must not leave writes running.

``asyncio.gather`` raises the first error of its children and lets the others run on, so
after one array write fails the others may still be writing when the save discards its
temporary directory (which then reappears). :func:`settled` runs a coroutine and, if it
fails, waits for every task it started, directly or not, before re-raising. Tasks are
tracked through a context variable read by a task factory on the running loop (children
inherit their creator's context), so unrelated tasks on the shared I/O loop are not waited
for.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger("ckpt")

T = TypeVar("T")

_SCOPE: contextvars.ContextVar[set[asyncio.Task[Any]] | None] = contextvars.ContextVar(
    "ckpt_task_scope", default=None
)


def _install(loop: asyncio.AbstractEventLoop) -> None:
    current = loop.get_task_factory()
    if getattr(current, "_ckpt_tracking", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        task: Any
        if current is not None:
            task = current(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        scope = _SCOPE.get()
        if scope is not None:
            scope.add(task)
        return task

    factory._ckpt_tracking = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


async def settled(coro: Coroutine[Any, Any, T], *, timeout: float) -> T:
    """Await ``coro``; if it fails, first wait (up to ``timeout`` seconds, then cancel) for
    every task it started, so none is still writing when the error is raised."""
    _install(asyncio.get_running_loop())
    scope: set[asyncio.Task[Any]] = set()
    token = _SCOPE.set(scope)
    try:
        return await coro
    except BaseException:
        pending = [t for t in scope if not t.done()]
        if pending:
            logger.info("Waiting for %d outstanding write(s) of a failed save.", len(pending))
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=timeout)
        for task in scope:  # retrieve their errors: they are reported by the first one
            if task.done() and not task.cancelled():
                task.exception()
        raise
    finally:
        _SCOPE.reset(token)
