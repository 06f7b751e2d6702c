"""The storage backend contract: where bytes go and what the store can do.

A backend knows one kind of store, chosen by URL scheme. It offers a small set of async
primitives that every strategy, the discovery code and the checkpointers use for all their
I/O (so tests can wrap every storage call), and it declares its :class:`Capabilities`.

Backends are registered through the ``register_backends`` hook (see :mod:`ckpt.hookspecs`).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from upath import UPath

__all__ = ["Backend", "Capabilities", "Entry"]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a store can do. Strategies require some of these; the conformance suite
    skips what a backend does not declare, and says why.

    Attributes:
        atomic_dir_rename: a directory can be renamed atomically, without replacing an
            existing destination.
        atomic_dir_exchange: two directories can swap names in one atomic step
            (``renameat2(RENAME_EXCHANGE)`` on Linux); see :meth:`Backend.exchange_dirs`.
        conditional_put: a small object can be created only if absent (exactly one of
            several racing creators succeeds).
        snapshot: :meth:`Backend.copy_tree` copies without passing the bytes through the
            client: a copy-on-write clone or an in-kernel copy on a filesystem, a
            server-side copy on an object store. Without it, the copy reads and writes
            every byte (the default :meth:`Backend.copy_tree`).
        symlinks: the store has symbolic links (which ckpt never follows as checkpoints).
        durable_fsync: data can be flushed to stable storage (fsync) before a commit.
        permissions: created directories take a permission mode.
        folders: directories are real objects on the store (created and deleted explicitly).
    """

    atomic_dir_rename: bool = False
    atomic_dir_exchange: bool = False
    conditional_put: bool = False
    snapshot: bool = False
    symlinks: bool = False
    durable_fsync: bool = False
    permissions: bool = False
    folders: bool = False

    def names(self) -> list[str]:
        """The names of the capabilities this store has."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name)]

    def has(self, name: str) -> bool:
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise ValueError(f"Unknown capability {name!r}.")
        return bool(getattr(self, name))


class Entry(NamedTuple):
    """One child in a directory listing."""

    name: str
    is_dir: bool
    is_link: bool = False


class Backend(abc.ABC):
    """Base class of storage backends.

    Subclasses set :attr:`scheme`, :attr:`capabilities` and :attr:`default_strategy` and
    implement the abstract async primitives. Paths passed in are :class:`upath.UPath`
    objects made by :meth:`path`.
    """

    #: URL scheme(s) this backend serves (``"file"`` for plain paths).
    scheme: str = ""
    #: Distribution that provides the backend (shown by ``ckpt backends``).
    package: str = ""
    capabilities: Capabilities = Capabilities()
    #: The strategy ``atomicity = "auto"`` resolves to on this backend (every backend
    #: names one of the strategies it supports).
    default_strategy: str = ""
    #: True on stores without folders where a name appears in a listing only once an object
    #: is written under it. ``commit_file`` writes nothing under the final name before its
    #: marker, so there a final name in a listing *is* the commit evidence (one LIST, no
    #: per-step request). Checkpoints written by other tools may break that rule: keep
    #: False where foreign in-progress checkpoints can share the directory.
    names_decide_commit: bool = False

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scheme={self.scheme!r})"

    # -- paths ---------------------------------------------------------------
    def path(self, location: Any) -> UPath:
        """A path object for ``location`` (a str, URL or os.PathLike) on this backend."""
        if isinstance(location, UPath):
            return location
        return UPath(location)

    def bind(self, path: UPath) -> Backend:
        """The backend that serves ``path``. Stores whose capabilities differ per bucket
        (e.g. GCS flat vs hierarchical-namespace buckets) return a per-bucket view here;
        the default is ``self``."""
        return self

    def describe(self) -> str:
        """Human name used in error messages, e.g. ``local filesystem`` or ``s3``."""
        return self.scheme

    # -- primitives (all storage I/O goes through these) -----------------------
    @abc.abstractmethod
    async def exists(self, path: UPath) -> bool: ...

    @abc.abstractmethod
    async def is_dir(self, path: UPath) -> bool: ...

    async def is_link(self, path: UPath) -> bool:
        """True if ``path`` is a symbolic link (always False without ``symlinks``)."""
        return False

    @abc.abstractmethod
    async def mkdir(
        self, path: UPath, *, parents: bool = True, exist_ok: bool = True, mode: int | None = None
    ) -> None:
        """Create a directory (and, with ``parents``, its missing parents). With ``mode``
        (backends with ``permissions``), every directory created gets exactly that mode,
        whatever the umask. Stores without real directories may do nothing."""

    @abc.abstractmethod
    async def list_dir(self, path: UPath) -> list[Entry]:
        """One level of children of ``path`` (all pages). Missing directory -> ``[]``."""

    @abc.abstractmethod
    async def read_bytes(self, path: UPath) -> bytes:
        """Read a whole (small) file; ``FileNotFoundError`` if absent."""

    @abc.abstractmethod
    async def write_bytes(self, path: UPath, data: bytes) -> None:
        """Write a whole (small) file, replacing it; missing parent directories are created.

        Readers never see a partially written file."""

    async def write_buffers(self, path: UPath, buffers: Sequence[Any]) -> None:
        """Write a whole file holding ``buffers`` (bytes-like objects: ``bytes``,
        ``memoryview``, C-contiguous uint8 numpy arrays) one after another, like ``writev``;
        otherwise as :meth:`write_bytes` (replacing, never seen half-written).

        The default joins them into one ``bytes`` and calls :meth:`write_bytes`. A backend
        that can write several buffers without joining them (local files: ``os.writev``)
        overrides it; ckpt writes pack files (many leaves back to back) through it."""
        await self.write_bytes(path, b"".join(memoryview(b).cast("B") for b in buffers))

    async def create_exclusive(self, path: UPath, data: bytes) -> None:
        """Create ``path`` only if absent; ``FileExistsError`` if it exists. Missing parent
        directories are created.

        Backends declaring ``conditional_put`` implement this with a store-side
        precondition, so exactly one of several racing creators succeeds.
        """
        raise NotImplementedError(f"{self.describe()} has no conditional put.")

    @abc.abstractmethod
    async def remove_file(self, path: UPath) -> None:
        """Delete one file; a missing file is not an error."""

    @abc.abstractmethod
    async def remove_tree(self, path: UPath) -> None:
        """Delete a directory and everything under it; missing is not an error.

        Never follows symbolic links."""

    async def rename_dir(self, src: UPath, dst: UPath) -> None:
        """Atomically rename directory ``src`` to ``dst``; ``FileExistsError`` if ``dst``
        exists (it is never replaced). Only with ``atomic_dir_rename``."""
        raise NotImplementedError(f"{self.describe()} cannot rename directories atomically.")

    async def exchange_dirs(self, a: UPath, b: UPath) -> None:
        """Swap the names of the existing directories ``a`` and ``b`` in one atomic step.
        Only with ``atomic_dir_exchange``; ``NotImplementedError`` where the store (or, at
        run time, the filesystem) cannot, so that callers can fall back."""
        raise NotImplementedError(f"{self.describe()} cannot exchange directories atomically.")

    async def sync_tree(self, path: UPath) -> None:
        """Make everything under ``path`` durable (fsync files, then directories).

        No-op unless the backend declares ``durable_fsync``."""
        return None

    async def sync_dir(self, path: UPath) -> None:
        """Make the entries of directory ``path`` durable (after a rename)."""
        return None

    async def exists_many(self, paths: Sequence[UPath]) -> list[bool]:
        """Batched existence check (concurrent by default)."""
        return list(await asyncio.gather(*(self.exists(p) for p in paths)))

    async def exists_in_children(
        self, base: UPath, names: Sequence[str], filename: str
    ) -> list[bool]:
        """For each child ``name`` of ``base``: does ``base/name/filename`` exist?

        One batched check used by discovery; backends may override it with something
        cheaper than building a path per child."""
        return await self.exists_many([base / n / filename for n in names])

    async def tree_size(self, path: UPath) -> int:
        """Total bytes of the files under ``path`` (0 if missing)."""
        total = 0
        for entry in await self.list_dir(path):
            child = path / entry.name
            if entry.is_link:
                continue
            if entry.is_dir:
                total += await self.tree_size(child)
            else:
                total += await self.file_size(child)
        return total

    async def file_size(self, path: UPath) -> int:
        return len(await self.read_bytes(path))

    async def file_sizes(self, path: UPath) -> dict[str, int]:
        """Size in bytes of every file under ``path``, by ``/``-separated path relative to
        ``path`` (recursive; symlinks skipped; empty if ``path`` is missing).

        Integrity checks call this once per restore, so backends should override it with
        one listing (a recursive LIST on object stores) instead of this default, which
        lists each directory and asks for each file's size."""
        out: dict[str, int] = {}

        async def walk(directory: UPath, prefix: str) -> None:
            try:
                entries = await self.list_dir(directory)
            except FileNotFoundError:
                return
            for entry in entries:
                if entry.is_link:
                    continue
                if entry.is_dir:
                    await walk(directory / entry.name, f"{prefix}{entry.name}/")
                else:
                    out[prefix + entry.name] = await self.file_size(directory / entry.name)

        await walk(path, "")
        return out

    def copy_methods(self) -> list[str]:
        """The copy methods :meth:`copy_tree` accepts here, cheapest first; the first is
        what it uses by default. ``read_write`` (the portable default) is always last."""
        return ["read_write"]

    async def copy_tree(self, src: UPath, dst: UPath, *, method: str | None = None) -> str:
        """Copy every file under directory ``src`` to the same relative path under ``dst``
        (created; must not hold those files yet). Symbolic links are skipped.

        ``method`` is one of :meth:`copy_methods` (None: the cheapest). Returns the method
        that was actually used: a backend may fall back to a dearer one at run time (e.g.
        a filesystem without reflinks), never to a cheaper one. This default reads and
        writes every file through :meth:`read_bytes` and :meth:`write_bytes`; backends
        override it with what their store does cheaper (declaring ``snapshot``)."""
        if method not in (None, "read_write"):
            raise ValueError(
                f"Unknown copy method {method!r} on {self.describe()}; "
                f"available: {', '.join(self.copy_methods())}."
            )
        await self.mkdir(dst, parents=True, exist_ok=True)

        async def walk(source: UPath, target: UPath) -> None:
            for entry in await self.list_dir(source):
                if entry.is_link:
                    continue
                if entry.is_dir:
                    await self.mkdir(target / entry.name, parents=True, exist_ok=True)
                    await walk(source / entry.name, target / entry.name)
                else:
                    data = await self.read_bytes(source / entry.name)
                    await self.write_bytes(target / entry.name, data)

        await walk(src, dst)
        return "read_write"

    async def apply_dir_mode(self, path: UPath, mode: int) -> None:
        """Give ``path`` and every directory under it the permission ``mode`` (whatever the
        umask; for directories made by tensorstore too). No-op unless the backend declares
        ``permissions``."""
        return None

    async def modified_ns(self, path: UPath) -> int | None:
        """When anything under ``path`` was last modified (nanoseconds since the epoch):
        the newest modification time of the tree. None if the store cannot tell (then
        ``ckpt gc --older-than`` judges a temporary by the creation time in its name)."""
        return None

    # -- array data ----------------------------------------------------------
    @abc.abstractmethod
    def kvstore_spec(self, path: UPath) -> dict[str, Any]:
        """The tensorstore kvstore spec that reads and writes under ``path``."""

    # -- helpers ---------------------------------------------------------------
    def strategy_names_supported(self, strategies: Iterable[tuple[str, Any]]) -> list[str]:
        """Names of the given ``(name, strategy class)`` pairs this backend can run."""
        return [
            name
            for name, cls in strategies
            if all(self.capabilities.has(c) for c in getattr(cls, "requires", ()))
        ]
