"""``commit_file``: each writer writes into its own directory
``<root>/.ckpt-writers/<final>.ckpt-writer-<id>``; the commit is a create-if-absent of
``<final>/commit_success.txt`` whose text names the winning writer directory.

With a conditional put, two writers committing one step cannot both win: the loser gets
:class:`ckpt.CommitConflictError` and removes its own files; the winner's checkpoint is
exactly what the winner wrote, and a zombie writer can never add files to it. Nothing is
written under the final name before the marker, so on stores without folders a final name
in a listing is itself the commit evidence. Checkpoints committed by Orbax (a marker and
the files directly in the final directory) are read as they are.

A forced save replaces a committed checkpoint in one step: an unconditional write of the
marker naming the new writer directory (atomic on every store: a PUT, or a local
write-beside-and-rename). The old writer directory, no longer named, is then removed.

Unlike Orbax, an unmarked directory is never treated as temporary (orbax#394): only the
writer directories ckpt creates, names with the temporary suffix, and a final directory
holding nothing but what an interrupted commit or delete leaves (nothing at all, or a
private file of an interrupted marker write) are. A marker that cannot be read keeps every
writer directory of its checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from upath import UPath

from ckpt import hookimpl
from ckpt.backend import Backend, Entry
from ckpt.errors import CommitConflictError, CommitNotDurableError, ValidationError
from ckpt.layout import (
    COMMIT_SUCCESS_FILE,
    commit_marker_text,
    is_commit_marker,
    is_temporary_name,
    unique_token,
)
from ckpt.paths import to_path
from ckpt.strategy import FileOptions, Scan, TemporaryPath, token_created_ns
from ckpt_strategies._common import backend_for as _backend
from ckpt_strategies._common import reject_symlink, require_dir

logger = logging.getLogger(__name__)

#: Infix of the writer-unique directory holding one writer's files:
#: ``<root>/.ckpt-writers/<final name>.ckpt-writer-<token>``.
WRITER_DIR_INFIX = ".ckpt-writer-"
#: The one directory under a checkpoint root that holds writer directories (one entry in
#: the root's listing however many checkpoints there are).
WRITERS_DIR = ".ckpt-writers"
_WRITER_LINE = "ckpt-writer: "
#: What an interrupted local marker write may leave in a final directory.
_PARTIAL_MARKER = f"{COMMIT_SUCCESS_FILE}.ckpt-partial-"
_MALFORMED = "<malformed>"


def writer_dir_name(final_name: str, token: str | None = None) -> str:
    """The name of a writer-unique directory for ``final_name`` (inside :data:`WRITERS_DIR`)."""
    return f"{final_name}{WRITER_DIR_INFIX}{token or unique_token()}"


def is_writer_dir_name(name: str) -> bool:
    """Whether ``name`` is a writer's private directory (``<final name>.ckpt-writer-<token>``,
    under ``.ckpt-writers``) and not a temporary."""
    return WRITER_DIR_INFIX in name and not is_temporary_name(name)


def final_name_of_writer(name: str) -> str:
    """The final name a writer directory belongs to."""
    index = name.find(WRITER_DIR_INFIX)
    if index <= 0:
        raise ValueError(f"Expected {name!r} to contain {WRITER_DIR_INFIX!r}.")
    return name[:index]


def marker_text(final: str, writer_dir: str | None = None) -> str:
    """Text of ``commit_success.txt``; names the winning writer directory if there is one."""
    text = commit_marker_text(final)
    if writer_dir:
        text += f"\n{_WRITER_LINE}{WRITERS_DIR}/{writer_dir}\n"
    return text


def writer_dir_from_marker(text: str, final_name: str) -> str | None:
    """The name of the writer directory the commit marker of ``final_name`` names, or None
    (Orbax's marker names none). ValueError for anything but a complete marker naming a
    writer directory of ``final_name`` inside :data:`WRITERS_DIR`, or none."""
    if not is_commit_marker(text):
        raise ValueError(f"Malformed commit marker of {final_name!r}: {text[:80]!r}.")
    for line in text.splitlines():
        if line.startswith(_WRITER_LINE):
            relative = line[len(_WRITER_LINE) :].strip()
            head, _, name = relative.partition("/")
            if (
                head == WRITERS_DIR
                and name.startswith(final_name + WRITER_DIR_INFIX)
                and "/" not in name
                and "\\" not in name
                and ".." not in name
            ):
                return name
            raise ValueError(f"Malformed commit marker of {final_name!r}: writer {name!r}.")
    return None


async def committed_writer(backend: Backend, final: UPath) -> str | None:
    """The writer directory the commit marker of ``final`` names, or None (no marker, or
    an Orbax marker). ValueError for a marker that cannot be read as one."""
    try:
        raw = await backend.read_bytes(final / COMMIT_SUCCESS_FILE)
    except FileNotFoundError:
        return None
    return writer_dir_from_marker(raw.decode("utf-8", "replace"), final.name)


def _is_layout_name(name: str) -> bool:
    return is_temporary_name(name) or is_writer_dir_name(name) or name == WRITERS_DIR


def _leftover(entries: list[Entry]) -> bool:
    """A final directory's listing that holds nothing a checkpoint could be made of."""
    return all(not e.is_dir and e.name.startswith(_PARTIAL_MARKER) for e in entries)


def _refuse_snapshot(snapshot_type: Any) -> None:
    """commit_file cannot snapshot (as in Orbax): its writers never start from a copy."""
    if snapshot_type is not None:
        raise ValueError("Snapshot is not supported for CommitFileTemporaryPath.")


class CommitFileTemporaryPath(TemporaryPath):
    """Writer-unique sibling directory, committed by a conditional marker file."""

    name = "commit_file"
    requires = ("conditional_put",)
    #: For an empty final directory left over: when the newest writer of it started.
    created_hint_ns: int | None = None

    def created_ns(self) -> int | None:
        if self.created_hint_ns is not None:
            return self.created_hint_ns
        return super().created_ns()

    @classmethod
    def from_final(
        cls,
        final_path: Any,
        *,
        backend: Backend | None = None,
        file_options: FileOptions | None = None,
        snapshot_type: Any = None,
    ) -> CommitFileTemporaryPath:
        _refuse_snapshot(snapshot_type)
        final = to_path(final_path)
        if _is_layout_name(final.name):
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
        snapshot_type: Any = None,
    ) -> CommitFileTemporaryPath:
        _refuse_snapshot(snapshot_type)
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
        marker = marker_text(str(final), writer_dir=tmp.name).encode()
        if self.replace_existing and await self.backend.exists(final / COMMIT_SUCCESS_FILE):
            await self._replace(marker)
            return
        logger.info("Committing %s (writer %s)", final, tmp.name)
        try:
            await self.backend.create_exclusive(final / COMMIT_SUCCESS_FILE, marker)
        except FileExistsError as exc:
            await self.discard()
            raise CommitConflictError(
                f"Cannot commit {final}: another writer committed it first. The committed "
                f"checkpoint was left untouched and this writer's {tmp.name} was removed."
            ) from exc
        except BaseException:
            await self._drop_empty_final()
            raise
        await _sync_final(self.backend, final)

    async def _drop_empty_final(self) -> None:
        """After a failed marker write: remove the step directory made for it if it is
        still empty (no leftover to wait for cleanup); best effort."""
        final = self.get_final()
        try:
            if not await self.backend.list_dir(final):
                await self.backend.remove_tree(final)
        except Exception as exc:
            logger.warning("Could not remove the empty %s (%r); cleanup will.", final, exc)

    async def _replace(self, marker: bytes) -> None:
        """Switch the marker to this writer in one write; then drop the old files."""
        tmp, final, backend = self.get(), self.get_final(), self.backend
        old = await committed_writer(backend, final)  # ValueError: leave it all alone
        logger.info("force=True: replacing %s (writer %s)", final, tmp.name)
        await backend.write_bytes(final / COMMIT_SUCCESS_FILE, marker)
        await _sync_final(backend, final)
        try:
            if old is not None and old != tmp.name:
                await backend.remove_tree(final.parent / WRITERS_DIR / old)
            for entry in await backend.list_dir(final):  # files of an Orbax-layout checkpoint
                if entry.name != COMMIT_SUCCESS_FILE:
                    await backend.remove_tree(final / entry.name)
        except Exception as exc:
            logger.warning("Could not remove the replaced files of %s (%r).", final, exc)

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
    def _candidates(cls, entries: list[Entry]) -> list[str]:
        return [
            e.name
            for e in entries
            if e.is_dir and not e.is_link and not _is_layout_name(e.name)
        ]

    @classmethod
    async def finalized_names(
        cls, backend: Backend, base: UPath, entries: list[Entry]
    ) -> list[str]:
        candidates = cls._candidates(entries)
        if backend.names_decide_commit:
            return candidates
        found = await backend.exists_in_children(base, candidates, COMMIT_SUCCESS_FILE)
        return [n for n, ok in zip(candidates, found, strict=True) if ok]

    @classmethod
    async def is_finalized(cls, backend: Backend, path: UPath) -> bool:
        if _is_layout_name(path.name) or await backend.is_link(path):
            return False
        return await backend.exists(path / COMMIT_SUCCESS_FILE)

    @classmethod
    async def is_temporary(cls, backend: Backend, path: UPath) -> bool:
        if await backend.is_link(path) or not await backend.is_dir(path):
            return False
        if is_temporary_name(path.name):
            return True
        if is_writer_dir_name(path.name) and path.parent.name == WRITERS_DIR:
            try:
                return await committed_writer(backend, _final_of(path)) != path.name
            except ValueError:
                return False  # an unreadable marker: keep everything
        if _is_layout_name(path.name) or not backend.capabilities.folders:
            return False
        if await backend.exists(path / COMMIT_SUCCESS_FILE):
            return False
        return _leftover(await backend.list_dir(path))

    @classmethod
    async def scan(cls, backend: Backend, root: UPath, entries: list[Entry]) -> Scan:
        dirs = [e for e in entries if e.is_dir and not e.is_link]
        names = {e.name for e in dirs}
        scan = Scan()
        for entry in dirs:
            if is_temporary_name(entry.name):
                scan.temporary.append(cls.from_temporary(root / entry.name, backend=backend))
        candidates = cls._candidates(entries)
        if backend.names_decide_commit:
            scan.finalized = candidates
            unmarked: list[str] = []
        else:
            found = await backend.exists_in_children(root, candidates, COMMIT_SUCCESS_FILE)
            scan.finalized = [n for n, ok in zip(candidates, found, strict=True) if ok]
            unmarked = [n for n, ok in zip(candidates, found, strict=True) if not ok]
        writers: dict[str, list[str]] = {}
        if WRITERS_DIR in names:
            scan.internal.append(WRITERS_DIR)
            for entry in await backend.list_dir(root / WRITERS_DIR):
                if entry.is_dir and not entry.is_link and is_writer_dir_name(entry.name):
                    writers.setdefault(final_name_of_writer(entry.name), []).append(entry.name)
        if backend.capabilities.folders and unmarked:
            # Remains of an interrupted commit or delete: an empty final directory. It is
            # as young as the newest writer of that name (which may be about to commit).
            listings = await asyncio.gather(*(backend.list_dir(root / n) for n in unmarked))
            for name, listing in zip(unmarked, listings, strict=True):
                if _leftover(listing):
                    tmp = cls.from_temporary(root / name, backend=backend)
                    times = [token_created_ns(w) for w in writers.get(name, [])]
                    tmp.created_hint_ns = max((t for t in times if t is not None), default=None)
                    scan.temporary.append(tmp)
        finals = sorted(writers)

        async def winner(final: str) -> str | None:
            if final not in names:
                return None
            if backend.names_decide_commit and len(writers[final]) == 1:
                # A final name is listed only once its marker exists, and a delete removes
                # the marker before the writer directory: a sole writer is the winner.
                return writers[final][0]
            try:
                return await committed_writer(backend, root / final)
            except ValueError:  # unreadable marker: keep everything
                return _MALFORMED

        winners = await asyncio.gather(*(winner(f) for f in finals))
        for final, won in zip(finals, winners, strict=True):
            if won == _MALFORMED:
                logger.warning("Malformed commit marker in %s; leaving its writers alone.", final)
                continue
            for name in writers[final]:
                if name != won:
                    scan.temporary.append(
                        cls.from_temporary(root / WRITERS_DIR / name, backend=backend)
                    )
        return scan

    @classmethod
    async def content_path(cls, backend: Backend, final: UPath) -> UPath | None:
        try:
            writer = await committed_writer(backend, final)
        except ValueError:
            return None
        return final.parent / WRITERS_DIR / writer if writer else None

    @classmethod
    async def delete(cls, backend: Backend, final: UPath) -> None:
        if await backend.is_link(final):
            await backend.remove_tree(final)  # the link only, never what it points to
            return
        writer = await committed_writer(backend, final)
        # Uncommit first: a crash later leaves an unnamed writer directory and an empty
        # final directory, both temporary.
        await backend.remove_file(final / COMMIT_SUCCESS_FILE)
        if writer:
            await backend.remove_tree(final.parent / WRITERS_DIR / writer)
        await backend.remove_tree(final)


def _final_of(writer_dir: UPath) -> UPath:
    """``<root>/.ckpt-writers/<name>.ckpt-writer-<id>`` -> ``<root>/<name>``."""
    return writer_dir.parent.parent / final_name_of_writer(writer_dir.name)


async def _sync_final(backend: Backend, final: UPath) -> None:
    try:
        await backend.sync_dir(final)
        await backend.sync_dir(final.parent)
    except Exception as exc:
        raise CommitNotDurableError(
            f"{final} is committed, but making the commit durable failed ({exc!r}): after "
            "a power loss it might be missing."
        ) from exc


@hookimpl
def register_strategies(register: Any) -> None:
    register("commit_file", CommitFileTemporaryPath)
