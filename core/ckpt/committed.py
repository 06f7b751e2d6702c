"""Committed checkpoints: where their files are, and deleting them crash-safely.

Both go through the strategy whose layout the checkpoint shows evidence of
(:meth:`ckpt.TemporaryPath.content_path`): the configured strategy is asked first, then
every other strategy the backend runs, so that a checkpoint written under one strategy is
read and deleted correctly under another.
"""

from __future__ import annotations

from upath import UPath

from ckpt.backend import Backend
from ckpt.paths import to_path
from ckpt.registry import resolve, strategies_for
from ckpt.strategy import TemporaryPath

__all__ = ["content_path", "delete_checkpoint", "owner"]


async def owner(
    backend: Backend, final: UPath, strategy: type[TemporaryPath] | None = None
) -> tuple[type[TemporaryPath], UPath]:
    """The strategy that owns the committed checkpoint ``final`` and where its files are:
    the first strategy (``strategy`` first) that locates them elsewhere, else ``strategy``
    (or the backend's first) and ``final`` itself."""
    classes = strategies_for(backend, strategy)
    for cls in classes:
        where = await cls.content_path(backend, final)
        if where is not None:
            return cls, where
    return classes[0], final


async def content_path(backend: Backend, final: UPath, *, atomicity: str | None = None) -> UPath:
    """Where the files of the committed checkpoint ``final`` are (the final path itself,
    or wherever its strategy's layout puts them)."""
    final = to_path(final)
    strategy = resolve(final, atomicity, backend=backend).strategy
    return (await owner(backend, final, strategy))[1]


async def delete_checkpoint(
    backend: Backend, final: UPath, *, atomicity: str | None = None
) -> None:
    """Delete a committed checkpoint safely, through its strategy: uncommitted first, then
    its files. A crash half way leaves at most temporary leftovers, which cleanup removes;
    never something that looks committed but is not."""
    final = to_path(final)
    strategy = resolve(final, atomicity, backend=backend).strategy
    await delete_with(backend, final, strategy)


async def delete_with(backend: Backend, final: UPath, strategy: type[TemporaryPath]) -> None:
    """:func:`delete_checkpoint` with a resolved strategy."""
    if await backend.is_link(final):
        # A symlink is never a checkpoint: remove the link, never what it points to.
        await backend.remove_file(final)
        return
    cls, _ = await owner(backend, final, strategy)
    await cls.delete(backend, final)
