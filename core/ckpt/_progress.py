"""Progress bars for long saves and restores (rich, on stderr, transient)."""

from __future__ import annotations

import contextlib
import sys
import threading
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
    """A callback that advances a transient bytes bar, or None when disabled."""
    if not enabled:
        yield None
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
