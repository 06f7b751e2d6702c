"""A backend wrapper that passes every storage primitive through test hooks.

Wrap any backend to make chosen calls fail, hold until released, or run code first, and to
log every call: the base for fault-injection tests. Keys are ``"op"`` or
``"op:<file or directory name>"`` (e.g. ``"write_bytes:_TREE.json"``,
``"rename_dir:<destination name>"``)::

    backend = InstrumentedBackend(ckpt.get_backend(root))
    backend.fail_on["write_bytes:_TREE.json"] = OSError("disk full")
    backend.fail_after["rename_dir"] = OSError("timeout")  # renamed, then reports failure
    gate = backend.gate("rename_dir")        # rename_dir waits until gate.set()
    backend.fail_call(7, after=True)         # the 7th call takes effect, then fails

``fail_on`` models a call that fails before it takes effect; ``fail_after`` one that takes
effect but reports failure (a lost acknowledgement: a timeout after the server applied it).
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from upath import UPath

from ckpt.backend import Backend, Entry

__all__ = ["InstrumentedBackend"]


class InstrumentedBackend(Backend):
    """Delegates to ``inner``; every primitive call first runs :meth:`hook`."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.options)
        self.inner = inner
        self.scheme = inner.scheme
        self.package = inner.package
        self.capabilities = inner.capabilities
        self.default_strategy = inner.default_strategy
        self.names_decide_commit = inner.names_decide_commit
        #: ``(op, name)`` of every call, in order.
        self.log: list[tuple[str, str]] = []
        #: Raise this error when the key's call is made.
        self.fail_on: dict[str, BaseException] = {}
        #: Run the key's call, then raise this error (it took effect; the caller is told not).
        self.fail_after: dict[str, BaseException] = {}
        #: Number of primitive calls made so far (every call, hooks included).
        self.call_count = 0
        self._fail_call: tuple[int, bool] | None = None
        self._fail_after_call: tuple[str, str] | None = None
        #: ``op:name`` of the call :meth:`fail_call` failed, once it has.
        self.injected = ""
        #: Await ``callable(path)`` before the key's next call (once).
        self.before: dict[str, Callable[[UPath], Awaitable[None]]] = {}
        self.gates: dict[str, threading.Event] = {}
        #: Set when a gated key's call has started (and is waiting at the gate).
        self.entered: dict[str, threading.Event] = {}

    def gate(self, key: str) -> threading.Event:
        """Hold calls of ``key`` until the returned event is set."""
        self.entered[key] = threading.Event()
        self.gates[key] = threading.Event()
        return self.gates[key]

    def fail_call(self, k: int, *, after: bool = False) -> None:
        """Fail the ``k``-th primitive call from now (1-based), once, with ``OSError(EIO)``:
        before it takes effect, or (``after``) once it has."""
        self.call_count = 0
        self.injected = ""
        self._fail_call = (k, after)
        self._fail_after_call = None

    def _injected(self, op: str, path: UPath) -> OSError:
        self.injected = f"{op}:{path.name}"
        self._fail_call = None
        return OSError(errno.EIO, f"injected I/O error ({self.injected})", str(path))

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    async def hook(self, op: str, path: UPath) -> None:
        self.log.append((op, path.name))
        for key in (f"{op}:{path.name}", op):
            if key in self.entered:
                self.entered[key].set()
            gate = self.gates.get(key)
            while gate is not None and not gate.is_set():
                await asyncio.sleep(0.005)
            if key in self.before:
                await self.before.pop(key)(path)
            if key in self.fail_on:
                raise self.fail_on[key]
        self.call_count += 1
        if self._fail_call == (self.call_count, False):
            raise self._injected(op, path)
        if self._fail_call == (self.call_count, True):
            self._fail_call = None
            self._fail_after_call = (op, str(path))

    async def after(self, op: str, path: UPath) -> None:
        """Runs once the call of ``op`` on ``path`` has taken effect."""
        for key in (f"{op}:{path.name}", op):
            if key in self.fail_after:
                raise self.fail_after[key]
        if self._fail_after_call == (op, str(path)):
            self._fail_after_call = None
            raise self._injected(op, path)

    def describe(self) -> str:
        return self.inner.describe()

    def path(self, location: Any) -> UPath:
        return self.inner.path(location)

    def kvstore_spec(self, path: UPath) -> dict[str, Any]:
        return self.inner.kvstore_spec(path)

    async def exists(self, path: UPath) -> bool:
        await self.hook("exists", path)
        result = await self.inner.exists(path)
        await self.after("exists", path)
        return result

    async def is_dir(self, path: UPath) -> bool:
        await self.hook("is_dir", path)
        result = await self.inner.is_dir(path)
        await self.after("is_dir", path)
        return result

    async def is_link(self, path: UPath) -> bool:
        await self.hook("is_link", path)
        result = await self.inner.is_link(path)
        await self.after("is_link", path)
        return result

    async def mkdir(
        self, path: UPath, *, parents: bool = True, exist_ok: bool = True, mode: int | None = None
    ) -> None:
        await self.hook("mkdir", path)
        await self.inner.mkdir(path, parents=parents, exist_ok=exist_ok, mode=mode)
        await self.after("mkdir", path)

    async def list_dir(self, path: UPath) -> list[Entry]:
        await self.hook("list_dir", path)
        result = await self.inner.list_dir(path)
        await self.after("list_dir", path)
        return result

    async def read_bytes(self, path: UPath) -> bytes:
        await self.hook("read_bytes", path)
        result = await self.inner.read_bytes(path)
        await self.after("read_bytes", path)
        return result

    async def write_bytes(self, path: UPath, data: bytes) -> None:
        await self.hook("write_bytes", path)
        await self.inner.write_bytes(path, data)
        await self.after("write_bytes", path)

    async def write_buffers(self, path: UPath, buffers: Sequence[Any]) -> None:
        await self.hook("write_buffers", path)
        await self.inner.write_buffers(path, buffers)
        await self.after("write_buffers", path)

    async def create_exclusive(self, path: UPath, data: bytes) -> None:
        await self.hook("create_exclusive", path)
        await self.inner.create_exclusive(path, data)
        await self.after("create_exclusive", path)

    async def remove_file(self, path: UPath) -> None:
        await self.hook("remove_file", path)
        await self.inner.remove_file(path)
        await self.after("remove_file", path)

    async def remove_tree(self, path: UPath) -> None:
        await self.hook("remove_tree", path)
        await self.inner.remove_tree(path)
        await self.after("remove_tree", path)

    async def rename_dir(self, src: UPath, dst: UPath) -> None:
        await self.hook("rename_dir", dst)
        await self.inner.rename_dir(src, dst)
        await self.after("rename_dir", dst)

    async def exchange_dirs(self, a: UPath, b: UPath) -> None:
        await self.hook("exchange_dirs", b)
        await self.inner.exchange_dirs(a, b)
        await self.after("exchange_dirs", b)

    async def sync_tree(self, path: UPath) -> None:
        await self.hook("sync_tree", path)
        await self.inner.sync_tree(path)
        await self.after("sync_tree", path)

    async def sync_dir(self, path: UPath) -> None:
        await self.hook("sync_dir", path)
        await self.inner.sync_dir(path)
        await self.after("sync_dir", path)

    async def exists_many(self, paths: Sequence[UPath]) -> list[bool]:
        for p in paths:
            await self.hook("exists", p)
        result = await self.inner.exists_many(paths)
        await self.after("exists", p)
        return result

    async def exists_in_children(
        self, base: UPath, names: Sequence[str], filename: str
    ) -> list[bool]:
        await self.hook("exists_in_children", base)
        result = await self.inner.exists_in_children(base, names, filename)
        await self.after("exists_in_children", base)
        return result

    async def tree_size(self, path: UPath) -> int:
        await self.hook("tree_size", path)
        result = await self.inner.tree_size(path)
        await self.after("tree_size", path)
        return result

    async def file_size(self, path: UPath) -> int:
        await self.hook("file_size", path)
        result = await self.inner.file_size(path)
        await self.after("file_size", path)
        return result

    async def file_sizes(self, path: UPath) -> dict[str, int]:
        await self.hook("file_sizes", path)
        result = await self.inner.file_sizes(path)
        await self.after("file_sizes", path)
        return result

    async def modified_ns(self, path: UPath) -> int | None:
        await self.hook("modified_ns", path)
        result = await self.inner.modified_ns(path)
        await self.after("modified_ns", path)
        return result

    def copy_methods(self) -> list[str]:
        return self.inner.copy_methods()

    async def copy_tree(self, src: UPath, dst: UPath, *, method: str | None = None) -> str:
        await self.hook("copy_tree", dst)
        result = await self.inner.copy_tree(src, dst, method=method)
        await self.after("copy_tree", dst)
        return result

    async def apply_dir_mode(self, path: UPath, mode: int) -> None:
        await self.hook("apply_dir_mode", path)
        await self.inner.apply_dir_mode(path, mode)
        await self.after("apply_dir_mode", path)
