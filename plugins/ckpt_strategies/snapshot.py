"""``snapshot``: change a committed checkpoint through a copy, then publish the copy.

Two kinds (:class:`SnapshotType`, after Orbax's ``snapshot_type``):

- ``IN_PLACE``: :meth:`SnapshotTemporaryPath.create` starts the temporary as a copy of the
  committed checkpoint at the final path (:meth:`ckpt.Backend.copy_tree`: a reflink clone
  or an in-kernel copy on a local filesystem, a server-side copy on an object store). The
  caller changes it; :meth:`~SnapshotTemporaryPath.finalize` publishes it as the new
  committed version. With no committed checkpoint at the final path, it is a plain save.
- ``EMPTY``: the temporary starts empty; ``finalize`` publishes it as a new pending
  directory ``<final>/piece-<token>`` of the existing directory at the final path (a
  partial-save session, :mod:`ckpt.partial`, merges such pieces at its finalize).

Without a ``snapshot_type`` (a save through the registry, ``atomicity="snapshot"``, e.g. by
a ``Checkpointer``, which writes whole trees), it is exactly a ``rename`` save.

The layout is ``rename``'s (its names, its temporaries, the commit evidence in the name),
so checkpoints written here are read, listed, deleted and cleaned up identically under
either strategy. Publishing an in-place snapshot is ``rename``'s forced replace: one
``exchange_dirs`` (``renameat2(RENAME_EXCHANGE)``) where the store can, else two renames
with the old checkpoint kept aside under ``<final>.ckpt-replaced-<token>``; every state a
crash leaves is brought back to exactly one committed checkpoint by ``repair`` (manager
start, cleanup, ``ckpt gc``, and a restore that finds the final path missing).

The integrity manifest (``_CKPT_MANIFEST.json``) of the published checkpoint is rebuilt at
``finalize`` from one listing of the temporary: a file the save recorded itself (the
checkpointer's manifest) keeps that record; a copied file whose size is unchanged and that
was not declared with :meth:`SnapshotTemporaryPath.mark_changed` keeps the copied record;
every other file (added, grown, shrunk, declared changed, or copied from a checkpoint
without a manifest) is read back and checksummed. Removed files drop out.
"""

from __future__ import annotations

import enum
import logging
from typing import Any, ClassVar

from upath import UPath

from ckpt import hookimpl
from ckpt.backend import Backend
from ckpt.layout import COMMIT_SUCCESS_FILE, METADATA_FILE, commit_marker_text, unique_token
from ckpt.manifest import MANIFEST_FILE, FileRecord, Manifest, read_manifest
from ckpt.partial import PIECE_PREFIX
from ckpt.step_metadata import read_step_metadata
from ckpt.strategy import FileOptions
from ckpt_strategies.rename import AtomicRenameTemporaryPath

__all__ = ["SnapshotTemporaryPath", "SnapshotType"]

logger = logging.getLogger(__name__)

#: Files the strategy itself writes at finalize: never recorded from the copy.
_OWN_FILES = frozenset({MANIFEST_FILE, METADATA_FILE, COMMIT_SUCCESS_FILE})


class SnapshotType(enum.StrEnum):
    """What a snapshot's temporary starts from."""

    #: A copy of the committed checkpoint, published as its new version.
    IN_PLACE = "in_place"
    #: Nothing; published as a new pending directory under the final path.
    EMPTY = "empty"


