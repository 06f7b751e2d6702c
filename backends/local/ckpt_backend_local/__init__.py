"""The local POSIX filesystem backend (ships with ckpt; scheme ``file`` and plain paths).

Durable: files and directories are fsync'ed before a commit, the parent directory after a
rename. Renames never replace an existing directory (``renameat2(RENAME_NOREPLACE)``).
Two directories swap in one step with ``renameat2(RENAME_EXCHANGE)``. A conditional create
writes a private file, fsyncs it and hard-links it into place, so the file appears complete
or not at all. Symbolic links are never followed. :meth:`LocalBackend.copy_tree` clones
files (``FICLONE``, copy-on-write: XFS with reflink, btrfs, bcachefs, ZFS 2.2+) where the
filesystem can, else copies them in the kernel (``sendfile``); it never hard-links, since
a hard-linked file rewritten in place would change the checkpoint it was copied from.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import uuid
from collections.abc import Sequence
from typing import Any

from upath import UPath

from ckpt import hookimpl
from ckpt.backend import Backend, Capabilities, Entry
from ckpt_backend_local._rename import exchange, rename_noreplace

__all__ = ["LocalBackend"]


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _p(path: UPath) -> str:
    return path.path if isinstance(path, UPath) else os.fspath(path)


class LocalBackend(Backend):
    """Local disk, NFS and other POSIX mounts."""

    scheme = "file"
    package = "ckpt-core"
    capabilities = Capabilities(
        atomic_dir_rename=True,
        atomic_dir_exchange=True,
        conditional_put=True,
        snapshot=True,
        symlinks=True,
        durable_fsync=True,
        permissions=True,
        folders=True,
    )
    default_strategy = "rename"

    def describe(self) -> str:
        return "local filesystem"

    async def exists(self, path: UPath) -> bool:
        return os.path.lexists(_p(path))

    async def is_dir(self, path: UPath) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(_p(path)).st_mode)
        except FileNotFoundError:
            return False

    async def is_link(self, path: UPath) -> bool:
        return os.path.islink(_p(path))

    async def mkdir(
        self, path: UPath, *, parents: bool = True, exist_ok: bool = True, mode: int | None = None
    ) -> None:
        target = _p(path)
        if parents:
            parent = os.path.dirname(target.rstrip("/"))
            if parent and not os.path.isdir(parent):
                _makedirs(parent, mode)
        try:
            os.mkdir(target)
        except FileExistsError:
            # With exist_ok an existing directory, or a symlink to one (a root such as
            # ~/ckpts -> /scratch/ckpts, as for its ancestors), is fine. Without it nothing
            # existing is, a symlink least of all: it is never taken as a new checkpoint.
            if not exist_ok or not os.path.isdir(target):
                raise FileExistsError(
                    errno.EEXIST, "Directory already exists (or is not a directory)", target
                ) from None
            return
        if mode is not None:
            os.chmod(target, mode)  # not subject to the umask, unlike mkdir's mode

    async def list_dir(self, path: UPath) -> list[Entry]:
        try:
            with os.scandir(_p(path)) as it:
                return [Entry(e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return []

    async def read_bytes(self, path: UPath) -> bytes:
        with open(_p(path), "rb") as f:
            return f.read()

    async def write_bytes(self, path: UPath, data: bytes) -> None:
        await asyncio.to_thread(_write_replace, _p(path), data)

    async def write_buffers(self, path: UPath, buffers: Sequence[Any]) -> None:
        await asyncio.to_thread(_write_replace, _p(path), buffers)

    async def create_exclusive(self, path: UPath, data: bytes) -> None:
        await asyncio.to_thread(_write_exclusive, _p(path), data)

    async def remove_file(self, path: UPath) -> None:
        try:
            os.unlink(_p(path))
        except FileNotFoundError:
            pass

    async def remove_tree(self, path: UPath) -> None:
        target = _p(path)
        if os.path.islink(target) or os.path.isfile(target):
            os.unlink(target)
            return
        if os.path.isdir(target):
            # rmtree never follows symlinks inside the tree.
            await asyncio.to_thread(_rmtree, target)

    async def rename_dir(self, src: UPath, dst: UPath) -> None:
        await asyncio.to_thread(rename_noreplace, _p(src), _p(dst))

    async def exchange_dirs(self, a: UPath, b: UPath) -> None:
        await asyncio.to_thread(exchange, _p(a), _p(b))

    async def sync_tree(self, path: UPath) -> None:
        await asyncio.to_thread(_fsync_tree, _p(path))

    async def sync_dir(self, path: UPath) -> None:
        await asyncio.to_thread(_fsync_dir, _p(path))

    async def exists_many(self, paths: Any) -> list[bool]:
        return [os.path.lexists(_p(p)) for p in paths]

    async def exists_in_children(self, base: UPath, names: Any, filename: str) -> list[bool]:
        root = _p(base)
        return [os.path.lexists(os.path.join(root, n, filename)) for n in names]

    async def file_size(self, path: UPath) -> int:
        return os.lstat(_p(path)).st_size

    async def tree_size(self, path: UPath) -> int:
        return await asyncio.to_thread(_tree_size, _p(path))

    async def file_sizes(self, path: UPath) -> dict[str, int]:
        return await asyncio.to_thread(_file_sizes, _p(path))

    async def apply_dir_mode(self, path: UPath, mode: int) -> None:
        await asyncio.to_thread(_chmod_dirs, _p(path), mode)

    def copy_methods(self) -> list[str]:
        return ["clone", "copy", "read_write"]

    async def copy_tree(self, src: UPath, dst: UPath, *, method: str | None = None) -> str:
        method = method or "clone"
        if method == "read_write":
            return await super().copy_tree(src, dst, method=method)
        if method not in ("clone", "copy"):
            raise ValueError(
                f"Unknown copy method {method!r} on {self.describe()}; "
                f"available: {', '.join(self.copy_methods())}."
            )
        return await asyncio.to_thread(_copy_tree, _p(src), _p(dst), method == "clone")

    async def modified_ns(self, path: UPath) -> int | None:
        return await asyncio.to_thread(_newest_mtime_ns, _p(path))

    def kvstore_spec(self, path: UPath) -> dict[str, Any]:
        return {"driver": "file", "path": _p(path).rstrip("/") + "/"}


def _write_all(fd: int, data: bytes | Sequence[Any]) -> None:
    """Write ``data`` (bytes, or bytes-like buffers one after another), then fsync."""
    buffers: Sequence[Any] = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
    first = 0
    while first < len(views):
        # writev takes at most IOV_MAX buffers and may write less than asked.
        n = os.writev(fd, views[first : first + _IOV_MAX])
        while first < len(views) and n >= views[first].nbytes:
            n -= views[first].nbytes
            first += 1
        if n:
            views[first] = views[first][n:]
    os.fsync(fd)


def _write_replace(target: str, data: bytes | Sequence[Any]) -> None:
    """Write beside, fsync, rename over: a reader never sees a half-written file."""
    tmp = f"{target}.ckpt-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = _open_creating_parents(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, target)


def _write_exclusive(target: str, data: bytes) -> None:
    """Create ``target`` complete or not at all: write and fsync a private file beside it,
    then hard-link it into place (``link`` never replaces: ``EEXIST`` if ``target`` exists).
    A crash leaves no ``target`` or a complete one, plus at most the private file."""
    tmp = f"{target}.ckpt-partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = _open_creating_parents(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.link(tmp, target)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _open_creating_parents(path: str, flags: int) -> int:
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o644)


#: ``ioctl(dst, FICLONE, src)``: make ``dst`` share ``src``'s extents (copy-on-write).
FICLONE = 0x40049409
#: What FICLONE fails with where the filesystem (or the pair of files) cannot clone.
_NO_CLONE = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)


def _clone_file(src: str, dst: str) -> bool:
    """Clone ``src`` to the new file ``dst`` with FICLONE; False (and no ``dst``) where the
    filesystem cannot."""
    import fcntl

    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.ioctl(fd, FICLONE, fin.fileno())
        except OSError as exc:
            os.close(fd)
            os.unlink(dst)
            if exc.errno in _NO_CLONE:
                return False
            raise
        os.close(fd)
    return True


def _copy_tree(src: str, dst: str, clone: bool) -> str:
    """Copy the files under ``src`` to ``dst``: cloned while the filesystem can (``clone``),
    else copied by the kernel. Returns ``clone`` if every file was cloned, else ``copy``."""
    used = "clone" if clone else "copy"
    src = src.rstrip("/")
    os.makedirs(dst, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        rel = os.path.relpath(dirpath, src)
        target_dir = dst if rel == "." else os.path.join(dst, rel)
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.makedirs(os.path.join(target_dir, name), exist_ok=True)
        for name in filenames:
            source, target = os.path.join(dirpath, name), os.path.join(target_dir, name)
            if os.path.islink(source):
                continue
            if used == "clone" and _clone_file(source, target):
                continue
            used = "copy"  # the first file that cannot be cloned: no later one can either
            shutil.copyfile(source, target, follow_symlinks=False)
    return used


def _rmtree(target: str) -> None:
    """``shutil.rmtree``, where what another remover deleted first is not an error."""

    def onerror(func: Any, path: str, exc_info: Any) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(target, onerror=onerror)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False, followlinks=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                continue
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _makedirs(path: str, mode: int | None) -> None:
    """``os.makedirs``; with ``mode``, each directory it creates gets exactly ``mode``."""
    missing = []
    head = path.rstrip("/")
    while head and not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        if mode is not None:
            os.chmod(directory, mode)


def _chmod_dirs(root: str, mode: int) -> None:
    """chmod ``root`` and every directory under it (never following symlinks)."""
    for dirpath, _dirnames, _filenames in os.walk(root, followlinks=False):
        os.chmod(dirpath, mode)


def _newest_mtime_ns(root: str) -> int | None:
    """The newest modification time of ``root`` and everything under it (None: missing)."""
    try:
        newest = os.lstat(root).st_mtime_ns
    except FileNotFoundError:
        return None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime_ns)
            except FileNotFoundError:
                pass
    return newest


def _tree_size(root: str) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def _file_sizes(root: str) -> dict[str, int]:
    out: dict[str, int] = {}
    root = root.rstrip("/")
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[prefix + name] = st.st_size
    return out


@hookimpl
def register_backends(register: Any) -> None:
    register(LocalBackend, schemes=("file", "local"))
