"""``rename``: write into ``<final>.orbax-checkpoint-tmp-<writer>``, then rename it to the
final name atomically (Orbax's AtomicRenameTemporaryPath, with writer-unique temp names and
a rename that never replaces an existing checkpoint).

Commit evidence is the name itself: a directory without the temporary suffix is committed,
so discovery needs one listing and no per-step I/O.

A forced save replaces a committed checkpoint in one step where the store can swap two
directories (``exchange_dirs``): the old checkpoint then sits under the writer's temporary
name and is removed. Elsewhere it takes two renames: the old checkpoint is first renamed
aside to ``<final>.ckpt-replaced-<token>`` (kept, not temporary), then the new one into
place; a failure in between renames the old one back, and a crash in between is repaired
by :meth:`AtomicRenameTemporaryPath.repair` (manager start, cleanup, ``ckpt gc``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from upath import UPath

from ckpt import hookimpl
from ckpt.backend import Backend, Entry
from ckpt.errors import CommitConflictError, CommitNotDurableError, ValidationError
from ckpt.layout import (
    COMMIT_SUCCESS_FILE,
    commit_marker_text,
    final_name_of,
    is_temporary_name,
    temporary_name,
    unique_token,
)
from ckpt.paths import to_path
from ckpt.strategy import FileOptions, Scan, TemporaryPath
from ckpt_strategies._common import backend_for as _backend
from ckpt_strategies._common import reject_symlink, require_dir

logger = logging.getLogger(__name__)

#: Infix of a replaced checkpoint moved aside during a two-rename replace.
REPLACED_INFIX = ".ckpt-replaced-"


def _is_ours_uncommitted(name: str) -> bool:
    return is_temporary_name(name) or REPLACED_INFIX in name


class AtomicRenameTemporaryPath(TemporaryPath):
    """Temporary directory renamed to the final name on commit."""

    name = "rename"
    requires: ClassVar[tuple[str, ...]] = ("atomic_dir_rename",)
    names_are_commit_evidence = True

    @classmethod
    def from_final(
        cls,
        final_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> AtomicRenameTemporaryPath:
        final = to_path(final_path)
        if _is_ours_uncommitted(final.name):
            raise ValueError(f"A final checkpoint name must not contain the temp suffix: {final}")
        tmp = final.parent / temporary_name(final.name)
        return cls(tmp, final, backend=backend, file_options=file_options)

    @classmethod
    def from_temporary(
        cls,
        temporary_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> AtomicRenameTemporaryPath:
        tmp = to_path(temporary_path)
        if REPLACED_INFIX in tmp.name:
            final = tmp.parent / tmp.name[: tmp.name.index(REPLACED_INFIX)]
        else:
            final = tmp.parent / final_name_of(tmp.name)
        return cls(tmp, final, backend=backend, file_options=file_options)

    @classmethod
    def adopt(
        cls, directory: UPath, final: UPath, *, backend: Backend
    ) -> AtomicRenameTemporaryPath | None:
        if directory.parent != final.parent:
            return None
        return cls(directory, final, backend=backend)

    async def create(self) -> UPath:
        tmp = self.get()
        await self.backend.mkdir(tmp.parent, parents=True, exist_ok=True)
        # exist_ok=False: a writer never reuses a directory it did not create.
        await self.backend.mkdir(
            tmp, parents=False, exist_ok=False, mode=self.file_options.path_permission_mode
        )
        self._created = True
        await self._write_initial_metadata()
        return tmp

    async def finalize(self) -> None:
        tmp, final = self.get(), self.get_final()
        await self._write_commit_metadata()
        await self.backend.write_bytes(
            tmp / COMMIT_SUCCESS_FILE, commit_marker_text(str(final)).encode()
        )
        await self.backend.sync_tree(tmp)
        logger.info("Renaming %s to %s", tmp, final)
        try:
            await self.backend.rename_dir(tmp, final)
        except FileExistsError as exc:
            if not self.replace_existing:
                await self.discard()
                raise CommitConflictError(
                    f"Cannot commit {final}: it already exists (another writer committed it "
                    f"first, or it was there before). Its contents were left untouched and "
                    f"this writer's temporary {tmp.name} was removed."
                ) from exc
            await self._replace()
            return
        await _sync_parent(self.backend, final)

    async def _replace(self) -> None:
        """Replace the committed checkpoint at the final path with this writer's data."""
        tmp, final, backend = self.get(), self.get_final(), self.backend
        logger.info("force=True: replacing %s", final)
        if backend.capabilities.atomic_dir_exchange:
            try:
                await backend.exchange_dirs(tmp, final)
            except NotImplementedError:
                pass  # this filesystem cannot: two renames
            else:
                # The old checkpoint now has this writer's temporary name.
                await _sync_parent(backend, final)
                await _remove_quietly(backend, tmp)
                return
        aside = final.parent / f"{final.name}{REPLACED_INFIX}{unique_token()}"
        await backend.rename_dir(final, aside)  # fails: nothing changed
        try:
            await backend.rename_dir(tmp, final)
        except BaseException:
            await backend.rename_dir(aside, final)  # put the old checkpoint back
            raise
        await _sync_parent(backend, final)
        await _remove_quietly(backend, aside)

    @classmethod
    async def validate(cls, temporary_path: Any, *, backend: Backend | None = None) -> None:
        tmp = to_path(temporary_path)
        backend = _backend(tmp, backend)
        await reject_symlink(backend, tmp)
        if not is_temporary_name(tmp.name):
            raise ValidationError(
                f"Expected {cls.__name__} ({tmp}) to contain the temporary suffix."
            )
        if await backend.exists(tmp / COMMIT_SUCCESS_FILE):
            raise ValidationError(
                f"Expected {cls.__name__} ({tmp}) not to contain {COMMIT_SUCCESS_FILE}."
            )
        await require_dir(backend, tmp, cls.__name__)

    @classmethod
    async def validate_final(cls, final_path: Any, *, backend: Backend | None = None) -> None:
        final = to_path(final_path)
        backend = _backend(final, backend)
        if is_temporary_name(final.name):
            raise ValidationError(
                f"Expected final {cls.__name__} ({final}) not to contain the temporary suffix."
            )
        await reject_symlink(backend, final)
        await require_dir(backend, final, f"final {cls.__name__}")

    @classmethod
    async def finalized_names(
        cls, backend: Backend, base: UPath, entries: list[Entry]
    ) -> list[str]:
        return [
            e.name
            for e in entries
            if e.is_dir and not e.is_link and not _is_ours_uncommitted(e.name)
        ]

    @classmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        if _is_ours_uncommitted(path.name):
            return False
        return not await backend.is_link(path) and await backend.is_dir(path)

    @classmethod
    async def is_temporary(cls, backend: Backend, path: UPath) -> bool:
        if not _is_ours_uncommitted(path.name):
            return False
        if await backend.is_link(path) or not await backend.is_dir(path):
            return False
        if REPLACED_INFIX in path.name:  # only once the checkpoint it replaced is back
            return await backend.exists(cls.from_temporary(path, backend=backend).get_final())
        return True

    @classmethod
    async def scan(cls, backend: Backend, root: UPath, entries: list[Entry]) -> Scan:
        dirs = [e for e in entries if e.is_dir and not e.is_link]
        names = {e.name for e in dirs}
        scan = Scan(finalized=await cls.finalized_names(backend, root, entries))
        for entry in dirs:
            if is_temporary_name(entry.name):
                scan.temporary.append(cls.from_temporary(root / entry.name, backend=backend))
            elif REPLACED_INFIX in entry.name:
                tmp = cls.from_temporary(root / entry.name, backend=backend)
                if tmp.get_final().name in names:  # the new checkpoint is committed
                    scan.temporary.append(tmp)
        return scan

    @classmethod
    async def delete(cls, backend: Backend, final: UPath) -> None:
        if await backend.is_link(final):
            await backend.remove_tree(final)  # the link only, never what it points to
            return
        if not await backend.is_dir(final):
            await backend.remove_file(final / COMMIT_SUCCESS_FILE)
            await backend.remove_tree(final)
            return
        # The name is the commit evidence: rename it to a temporary name first.
        doomed = final.parent / temporary_name(final.name)
        await backend.rename_dir(final, doomed)
        await backend.sync_dir(final.parent)
        await backend.remove_tree(doomed)

    @classmethod
    async def repair(cls, backend: Backend, root: UPath, entries: list[Entry]) -> list[UPath]:
        names = {e.name for e in entries if not e.is_link}
        repaired = []
        for entry in entries:
            if entry.is_link or not entry.is_dir or REPLACED_INFIX not in entry.name:
                continue
            final = cls.from_temporary(root / entry.name, backend=backend).get_final()
            if final.name in names:
                continue  # the replacement is committed: the old one is a temporary
            try:
                await backend.rename_dir(root / entry.name, final)
            except FileExistsError:
                continue  # a writer committed it meanwhile
            except FileNotFoundError:
                continue  # another repairer (a strategy sharing this layout, gc) was first
            names.add(final.name)
            await backend.sync_dir(root)
            repaired.append(final)
        return repaired


async def _sync_parent(backend: Backend, final: UPath) -> None:
    try:
        await backend.sync_dir(final.parent)
    except Exception as exc:
        raise CommitNotDurableError(
            f"{final} is committed, but making the commit durable failed ({exc!r}): after "
            "a power loss it might be missing."
        ) from exc


async def _remove_quietly(backend: Backend, path: UPath) -> None:
    """Remove a replaced checkpoint; a failure leaves a temporary for cleanup."""
    try:
        await backend.remove_tree(path)
    except Exception as exc:
        logger.warning("Could not remove %s (%r); cleanup will remove it.", path, exc)


@hookimpl
def register_strategies(register: Any) -> None:
    register("rename", AtomicRenameTemporaryPath)
