"""Cleanup: finding and removing the temporary checkpoints under a root.

What is temporary is decided by the strategies (:func:`ckpt.discovery.scan_root`); before
that, each strategy repairs what an interrupted commit or replace of its layout left
(:meth:`ckpt.TemporaryPath.repair`), so that cleanup never removes the only copy of a
committed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from upath import UPath

from ckpt import _sync
from ckpt.backend import Backend, Entry
from ckpt.discovery import scan_root
from ckpt.layout import PARTIAL_SAVE_SUFFIX
from ckpt.paths import to_path
from ckpt.registry import resolve, strategies_for
from ckpt.strategy import TemporaryPath

logger = logging.getLogger(__name__)

__all__ = [
    "all_temporary_paths",
    "all_temporary_paths_async",
    "cleanup_temporary_paths",
    "cleanup_temporary_paths_async",
    "repair_async",
]


async def repair_async(
    root: UPath, backend: Backend, strategy: type[TemporaryPath] | None = None
) -> tuple[list[Entry], list[UPath]]:
    """Let every strategy the backend runs repair interrupted commits under ``root``;
    return a listing of ``root`` that reflects the repairs, and the repaired paths."""
    entries = await backend.list_dir(root)
    repaired: list[UPath] = []
    for cls in strategies_for(backend, strategy):
        repaired += await cls.repair(backend, root, entries)
    if repaired:
        for final in repaired:
            logger.warning("Repaired %s, left by an interrupted commit or replace.", final)
        entries = await backend.list_dir(root)
    return entries, repaired


async def all_temporary_paths_async(
    root: UPath,
    backend: Backend,
    *,
    strategy: type[TemporaryPath] | None = None,
    created_before_ns: int | None = None,
    entries: list[Entry] | None = None,
) -> list[TemporaryPath]:
    """Every temporary checkpoint under ``root`` (see :func:`ckpt.discovery.scan_root`).

    With ``created_before_ns``, temporaries whose name records a later creation time
    (writers that started after that moment, possibly still live) are left out."""
    classes = strategies_for(backend, strategy)
    scan = await scan_root(root, backend, classes[0], entries)
    found = []
    for tmp in scan.temporary:
        created = tmp.created_ns()
        if created_before_ns is not None and created is not None and created >= created_before_ns:
            continue
        found.append(tmp)
    return found


async def remove_temporaries(backend: Backend, temps: list[TemporaryPath]) -> list[UPath]:
    """Delete the directory of each of ``temps`` (concurrently, logging each); returns the
    paths removed. The caller has decided they are temporaries (see :func:`scan_root`)."""
    for tmp in temps:
        logger.info("Removing temporary checkpoint %s", tmp.get())
    await asyncio.gather(*(backend.remove_tree(t.get()) for t in temps))
    return [t.get() for t in temps]


async def cleanup_temporary_paths_async(
    root: UPath,
    backend: Backend,
    *,
    strategy: type[TemporaryPath] | None = None,
    created_before_ns: int | None = None,
) -> list[UPath]:
    """Repair interrupted commits, then remove every temporary checkpoint under ``root``;
    return what was removed."""
    entries, _ = await repair_async(root, backend, strategy)
    temps = await all_temporary_paths_async(
        root, backend, strategy=strategy, created_before_ns=created_before_ns, entries=entries
    )
    removed = await remove_temporaries(backend, temps)
    return removed + await _remove_spent_partial_sessions(root, backend, strategy, entries)


async def _remove_spent_partial_sessions(
    root: UPath, backend: Backend, strategy: type[TemporaryPath] | None, entries: list[Entry]
) -> list[UPath]:
    """``<name>.partial_save`` session directories whose checkpoint ``<name>`` is committed
    (a finalize that committed, then failed or was killed before removing its session)."""
    sessions = {
        e.name[: -len(PARTIAL_SAVE_SUFFIX)]: root / e.name
        for e in entries
        if e.is_dir and e.name.endswith(PARTIAL_SAVE_SUFFIX) and e.name != PARTIAL_SAVE_SUFFIX
    }
    if not sessions:
        return []
    scan = await scan_root(root, backend, strategies_for(backend, strategy)[0], entries)
    spent = [path for name, path in sessions.items() if name in scan.finalized]
    for path in spent:
        logger.info("Removing the partial save session %s of a committed checkpoint", path)
    await asyncio.gather(*(backend.remove_tree(p) for p in spent))
    return spent


def all_temporary_paths(root: Any, *, atomicity: str | None = None) -> list[TemporaryPath]:
    """Temporary checkpoints under ``root``, as TemporaryPath objects."""
    path = to_path(root)
    r = resolve(path, atomicity)
    return _sync.run(all_temporary_paths_async(path, r.backend, strategy=r.strategy))


def cleanup_temporary_paths(
    root: Any, *, atomicity: str | None = None, created_before_ns: int | None = None
) -> list[UPath]:
    """Remove every temporary checkpoint under ``root`` (as Orbax does). Finalized and
    unknown directories and symbolic links are never removed. ``created_before_ns`` spares
    writers that started at or after that time. Returns the removed paths."""
    path = to_path(root)
    r = resolve(path, atomicity)
    return _sync.run(
        cleanup_temporary_paths_async(
            path, r.backend, strategy=r.strategy, created_before_ns=created_before_ns
        )
    )
