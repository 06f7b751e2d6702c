"""Discovery: what each child of a checkpoint root is, and the state of one path.

Every strategy the backend runs reads the same one listing of the root
(:meth:`ckpt.TemporaryPath.scan`), so a root that holds checkpoints of several layouts is
understood whatever strategy is configured. The configured strategy decides what is
committed; any strategy's positive evidence of a leftover of its own layout makes a child
*temporary*; a child with neither is *unknown*: never reported finalized, never deleted.
Symbolic links are never temporary checkpoints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from typing import Any

from upath import UPath

from ckpt import _sync
from ckpt.backend import Backend, Entry
from ckpt.paths import to_path
from ckpt.registry import Resolution, resolve, strategies_for
from ckpt.strategy import TemporaryPath

__all__ = [
    "PathState",
    "RootScan",
    "is_path_finalized",
    "is_path_temporary",
    "path_state",
    "path_state_async",
    "scan_root",
]


class PathState(enum.StrEnum):
    """What a directory under a checkpoint root is."""

    FINALIZED = "finalized"
    TEMPORARY = "temporary"
    UNKNOWN = "unknown"


@dataclasses.dataclass
class RootScan:
    """Every child of a root, classified (see :func:`scan_root`)."""

    root: UPath
    entries: list[Entry]
    finalized: list[str]
    temporary: list[TemporaryPath]
    unknown: list[str]
    internal: set[str]

    def state_of(self, name: str) -> PathState | None:
        """The state of the child ``name`` of the root (None for files, links, internal)."""
        if name in self.finalized:
            return PathState.FINALIZED
        if name in self.unknown:
            return PathState.UNKNOWN
        if any(str(t.get()) == str(self.root / name) for t in self.temporary):
            return PathState.TEMPORARY
        return None


async def scan_root(
    root: UPath,
    backend: Backend,
    strategy: type[TemporaryPath],
    entries: list[Entry] | None = None,
) -> RootScan:
    """Classify the children of ``root`` with one listing (``entries``, if given) read by
    every strategy the backend runs, ``strategy`` (the configured one) deciding commits."""
    if entries is None:
        entries = await backend.list_dir(root)
    strategies = strategies_for(backend, strategy)
    scans = await asyncio.gather(*(s.scan(backend, root, entries) for s in strategies))
    internal = {name for scan in scans for name in scan.internal}
    temporary: list[TemporaryPath] = []
    seen: set[str] = set()
    owned = {str(root / name) for name in internal}  # one layout's own directory
    for scan in scans:
        for tmp in scan.temporary:
            key = str(tmp.get())
            if key not in seen and key not in owned:
                seen.add(key)
                temporary.append(tmp)
    finalized = [n for n in scans[0].finalized if n not in internal and str(root / n) not in seen]
    committed = set(finalized)
    unknown = [
        e.name
        for e in entries
        if e.is_dir
        and not e.is_link
        and e.name not in internal
        and e.name not in committed
        and str(root / e.name) not in seen
    ]
    return RootScan(root, entries, finalized, temporary, unknown, internal)


async def is_temporary_async(
    backend: Backend, path: UPath, strategy: type[TemporaryPath] | None = None
) -> bool:
    """True if any strategy the backend runs has positive evidence that ``path`` is a
    leftover of its layout."""
    if await backend.is_link(path):
        return False
    for cls in strategies_for(backend, strategy):
        if await cls.is_temporary(backend, path):
            return True
    return False


async def path_state_async(
    path: UPath, strategy: type[TemporaryPath], backend: Backend
) -> PathState:
    """The state of ``path`` under ``strategy`` (see :class:`PathState`)."""
    if await is_temporary_async(backend, path, strategy):
        return PathState.TEMPORARY
    if await strategy.is_finalized(backend, path):
        return PathState.FINALIZED
    return PathState.UNKNOWN


def _resolved(location: Any, atomicity: str | None) -> tuple[UPath, Resolution]:
    path = to_path(location)
    return path, resolve(path, atomicity)


def is_path_finalized(path: Any, *, atomicity: str | None = None) -> bool:
    """True if ``path`` is a committed checkpoint under the configured strategy."""
    return path_state(path, atomicity=atomicity) is PathState.FINALIZED


def is_path_temporary(path: Any, *, atomicity: str | None = None) -> bool:
    """True if ``path`` is a temporary checkpoint (positive evidence only)."""
    p, r = _resolved(path, atomicity)
    return _sync.run(is_temporary_async(r.backend, p, r.strategy))


def path_state(path: Any, *, atomicity: str | None = None) -> PathState:
    """``finalized``, ``temporary`` or ``unknown``."""
    p, r = _resolved(path, atomicity)
    return _sync.run(path_state_async(p, r.strategy, r.backend))
