"""``commit_file``: each writer writes into its own ``<final>/.ckpt-writer-<id>`` directory;
the commit is a create-if-absent of ``<final>/commit_success.txt`` naming the winner.

With a conditional put, two writers committing one step cannot both win: the loser gets
:class:`ckpt.CommitConflictError` and removes its own files; the winner's checkpoint is
exactly what the winner wrote. Checkpoints committed by Orbax (marker, files directly in the
final directory) are read as they are.

Unlike Orbax, a directory without a marker is only *temporary* when it holds a ckpt writer
directory (positive evidence); otherwise it is *unknown* and never deleted (orbax#394).
"""

from __future__ import annotations

import logging
from typing import Any

from ckpt import hookimpl
from ckpt.backend import Backend, Entry
from ckpt.errors import CommitConflictError, ValidationError
from ckpt.layout import (
    COMMIT_SUCCESS_FILE,
    commit_marker_text,
    is_temporary_name,
    is_writer_dir_name,
    writer_dir_from_marker,
    writer_dir_name,
)
from ckpt.paths import to_path
from ckpt.temporary_path import FileOptions, TemporaryPath
from upath import UPath

from ckpt_strategies._common import backend_for as _backend
from ckpt_strategies._common import reject_symlink, require_dir

logger = logging.getLogger(__name__)


class CommitFileTemporaryPath(TemporaryPath):
    """Writer-unique directory inside the final path, committed by a marker file."""

    name = "commit_file"
    requires = ("conditional_put",)

    @classmethod
    def from_final(
        cls,
        final_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> CommitFileTemporaryPath:
        final = to_path(final_path)
        if is_temporary_name(final.name):
            raise ValueError(f"A final checkpoint name must not contain the temp suffix: {final}")
        return cls(final / writer_dir_name(), final, backend=backend, file_options=file_options)

    @classmethod
    def from_temporary(
        cls,
        temporary_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> CommitFileTemporaryPath:
        tmp = to_path(temporary_path)
        final = tmp.parent if is_writer_dir_name(tmp.name) else tmp
        return cls(tmp, final, backend=backend, file_options=file_options)

    async def create(self) -> UPath:
        tmp, final = self.get(), self.get_final()
        if await self.backend.exists(final / COMMIT_SUCCESS_FILE):
            raise CommitConflictError(f"Cannot save to {final}: it is already committed.")
        mode = self.file_options.path_permission_mode
        await self.backend.mkdir(final, parents=True, exist_ok=True, mode=mode)
        await self.backend.mkdir(tmp, parents=False, exist_ok=False, mode=mode)
        self._created = True
        await self._write_initial_metadata()
        return tmp

    async def finalize(self) -> None:
        tmp, final = self.get(), self.get_final()
        await self._write_commit_metadata()
        await self.backend.sync_tree(tmp)
        await self.backend.sync_dir(final)
        marker = commit_marker_text(str(final), writer_dir=tmp.name).encode()
        logger.info("Committing %s (writer %s)", final, tmp.name)
        try:
            await self.backend.create_exclusive(final / COMMIT_SUCCESS_FILE, marker)
        except FileExistsError as exc:
            await self.discard()
            raise CommitConflictError(
                f"Cannot commit {final}: another writer committed it first. The committed "
                f"checkpoint was left untouched and this writer's {tmp.name} was removed."
            ) from exc
        await self.backend.sync_dir(final)

    @classmethod
    async def validate(cls, temporary_path: Any, *, backend: Backend | None = None) -> None:
        tmp = to_path(temporary_path)
        backend = _backend(tmp, backend)
        await reject_symlink(backend, tmp)
        final = tmp.parent if is_writer_dir_name(tmp.name) else tmp
        try:
            marker = (await backend.read_bytes(final / COMMIT_SUCCESS_FILE)).decode()
        except FileNotFoundError:
            marker = None
        if marker is not None and (final == tmp or writer_dir_from_marker(marker) == tmp.name):
            raise ValidationError(
                f"Expected {cls.__name__} ({tmp}) not to be committed, but {final} holds "
                f"{COMMIT_SUCCESS_FILE} naming it."
            )
        await require_dir(backend, tmp, cls.__name__)

    @classmethod
    async def validate_final(cls, final_path: Any, *, backend: Backend | None = None) -> None:
        final = to_path(final_path)
        backend = _backend(final, backend)
        await reject_symlink(backend, final)
        if not await backend.exists(final / COMMIT_SUCCESS_FILE):
            raise ValidationError(
                f"Expected {cls.__name__} ({final}) to contain {COMMIT_SUCCESS_FILE}."
            )
        await require_dir(backend, final, f"final {cls.__name__}")

    @classmethod
    async def finalized_names(
        cls, backend: Backend, base: UPath, entries: list[Entry]
    ) -> list[str]:
        candidates = [
            e.name for e in entries if e.is_dir and not e.is_link and not is_temporary_name(e.name)
        ]
        found = await backend.exists_many([base / n / COMMIT_SUCCESS_FILE for n in candidates])
        return [n for n, ok in zip(candidates, found, strict=True) if ok]

    @classmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        if is_temporary_name(path.name) or await backend.is_link(path):
            return False
        return await backend.exists(path / COMMIT_SUCCESS_FILE)


@hookimpl
def register_strategies(register: Any) -> None:
    register("commit_file", CommitFileTemporaryPath)
