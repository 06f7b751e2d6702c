"""Finding, classifying and cleaning up temporary checkpoints.

"Temporary" needs positive evidence: the temporary suffix in the name (``rename`` and every
Orbax form), or a ckpt writer directory (``commit_file``) that no commit marker names.
A directory with neither commit nor temporary evidence is *unknown*: never reported
finalized and never deleted. Symbolic links are never temporary checkpoints.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from typing import Any

from upath import UPath

from ckpt import _sync
from ckpt.backend import Backend
from ckpt.layout import WRITERS_DIR, final_name_of_writer, is_temporary_name, is_writer_dir_name
from ckpt.paths import to_path
from ckpt.registry import get_strategy, resolve
from ckpt.temporary_path import TemporaryPath, committed_writer

logger = logging.getLogger(__name__)

__all__ = [
    "PathState",
    "all_temporary_paths",
    "cleanup_temporary_paths",
    "is_path_finalized",
    "is_path_temporary",
    "path_state",
]

_TOKEN_TIME = re.compile(r"(?:\.orbax-checkpoint-tmp-|\.ckpt-writer-)(\d{16,20})-\d+-[0-9a-f]+$")


class PathState(enum.StrEnum):
    """What a directory under a checkpoint root is."""

    FINALIZED = "finalized"
    TEMPORARY = "temporary"
    UNKNOWN = "unknown"


def created_ns(name: str) -> int | None:
    """Creation time (ns) recorded in a ckpt temporary name, or None (e.g. Orbax's names)."""
    match = _TOKEN_TIME.search(name)
    return int(match.group(1)) if match else None


async def is_temporary_async(backend: Backend, path: UPath) -> bool:
    if await backend.is_link(path) or not await backend.is_dir(path):
        return False
    if is_temporary_name(path.name):
        return True
    if is_writer_dir_name(path.name) and path.parent.name == WRITERS_DIR:
        final = path.parent.parent / final_name_of_writer(path.name)
        return await committed_writer(backend, final) != path.name
    return False


async def path_state_async(
    path: UPath, strategy: type[TemporaryPath], backend: Backend
) -> PathState:
    if await strategy.is_finalized(backend, path):
        return PathState.FINALIZED
    if await is_temporary_async(backend, path):
        return PathState.TEMPORARY
    return PathState.UNKNOWN


async def all_temporary_paths_async(
    root: UPath, backend: Backend, *, created_before_ns: int | None = None
) -> list[TemporaryPath]:
    """Every temporary checkpoint under ``root``: one listing of ``root`` and one of its
    writers directory, plus one marker read per final name that has writer directories
    (concurrently).

    With ``created_before_ns``, temporaries whose ckpt name records a later creation time
    (writers that started after that moment, possibly still live) are left out."""
    entries = await backend.list_dir(root)
    rename_cls = get_strategy("rename")
    commit_cls = get_strategy("commit_file")
    found: list[TemporaryPath] = []
    writers: dict[str, list[str]] = {}

    def too_new(name: str) -> bool:
        if created_before_ns is None:
            return False
        created = created_ns(name)
        return created is not None and created >= created_before_ns

    has_writers_dir = False
    for entry in entries:
        if entry.is_link or not entry.is_dir:
            continue
        if entry.name == WRITERS_DIR:
            has_writers_dir = True
        elif is_temporary_name(entry.name) and not too_new(entry.name):
            found.append(rename_cls.from_temporary(root / entry.name, backend=backend))
    if has_writers_dir:
        for entry in await backend.list_dir(root / WRITERS_DIR):
            if (
                entry.is_dir
                and not entry.is_link
                and is_writer_dir_name(entry.name)
                and not too_new(entry.name)
            ):
                writers.setdefault(final_name_of_writer(entry.name), []).append(entry.name)
    if writers:
        present = {e.name for e in entries if e.is_dir}
        finals = sorted(writers)

        async def winner(final: str) -> str | None:
            if final not in present:
                return None
            if backend.names_decide_commit and len(writers[final]) == 1:
                # A final name is listed only once its marker exists, and a delete removes
                # the marker before the writer directory: a sole writer is the winner.
                return writers[final][0]
            try:
                return await committed_writer(backend, root / final)
            except ValueError:  # malformed marker: keep everything, it is not ours to judge
                return "<malformed>"

        winners = await asyncio.gather(*(winner(f) for f in finals))
        for final, won in zip(finals, winners, strict=True):
            if won == "<malformed>":
                logger.warning("Malformed commit marker in %s; leaving its writers alone.", final)
                continue
            for name in writers[final]:
                if name != won:
                    found.append(
                        commit_cls.from_temporary(root / WRITERS_DIR / name, backend=backend)
                    )
    return found


async def cleanup_temporary_paths_async(
    root: UPath, backend: Backend, *, created_before_ns: int | None = None
) -> list[UPath]:
    """Remove every temporary checkpoint under ``root``; return what was removed."""
    temps = await all_temporary_paths_async(root, backend, created_before_ns=created_before_ns)
    for tmp in temps:
        logger.info("Removing temporary checkpoint %s", tmp.get())
    await asyncio.gather(*(backend.remove_tree(t.get()) for t in temps))
    return [t.get() for t in temps]


def _resolved(location: Any, atomicity: str | None) -> tuple[UPath, Any]:
    path = to_path(location)
    return path, resolve(path, atomicity)


def is_path_finalized(path: Any, *, atomicity: str | None = None) -> bool:
    """True if ``path`` is a committed checkpoint under the configured strategy."""
    p, r = _resolved(path, atomicity)
    return _sync.run(r.strategy.is_finalized(r.backend, p))


def is_path_temporary(path: Any, *, atomicity: str | None = None) -> bool:
    """True if ``path`` is a temporary checkpoint (positive evidence only)."""
    p, r = _resolved(path, atomicity)
    return _sync.run(is_temporary_async(r.backend, p))


def path_state(path: Any, *, atomicity: str | None = None) -> PathState:
    """``finalized``, ``temporary`` or ``unknown``."""
    p, r = _resolved(path, atomicity)
    return _sync.run(path_state_async(p, r.strategy, r.backend))


def all_temporary_paths(root: Any, *, atomicity: str | None = None) -> list[TemporaryPath]:
    """Temporary checkpoints directly under ``root``, as TemporaryPath objects."""
    p, r = _resolved(root, atomicity)
    return _sync.run(all_temporary_paths_async(p, r.backend))


def cleanup_temporary_paths(
    root: Any, *, atomicity: str | None = None, created_before_ns: int | None = None
) -> list[UPath]:
    """Remove every temporary checkpoint under ``root`` (as Orbax does). Finalized and
    unknown directories and symbolic links are never removed. ``created_before_ns`` spares
    writers that started at or after that time. Returns the removed paths."""
    p, r = _resolved(root, atomicity)
    return _sync.run(
        cleanup_temporary_paths_async(p, r.backend, created_before_ns=created_before_ns)
    )
