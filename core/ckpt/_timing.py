"""Durations of checkpoint operations, reported to ``jax.monitoring`` and to the log.

Each phase of a save is one event named ``/ckpt/write/<phase>_secs``:

``blocking``
    the part of ``save`` the caller waits for (snapshot of the tree, validation);
``directory_creation``
    creating the temporary directory and its initial step metadata;
``write``
    writing the tree's arrays and JSON;
``commit``
    the strategy's commit (marker, rename, fsync);
``total``
    from the call to ``save`` until the checkpoint is committed.

Restores report ``/ckpt/read/total_secs``. Listen with
``jax.monitoring.register_event_duration_secs_listener``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax

__all__ = ["READ_PREFIX", "WRITE_PREFIX", "event_name", "record_duration", "timed"]

logger = logging.getLogger("ckpt")

WRITE_PREFIX = "/ckpt/write"
READ_PREFIX = "/ckpt/read"


def event_name(phase: str, prefix: str = WRITE_PREFIX) -> str:
    """The ``jax.monitoring`` event name of ``phase`` (e.g. ``/ckpt/write/commit_secs``)."""
    return f"{prefix}/{phase}_secs"


def record_duration(
    phase: str,
    secs: float,
    *,
    path: Any,
    prefix: str = WRITE_PREFIX,
    level: int = logging.DEBUG,
) -> None:
    """Report that ``phase`` of the operation on ``path`` took ``secs`` seconds."""
    jax.monitoring.record_event_duration_secs(event_name(phase, prefix), float(secs))
    logger.log(level, "%s %s of %s: %.3f s", prefix.rsplit("/", 1)[-1], phase, path, secs)


@contextlib.contextmanager
def timed(
    phase: str, *, path: Any, prefix: str = WRITE_PREFIX, level: int = logging.DEBUG
) -> Iterator[None]:
    """Time the ``with`` block and report it with :func:`record_duration` if it succeeds."""
    start = time.perf_counter()
    yield
    record_duration(phase, time.perf_counter() - start, path=path, prefix=prefix, level=level)
