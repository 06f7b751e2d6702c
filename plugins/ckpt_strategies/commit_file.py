"""``commit_file``: each writer writes into its own directory
``<root>/.ckpt-writers/<final>.ckpt-writer-<id>``; the commit is a create-if-absent of
``<final>/commit_success.txt`` whose text names the winning writer directory.

With a conditional put, two writers committing one step cannot both win: the loser gets
:class:`ckpt.CommitConflictError` and removes its own files; the winner's checkpoint is
exactly what the winner wrote, and a zombie writer can never add files to it. Nothing is
written under the final name before the marker, so on stores without folders a final name
in a listing is itself the commit evidence. Checkpoints committed by Orbax (a marker and
the files directly in the final directory) are read as they are.

Unlike Orbax, an unmarked directory is never treated as temporary (orbax#394): only the
writer directories ckpt creates, and names with the temporary suffix, are.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from upath import UPath

from ckpt import hookimpl
from ckpt.backend import Backend, Entry
from ckpt.errors import CommitConflictError, ValidationError
from ckpt.layout import (
    COMMIT_SUCCESS_FILE,
    WRITERS_DIR,
    commit_marker_text,
    final_name_of_writer,
    is_temporary_name,
    is_writer_dir_name,
    writer_dir_name,
)
from ckpt.paths import to_path
from ckpt.temporary_path import FileOptions, TemporaryPath, committed_writer
from ckpt_strategies._common import backend_for as _backend
from ckpt_strategies._common import reject_symlink, require_dir

logger = logging.getLogger(__name__)


class CommitFileTemporaryPath(TemporaryPath):
    """Writer-unique sibling directory, committed by a conditional marker file."""

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
        if (
            is_temporary_name(final.name)
            or is_writer_dir_name(final.name)
            or (final.name == WRITERS_DIR)
        ):
            raise ValueError(f"Not a valid final checkpoint name: {final}")
        tmp = final.parent / WRITERS_DIR / writer_dir_name(final.name)
        return cls(tmp, final, backend=backend, file_options=file_options)

    @classmethod
    def from_temporary(
        cls,
        temporary_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> CommitFileTemporaryPath:
        tmp = to_path(temporary_path)
        # An Orbax-style commit-file temporary is the final directory itself.
        final = _final_of(tmp) if is_writer_dir_name(tmp.name) else tmp
        return cls(tmp, final, backend=backend, file_options=file_options)

    async def create(self) -> UPath:
        tmp, final = self.get(), self.get_final()
        if not self.replace_existing and await self.backend.exists(final / COMMIT_SUCCESS_FILE):
            raise CommitConflictError(f"Cannot save to {final}: it is already committed.")
        mode = self.file_options.path_permission_mode
        await self.backend.mkdir(tmp.parent, parents=True, exist_ok=True)
        await self.backend.mkdir(tmp, parents=False, exist_ok=False, mode=mode)
        self._created = True
        # The writer directory is invisible until the commit, so the step metadata is
        # written once, at finalize (one request fewer per save on object stores).
        self.metadata.init_timestamp_nsecs = time.time_ns()
        return tmp

    async def finalize(self) -> None:
        tmp, final = self.get(), self.get_final()
        await self._write_commit_metadata()
        await self.backend.sync_tree(tmp)
        await self.backend.mkdir(
            final, parents=False, exist_ok=True, mode=self.file_options.path_permission_mode
        )
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
        await self.backend.sync_dir(final.parent)

    @classmethod
    async def validate(cls, temporary_path: Any, *, backend: Backend | None = None) -> None:
        tmp = to_path(temporary_path)
        backend = _backend(tmp, backend)
        await reject_symlink(backend, tmp)
        if is_writer_dir_name(tmp.name):
            final = _final_of(tmp)
            if await committed_writer(backend, final) == tmp.name:
                raise ValidationError(
                    f"Expected {cls.__name__} ({tmp}) not to be committed, but the "
                    f"{COMMIT_SUCCESS_FILE} of {final} names it."
                )
        elif await backend.exists(tmp / COMMIT_SUCCESS_FILE):
            raise ValidationError(
                f"Expected {cls.__name__} ({tmp}) not to contain {COMMIT_SUCCESS_FILE}."
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
            e.name
            for e in entries
            if e.is_dir
            and not e.is_link
            and not is_temporary_name(e.name)
            and not is_writer_dir_name(e.name)
            and e.name != WRITERS_DIR
        ]
        if backend.names_decide_commit:
            return candidates
        found = await backend.exists_in_children(base, candidates, COMMIT_SUCCESS_FILE)
        return [n for n, ok in zip(candidates, found, strict=True) if ok]

    @classmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        if (
            is_temporary_name(path.name)
            or is_writer_dir_name(path.name)
            or path.name == WRITERS_DIR
        ):
            return False
        if await backend.is_link(path):
            return False
        return await backend.exists(path / COMMIT_SUCCESS_FILE)


def _final_of(writer_dir: UPath) -> UPath:
    """``<root>/.ckpt-writers/<name>.ckpt-writer-<id>`` -> ``<root>/<name>``."""
    return writer_dir.parent.parent / final_name_of_writer(writer_dir.name)


@hookimpl
def register_strategies(register: Any) -> None:
    register("commit_file", CommitFileTemporaryPath)
