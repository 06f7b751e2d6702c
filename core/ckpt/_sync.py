"""The sync facade: run ckpt's coroutines on fsspec's I/O event loop.

All async storage primitives (ours and fsspec's async filesystems) run on one loop,
owned by fsspec, so that async filesystems' sessions stay bound to the loop they were
made on. Sync entry points call :func:`run`.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import fsspec.asyn

T = TypeVar("T")


def loop() -> Any:
    """The event loop all storage coroutines run on."""
    return fsspec.asyn.get_loop()


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the I/O loop and return its result (callable from any thread)."""

    async def _wrapped() -> tuple[bool, Any]:
        # fsspec.asyn.sync replaces a TimeoutError raised by the coroutine with a bare
        # FSTimeoutError: carry exceptions out as values so their messages survive.
        try:
            return True, await coro
        except Exception as exc:
            return False, exc

    ok, value = fsspec.asyn.sync(loop(), _wrapped, timeout=timeout)
    if ok:
        return value  # type: ignore[no-any-return]
    raise value
