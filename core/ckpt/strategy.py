"""The strategy protocol: how a checkpoint is written somewhere invisible, committed so that
it appears complete all at once, found, read, deleted and cleaned up.

A strategy is a :class:`TemporaryPath` subclass registered through the
``register_strategies`` hook. It owns its on-storage layout end to end: the core never
names a strategy and never interprets a layout; it calls the methods below. A strategy
declares the backend capabilities it ``requires`` and does all its I/O through the
backend's primitives, so one strategy runs on every backend that can support it. See
``docs/writing-a-strategy.md`` for the invariants each method must keep.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
import time
from typing import Any, ClassVar, Self

from upath import UPath

from ckpt.backend import Backend, Entry
from ckpt.backend_registry import get_backend
from ckpt.layout import METADATA_FILE
from ckpt.manifest import MANIFEST_FILE, Manifest
from ckpt.paths import to_path
from ckpt.step_metadata import StepMetadata, write_step_metadata

__all__ = [
    "FileOptions",
    "ReadOnlyTemporaryPath",
    "Scan",
    "TemporaryPath",
    "token_created_ns",
]

#: A writer token (:func:`ckpt.layout.unique_token`) at the end of a name.
_TOKEN_TIME = re.compile(r"(\d{16,20})-\d+-[0-9a-f]{12}$")


def token_created_ns(name: str) -> int | None:
    """Creation time (ns) of a name that ends with a writer token, or None."""
    match = _TOKEN_TIME.search(name)
    return int(match.group(1)) if match else None


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


@dataclasses.dataclass
class Scan:
    """One strategy's reading of the children of a root (from one listing of it).

    Attributes:
        finalized: names of children that are committed checkpoints under this layout.
        temporary: leftovers this layout made and that cleanup may remove: saves in
            progress or interrupted, uncommitted data, remains of an interrupted delete or
            commit. Only positive evidence of *this* layout; never something another
            layout may have committed.
        internal: names of children that belong to the layout but are not checkpoints
            (e.g. a directory holding writer directories); hidden from listings.
    """

    finalized: list[str] = dataclasses.field(default_factory=list)
    temporary: list[TemporaryPath] = dataclasses.field(default_factory=list)
    internal: list[str] = dataclasses.field(default_factory=list)


class TemporaryPath(abc.ABC):
    """An atomicity strategy, and one checkpoint being written under it.

    Class attributes:
        name: the registered strategy name.
        requires: backend capabilities the strategy needs.
        names_are_commit_evidence: True if a child of a root without temporary evidence is
            committed by its name alone (no per-checkpoint I/O in discovery); then a
            directory copied in without a commit marker counts as committed.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    names_are_commit_evidence: ClassVar[bool] = False

    def __init__(
        self,
        temporary_path: UPath,
        final_path: UPath,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
    ) -> None:
        self._tmp_path = temporary_path
        self._final_path = final_path
        self.backend: Backend = backend or get_backend(final_path)
        self.file_options = file_options or FileOptions()
        #: Step metadata kept in memory; written at create and updated at finalize.
        self.metadata = StepMetadata()
        #: Set by a forced save: ``create`` must not refuse a committed checkpoint at the
        #: final path, and ``finalize`` replaces it (see :meth:`finalize`).
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

    @classmethod
    def adopt(cls, directory: UPath, final: UPath, *, backend: Backend) -> Self | None:
        """A writer that commits the existing, complete ``directory`` (a sibling of
        ``final``) as ``final`` without copying it, or None if this layout cannot (the
        caller then copies the data into a new temporary). Used by partial saves."""
        return None

    def get(self) -> UPath:
        """The path data is written to."""
        return self._tmp_path

    def get_final(self) -> UPath:
        """The path the checkpoint has once committed."""
        return self._final_path

    def created_ns(self) -> int | None:
        """When this writer started (from its temporary name), or None if unknown. Cleanup
        with ``created_before_ns`` spares temporaries created at or after that time."""
        return token_created_ns(self.get().name)

    # -- writing --------------------------------------------------------------------------
    @abc.abstractmethod
    async def create(self) -> UPath:
        """Create the temporary path and write the initial step metadata; return it."""

    @abc.abstractmethod
    async def finalize(self) -> None:
        """Commit: the checkpoint becomes visible at :meth:`get_final`, complete.

        With :attr:`replace_existing`, a committed checkpoint at the final path is replaced:
        it stays committed and readable until the new one is committed, and every failure
        leaves exactly one of the two committed.

        Raises:
            ckpt.CommitConflictError: another writer committed this checkpoint first.
            ckpt.CommitNotDurableError: the commit happened but could not be made durable.
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
        """Names among ``entries`` (from one listing of ``base``) that are committed
        checkpoints. Strategies whose commit evidence is in the name do no I/O here;
        others do at most one batched check."""

    @classmethod
    @abc.abstractmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        """True if ``path`` is a committed checkpoint under this strategy."""

    @classmethod
    @abc.abstractmethod
    async def is_temporary(cls, backend: Backend, path: UPath) -> bool:
        """True if ``path`` is a leftover of this layout that cleanup may remove (positive
        evidence only; a symbolic link never is)."""

    @classmethod
    @abc.abstractmethod
    async def scan(cls, backend: Backend, root: UPath, entries: list[Entry]) -> Scan:
        """Classify the children of ``root``; ``entries`` is one listing of it. A strategy
        may add a bounded number of batched calls (one listing of its own directory, one
        batched existence check), never one call per checkpoint in the common case."""

    # -- reading and deleting committed checkpoints ------------------------------------------
    @classmethod
    async def content_path(cls, backend: Backend, final: UPath) -> UPath | None:
        """Where the files of the committed checkpoint ``final`` are, if this layout puts
        them elsewhere than ``final`` and ``final`` shows evidence of it; else None
        (readers then read ``final`` itself)."""
        return None

    @classmethod
    @abc.abstractmethod
    async def delete(cls, backend: Backend, final: UPath) -> None:
        """Delete the committed checkpoint ``final`` crash-safely: uncommit it first, so
        that a crash at any point leaves it committed and intact, or leaves only
        leftovers that :meth:`scan` reports as temporary."""

    @classmethod
    async def repair(cls, backend: Backend, root: UPath, entries: list[Entry]) -> list[UPath]:
        """Bring back to exactly one committed checkpoint every state an interrupted
        commit or replace of this layout left under ``root`` (``entries``: one listing).
        Returns the final paths repaired. Called at manager start and by cleanup."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tmp={str(self.get())!r}, final={str(self.get_final())!r})"


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

    @classmethod
    async def is_temporary(cls, backend: Backend, path: UPath) -> bool:
        raise NotImplementedError

    @classmethod
    async def scan(cls, backend: Backend, root: UPath, entries: list[Entry]) -> Scan:
        raise NotImplementedError

    @classmethod
    async def delete(cls, backend: Backend, final: UPath) -> None:
        raise NotImplementedError
