"""Finding, classifying and cleaning up temporary checkpoints.

"Temporary" needs positive evidence: the temporary suffix in the name, or the in-progress
state ckpt's own ``commit_file`` save leaves (a writer directory and no commit marker).
A directory with neither commit nor in-progress evidence is *unknown*: never reported
finalized and never deleted. Symbolic links are never temporary checkpoints.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from upath import UPath

from ckpt import _sync
from ckpt.backend import Backend, Entry
from ckpt.layout import COMMIT_SUCCESS_FILE, is_temporary_name, is_writer_dir_name
from ckpt.paths import to_path
from ckpt.registry import get_strategy, resolve
from ckpt.temporary_path import TemporaryPath

logger = logging.getLogger(__name__)

__all__ = [
    "PathState",
    "all_temporary_paths",
    "cleanup_temporary_paths",
    "is_path_finalized",
    "is_path_temporary",
    "path_state",
]


class PathState(enum.StrEnum):
    """What a directory under a checkpoint root is."""

    FINALIZED = "finalized"
    TEMPORARY = "temporary"
    UNKNOWN = "unknown"


async def has_inprogress_writer(
    backend: Backend, path: UPath, entries: list[Entry] | None = None
) -> bool:
    """True if ``path`` holds a ckpt writer directory and no commit marker."""
    if entries is None:
        entries = await backend.list_dir(path)
    if any(e.name == COMMIT_SUCCESS_FILE for e in entries):
        return False
    return any(e.is_dir and not e.is_link and is_writer_dir_name(e.name) for e in entries)


async def _writer_dirs(backend: Backend, path: UPath) -> list[str]:
    entries = await backend.list_dir(path)
    if any(e.name == COMMIT_SUCCESS_FILE for e in entries):
        return []
    return [e.name for e in entries if e.is_dir and not e.is_link and is_writer_dir_name(e.name)]


async def is_temporary_async(backend: Backend, path: UPath) -> bool:
    if await backend.is_link(path):
        return False
    if is_temporary_name(path.name):
        return await backend.is_dir(path)
    if is_writer_dir_name(path.name):
        return await backend.is_dir(path) and await has_inprogress_writer(backend, path.parent)
    return await has_inprogress_writer(backend, path)


async def path_state_async(
    path: UPath, strategy: type[TemporaryPath], backend: Backend
) -> PathState:
    if await strategy.is_finalized(backend, path):
        return PathState.FINALIZED
    if await is_temporary_async(backend, path):
        return PathState.TEMPORARY
    return PathState.UNKNOWN


async def all_temporary_paths_async(root: UPath, backend: Backend) -> list[TemporaryPath]:
    """Every temporary checkpoint directly under ``root`` (one listing + batched checks)."""
    entries = await backend.list_dir(root)
    found: list[TemporaryPath] = []
    rename_cls = get_strategy("rename")
    commit_cls = get_strategy("commit_file")
    plain: list[str] = []
    for entry in entries:
        if entry.is_link or not entry.is_dir:
            continue
        if is_temporary_name(entry.name):
            found.append(rename_cls.from_temporary(root / entry.name, backend=backend))
        else:
            plain.append(entry.name)
    committed = await backend.exists_many([root / n / COMMIT_SUCCESS_FILE for n in plain])
    unmarked = [n for n, ok in zip(plain, committed, strict=True) if not ok]
    for name in unmarked:
        for writer in await _writer_dirs(backend, root / name):
            found.append(commit_cls.from_temporary(root / name / writer, backend=backend))
    return found


async def cleanup_temporary_paths_async(root: UPath, backend: Backend) -> list[UPath]:
    """Remove every temporary checkpoint under ``root``; return what was removed."""
    removed: list[UPath] = []
    for tmp in await all_temporary_paths_async(root, backend):
        path = tmp.get()
        logger.info("Removing temporary checkpoint %s", path)
        await backend.remove_tree(path)
        removed.append(path)
        if is_writer_dir_name(path.name):
            final = tmp.get_final()
            if not await backend.list_dir(final):
                await backend.remove_tree(final)
    return removed


def _backend_and_strategy(location: Any, atomicity: str | None) -> tuple[UPath, Any]:
    path = to_path(location)
    return path, resolve(path, atomicity)


def is_path_finalized(path: Any, *, atomicity: str | None = None) -> bool:
    """True if ``path`` is a committed checkpoint under the configured strategy."""
    p, r = _backend_and_strategy(path, atomicity)
    return _sync.run(r.strategy.is_finalized(r.backend, p))


def is_path_temporary(path: Any, *, atomicity: str | None = None) -> bool:
    """True if ``path`` is a temporary checkpoint (positive evidence only)."""
    p, r = _backend_and_strategy(path, atomicity)
    return _sync.run(is_temporary_async(r.backend, p))


def path_state(path: Any, *, atomicity: str | None = None) -> PathState:
    """``finalized``, ``temporary`` or ``unknown``."""
    p, r = _backend_and_strategy(path, atomicity)
    return _sync.run(path_state_async(p, r.strategy, r.backend))


def all_temporary_paths(root: Any, *, atomicity: str | None = None) -> list[TemporaryPath]:
    """Temporary checkpoints directly under ``root``, as TemporaryPath objects."""
    p, r = _backend_and_strategy(root, atomicity)
    return _sync.run(all_temporary_paths_async(p, r.backend))


def cleanup_temporary_paths(root: Any, *, atomicity: str | None = None) -> list[UPath]:
    """Remove every temporary checkpoint under ``root`` (as Orbax does). Finalized and
    unknown directories and symbolic links are never removed. Returns the removed paths."""
    p, r = _backend_and_strategy(root, atomicity)
    return _sync.run(cleanup_temporary_paths_async(p, r.backend))
