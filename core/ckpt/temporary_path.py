"""The ``TemporaryPath`` protocol: how a checkpoint is written somewhere invisible and then
committed so that it appears complete all at once.

A strategy (a ``TemporaryPath`` subclass registered through ``register_strategies``)
declares the backend capabilities it ``requires`` and does all its I/O through the
backend's primitives, so one strategy runs on every backend that can support it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import time
from typing import Any, ClassVar, Self

from upath import UPath

from ckpt.backend import Backend, Entry
from ckpt.layout import (
    COMMIT_SUCCESS_FILE,
    METADATA_FILE,
    WRITERS_DIR,
    temporary_name,
    writer_dir_from_marker,
)
from ckpt.manifest import MANIFEST_FILE, Manifest
from ckpt.paths import to_path
from ckpt.step_metadata import StepMetadata, write_step_metadata

__all__ = [
    "FileOptions",
    "ReadOnlyTemporaryPath",
    "TemporaryPath",
    "committed_writer",
    "content_path",
    "delete_checkpoint",
]


@dataclasses.dataclass(frozen=True)
class FileOptions:
    """Options for files and directories a save creates.

    Attributes:
        path_permission_mode: mode of every directory a save creates (e.g. ``0o750``): the
            step directory, its subdirectories (those tensorstore makes for arrays too) and
            missing parents, exactly, whatever the umask; on backends with the
            ``permissions`` capability. Other backends ignore it (and say so in their
            documentation and ``ckpt backends``).
    """

    path_permission_mode: int | None = None


class TemporaryPath(abc.ABC):
    """A checkpoint being written: its temporary path, its final path, and the commit.

    Class attributes:
        name: the registered strategy name.
        requires: backend capabilities the strategy needs.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        temporary_path: UPath,
        final_path: UPath,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> None:
        from ckpt.registry import get_backend

        self._tmp_path = temporary_path
        self._final_path = final_path
        self.backend: Backend = backend or get_backend(final_path)
        self.file_options = file_options or FileOptions()
        #: Step metadata kept in memory; written at create and updated at finalize.
        self.metadata = StepMetadata()
        #: Set by a forced save: a committed checkpoint at the final path is deleted just
        #: before the commit, so ``create`` must not refuse it.
        self.replace_existing = False
        #: The integrity manifest of what the save wrote under :meth:`get` (set by the
        #: checkpointer before :meth:`finalize`); :meth:`_write_commit_metadata` adds the
        #: step metadata to it and stores it, before the commit.
        self.manifest: Manifest | None = None
        self._created = False

    # -- construction (no I/O) ----------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_final(
        cls,
        final_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> Self:
        """A new writer's temporary path for ``final_path`` (unique per writer)."""

    @classmethod
    @abc.abstractmethod
    def from_temporary(
        cls,
        temporary_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> Self:
        """The object for an existing temporary path (e.g. found by discovery)."""

    def get(self) -> UPath:
        """The path data is written to."""
        return self._tmp_path

    def get_final(self) -> UPath:
        """The path the checkpoint has once committed."""
        return self._final_path

    # -- writing --------------------------------------------------------------------------
    @abc.abstractmethod
    async def create(self) -> UPath:
        """Create the temporary path and write the initial step metadata; return it."""

    @abc.abstractmethod
    async def finalize(self) -> None:
        """Commit: the checkpoint becomes visible at :meth:`get_final`, complete.

        Raises:
            ckpt.CommitConflictError: another writer committed this checkpoint first.
        """

    async def discard(self) -> None:
        """Remove this writer's own temporary data (after a failure or a conflict)."""
        await self.backend.remove_tree(self.get())

    async def _write_initial_metadata(self) -> None:
        self.metadata.init_timestamp_nsecs = time.time_ns()
        await write_step_metadata(self.backend, self.get(), self.metadata)

    async def _write_commit_metadata(self) -> None:
        """Write the final step metadata and then the integrity manifest (if the save
        recorded one). Strategies call this in :meth:`finalize`, before the commit."""
        self.metadata.commit_timestamp_nsecs = time.time_ns()
        data = self.metadata.to_json()
        await self.backend.write_bytes(self.get() / METADATA_FILE, data)
        if self.manifest is not None:
            self.manifest.add(METADATA_FILE, data)
            await self.backend.write_bytes(self.get() / MANIFEST_FILE, self.manifest.to_bytes())

    # -- validation -----------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    async def validate(cls, temporary_path: Any, *, backend: Backend | None = None) -> None:
        """Raise :class:`ckpt.ValidationError` unless ``temporary_path`` is a valid temp."""

    @classmethod
    @abc.abstractmethod
    async def validate_final(cls, final_path: Any, *, backend: Backend | None = None) -> None:
        """Raise :class:`ckpt.ValidationError` unless ``final_path`` is a committed checkpoint."""

    # -- discovery --------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    async def finalized_names(
        cls, backend: Backend, base: UPath, entries: list[Entry]
    ) -> list[str]:
        """Names among ``entries`` (one listing of ``base``) that are committed checkpoints.

        Strategies whose commit evidence is in the name do no I/O here; others do at most
        one batched check."""

    @classmethod
    @abc.abstractmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        """True if ``path`` is a committed checkpoint under this strategy."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tmp={str(self.get())!r}, final={str(self.get_final())!r})"


async def committed_writer(backend: Backend, final: UPath) -> str | None:
    """The writer directory the commit marker of ``final`` names, or None."""
    try:
        text = (await backend.read_bytes(final / COMMIT_SUCCESS_FILE)).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    return writer_dir_from_marker(text, final.name)


async def content_path(backend: Backend, final: UPath) -> UPath:
    """Where a committed checkpoint's files are: the final path itself, or the writer
    directory (under ``<root>/.ckpt-writers``, with ``commit_file``) its marker names."""
    writer = await committed_writer(backend, final)
    return final.parent / WRITERS_DIR / writer if writer else final


async def delete_checkpoint(backend: Backend, final: UPath) -> None:
    """Delete a checkpoint safely: uncommit it first, then remove its files.

    A crash half way leaves at most a temporary (uncommitted) directory, which cleanup
    removes; never something that looks committed but is not."""
    if await backend.is_link(final):
        # A symlink is never a checkpoint: remove the link, never what it points to.
        await backend.remove_file(final)
        return
    writer = await committed_writer(backend, final)
    if writer:
        await backend.remove_file(final / COMMIT_SUCCESS_FILE)
        await backend.remove_tree(final.parent / WRITERS_DIR / writer)
        await backend.remove_tree(final)
        return
    if (
        backend.capabilities.atomic_dir_rename
        and not await backend.is_link(final)
        and await backend.is_dir(final)
    ):
        # Under rename the name is the commit evidence: rename it to a temporary name first.
        doomed = final.parent / temporary_name(final.name)
        await backend.rename_dir(final, doomed)
        await backend.sync_dir(final.parent)
        await backend.remove_tree(doomed)
        return
    await backend.remove_file(final / COMMIT_SUCCESS_FILE)  # Orbax commit-file layout
    await backend.remove_tree(final)


class ReadOnlyTemporaryPath(TemporaryPath):
    """Temporary and final paths only, to hand to another process (JSON, never pickle).

    ``create``, ``finalize`` and the validations raise ``NotImplementedError``.
    """

    def __init__(self, *, temporary_path: Any, final_path: Any) -> None:
        self._tmp_path = to_path(temporary_path)
        self._final_path = to_path(final_path)
        self.metadata = StepMetadata()
        self.file_options = FileOptions()

    @classmethod
    def from_paths(cls, *, temporary_path: Any, final_path: Any) -> ReadOnlyTemporaryPath:
        return cls(temporary_path=temporary_path, final_path=final_path)

    def to_bytes(self) -> bytes:
        """JSON bytes holding both paths (as strings/URLs)."""
        return json.dumps(
            {"temporary_path": str(self._tmp_path), "final_path": str(self._final_path)}
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadOnlyTemporaryPath:
        try:
            raw = json.loads(data)
            tmp, final = raw["temporary_path"], raw["final_path"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"Malformed ReadOnlyTemporaryPath bytes: {exc!r}") from exc
        if not isinstance(tmp, str) or not isinstance(final, str):
            raise ValueError("Malformed ReadOnlyTemporaryPath bytes: paths must be strings.")
        return cls(temporary_path=tmp, final_path=final)

    @classmethod
    def from_final(cls, final_path: Any, **kwargs: Any) -> ReadOnlyTemporaryPath:
        raise NotImplementedError("ReadOnlyTemporaryPath is not constructible from a final path.")

    @classmethod
    def from_temporary(cls, temporary_path: Any, **kwargs: Any) -> ReadOnlyTemporaryPath:
        raise NotImplementedError(
            "ReadOnlyTemporaryPath is not constructible from a temporary path."
        )

    async def create(self) -> UPath:
        raise NotImplementedError("`create` is not supported by ReadOnlyTemporaryPath.")

    async def finalize(self) -> None:
        raise NotImplementedError("`finalize` is not supported by ReadOnlyTemporaryPath.")

    @classmethod
    async def validate(cls, temporary_path: Any, *, backend: Backend | None = None) -> None:
        raise NotImplementedError("`validate` is not supported by ReadOnlyTemporaryPath.")

    @classmethod
    async def validate_final(cls, final_path: Any, *, backend: Backend | None = None) -> None:
        raise NotImplementedError("`validate_final` is not supported by ReadOnlyTemporaryPath.")

    @classmethod
    async def finalized_names(
        cls, backend: Backend, base: UPath, entries: list[Entry]
    ) -> list[str]:
        raise NotImplementedError

    @classmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        raise NotImplementedError

