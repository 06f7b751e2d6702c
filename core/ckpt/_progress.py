"""Progress bars for long saves and restores (rich, on stderr, transient)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

#: Callback handed to the tree format: ``progress(advance_bytes, total_bytes)``.
ProgressCallback = Callable[[int, int], None]

#: With ``progress=None`` (auto), a bar is shown for trees at least this large, and only
#: when stderr is a terminal.
AUTO_MIN_BYTES = 256 * 1024 * 1024


def wanted(progress: bool | None, nbytes: int | None = None) -> bool:
    """Whether to show a bar: ``True``/``False`` as given; ``None`` means a terminal and a
    large enough tree (unknown size counts as large)."""
    if progress is not None:
        return progress
    if not sys.stderr.isatty():
        return False
    return nbytes is None or nbytes >= AUTO_MIN_BYTES


@contextlib.contextmanager
def byte_progress(description: str, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A callback that advances a transient bytes bar, or None when disabled. Where stderr
    is not a terminal (a log file, a pipe, a notebook), plain progress lines instead: one
    at the start, one per 10% and one at the end."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        with _plain_progress(description) as callback:
            yield callback
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    lock = threading.Lock()
    task = bar.add_task(description, total=None)

    def advance(done: int, total: int) -> None:
        with lock:
            bar.update(task, advance=done, total=total)

    with bar:
        yield advance


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextlib.contextmanager
def _plain_progress(description: str) -> Iterator[ProgressCallback]:
    """Plain text progress lines on stderr (no control characters)."""
    lock = threading.Lock()
    state = {"done": 0, "total": 0, "printed": -1}
    start = time.monotonic()

    def line(percent: int) -> None:
        done, total = state["done"], state["total"]
        print(
            f"{description}: {percent}% ({_size(done)} of {_size(total)})",
            file=sys.stderr,
            flush=True,
        )
        state["printed"] = percent

    def advance(done: int, total: int) -> None:
        with lock:
            state["done"] += done
            state["total"] = total
            percent = 100 if total <= 0 else min(100, int(100 * state["done"] / total))
            if percent // 10 > state["printed"] // 10 or state["printed"] < 0:
                line(percent - percent % 10 if percent < 100 else 100)

    yield advance
    with lock:
        if state["printed"] < 100 and state["done"] >= state["total"]:
            line(100)
        elapsed = time.monotonic() - start
        print(f"{description}: done in {elapsed:.1f} s", file=sys.stderr, flush=True)
