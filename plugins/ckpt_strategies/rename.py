"""``rename``: write into ``<final>.orbax-checkpoint-tmp-<writer>``, then rename it to the
final name atomically (Orbax's AtomicRenameTemporaryPath, with writer-unique temp names and
a rename that never replaces an existing checkpoint).

Commit evidence is the name itself: a directory without the temporary suffix is committed,
so discovery needs one listing and no per-step I/O.
"""

from __future__ import annotations

import logging
from typing import Any

from upath import UPath

from ckpt import hookimpl
from ckpt.backend import Backend, Entry
from ckpt.errors import CommitConflictError, ValidationError
from ckpt.layout import (
    COMMIT_SUCCESS_FILE,
    WRITERS_DIR,
    commit_marker_text,
    final_name_of,
    is_temporary_name,
    is_writer_dir_name,
    temporary_name,
)
from ckpt.paths import to_path
from ckpt.temporary_path import FileOptions, TemporaryPath
from ckpt_strategies._common import backend_for as _backend
from ckpt_strategies._common import reject_symlink, require_dir

logger = logging.getLogger(__name__)


class AtomicRenameTemporaryPath(TemporaryPath):
    """Temporary directory renamed to the final name on commit."""

    name = "rename"
    requires = ("atomic_dir_rename",)

    @classmethod
    def from_final(
        cls,
        final_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> AtomicRenameTemporaryPath:
        final = to_path(final_path)
        if is_temporary_name(final.name):
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
        final = tmp.parent / final_name_of(tmp.name)
        return cls(tmp, final, backend=backend, file_options=file_options)

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
            await self.discard()
            raise CommitConflictError(
                f"Cannot commit {final}: it already exists (another writer committed it "
                f"first, or it was there before). Its contents were left untouched and this "
                f"writer's temporary {tmp.name} was removed."
            ) from exc
        await self.backend.sync_dir(final.parent)

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
            e.name for e in entries if e.is_dir and not e.is_link and not is_temporary_name(e.name)
        ]

    @classmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        if (
            is_temporary_name(path.name)
            or is_writer_dir_name(path.name)
            or path.name == WRITERS_DIR
        ):
            return False
        return not await backend.is_link(path) and await backend.is_dir(path)


@hookimpl
def register_strategies(register: Any) -> None:
    register("rename", AtomicRenameTemporaryPath)