class SnapshotTemporaryPath(AtomicRenameTemporaryPath):
    """A writable copy of a committed checkpoint (or an empty pending directory)."""

    name = "snapshot"
    requires: ClassVar[tuple[str, ...]] = ("atomic_dir_rename", "snapshot")
    names_are_commit_evidence = True

    def __init__(
        self,
        temporary_path: UPath,
        final_path: UPath,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
        snapshot_type: SnapshotType | str | None = None,
    ) -> None:
        super().__init__(temporary_path, final_path, backend=backend, file_options=file_options)
        #: None (a save made through the registry, e.g. by a Checkpointer): no snapshot,
        #: exactly ``rename``'s save and forced replace.
        self.snapshot_type = None if snapshot_type is None else SnapshotType(snapshot_type)
        #: How the committed checkpoint was copied (``clone``, ``copy``, ``server_side``,
        #: ``read_write``), or None if nothing was copied.
        self.copy_method: str | None = None
        #: Where an ``EMPTY`` snapshot was published (set by :meth:`finalize`).
        self.published: UPath | None = None
        self._copied: Manifest | None = None
        self._changed: set[str] = set()

    @classmethod
    def from_final(
        cls,
        final_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
        snapshot_type: SnapshotType | str | None = None,
    ) -> SnapshotTemporaryPath:
        names = AtomicRenameTemporaryPath.from_final(final_path, backend=backend)
        return cls(
            names.get(),
            names.get_final(),
            backend=names.backend,
            file_options=file_options,
            snapshot_type=snapshot_type,
        )

    def mark_changed(self, *relpaths: str) -> None:
        """Declare files (``/``-separated, relative to :meth:`get`) rewritten in place
        without a change of size, so that :meth:`finalize` checksums them again."""
        self._changed.update(relpaths)

    async def create(self) -> UPath:
        tmp, final, backend = self.get(), self.get_final(), self.backend
        source_is_checkpoint = not await backend.is_link(final) and await backend.is_dir(final)
        if self.snapshot_type is SnapshotType.EMPTY and not source_is_checkpoint:
            raise FileNotFoundError(f"The snapshot's source {final} does not exist.")
        if self.snapshot_type is not SnapshotType.IN_PLACE or not source_is_checkpoint:
            return await super().create()
        await backend.mkdir(tmp.parent, parents=True, exist_ok=True)
        await backend.mkdir(
            tmp, parents=False, exist_ok=False, mode=self.file_options.path_permission_mode
        )
        self._created = True
        self.copy_method = await backend.copy_tree(final, tmp)
        logger.info("Snapshot of %s in %s (%s)", final, tmp, self.copy_method)
        try:
            self._copied = await read_manifest(backend, tmp)
        except ValueError:
            self._copied = None  # unreadable: every file is checksummed again at finalize
        await backend.remove_file(tmp / COMMIT_SUCCESS_FILE)
        await backend.remove_file(tmp / MANIFEST_FILE)
        self.metadata = await read_step_metadata(backend, tmp) or self.metadata
        await self._write_initial_metadata()
        self.replace_existing = True
        if self.file_options.path_permission_mode is not None:
            await backend.apply_dir_mode(tmp, self.file_options.path_permission_mode)
        return tmp

    async def finalize(self) -> None:
        if self.snapshot_type is None:
            await super().finalize()
            return
        await self._rebuild_manifest()
        if self.snapshot_type is SnapshotType.IN_PLACE:
            await super().finalize()
            return
        tmp, source, backend = self.get(), self.get_final(), self.backend
        await self._write_commit_metadata()
        target = source / f"{PIECE_PREFIX}{unique_token()}"
        marker = commit_marker_text(str(target)).encode()
        await backend.write_bytes(tmp / COMMIT_SUCCESS_FILE, marker)
        await backend.sync_tree(tmp)
        logger.info("Publishing snapshot %s as %s", tmp, target)
        await backend.rename_dir(tmp, target)  # never replaces: the name is new
        self.published = target
        await backend.sync_dir(source)

    async def _rebuild_manifest(self) -> None:
        """The manifest of what the temporary holds now (see the module docstring)."""
        tmp, backend = self.get(), self.backend
        found = await backend.file_sizes(tmp)
        written = self.manifest.files if self.manifest is not None else {}
        copied = self._copied.files if self._copied is not None else {}
        manifest = Manifest()
        for rel, size in sorted(found.items()):
            if rel in _OWN_FILES:
                continue
            record: FileRecord | None = written.get(rel)
            if record is None and rel not in self._changed:
                record = copied.get(rel)
            if record is not None and record.size == size:
                manifest.add_record(rel, record)
            else:
                manifest.add(rel, await backend.read_bytes(tmp / rel))
        self.manifest = manifest


@hookimpl
def register_strategies(register: Any) -> None:
    register("snapshot", SnapshotTemporaryPath)
