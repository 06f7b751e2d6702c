"""A backend wrapper that passes every storage primitive through test hooks.

Wrap any backend to make chosen calls fail, hold until released, or run code first, and to
log every call: the base for fault-injection tests. Keys are ``"op"`` or
``"op:<file or directory name>"`` (e.g. ``"write_bytes:_TREE.json"``,
``"rename_dir:<destination name>"``)::

    backend = InstrumentedBackend(ckpt.get_backend(root))
    backend.fail_on["write_bytes:_TREE.json"] = OSError("disk full")
    gate = backend.gate("rename_dir")        # rename_dir waits until gate.set()
"""

from __future__ import annotations

import asyncio
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

    def describe(self) -> str:
        return self.inner.describe()

    def path(self, location: Any) -> UPath:
        return self.inner.path(location)

    def kvstore_spec(self, path: UPath) -> dict[str, Any]:
        return self.inner.kvstore_spec(path)

    async def exists(self, path: UPath) -> bool:
        await self.hook("exists", path)
        return await self.inner.exists(path)

    async def is_dir(self, path: UPath) -> bool:
        await self.hook("is_dir", path)
        return await self.inner.is_dir(path)

    async def is_link(self, path: UPath) -> bool:
        await self.hook("is_link", path)
        return await self.inner.is_link(path)

    async def mkdir(
        self, path: UPath, *, parents: bool = True, exist_ok: bool = True, mode: int | None = None
    ) -> None:
        await self.hook("mkdir", path)
        await self.inner.mkdir(path, parents=parents, exist_ok=exist_ok, mode=mode)

    async def list_dir(self, path: UPath) -> list[Entry]:
        await self.hook("list_dir", path)
        return await self.inner.list_dir(path)

    async def read_bytes(self, path: UPath) -> bytes:
        await self.hook("read_bytes", path)
        return await self.inner.read_bytes(path)

    async def write_bytes(self, path: UPath, data: bytes) -> None:
        await self.hook("write_bytes", path)
        await self.inner.write_bytes(path, data)

    async def create_exclusive(self, path: UPath, data: bytes) -> None:
        await self.hook("create_exclusive", path)
        await self.inner.create_exclusive(path, data)

    async def remove_file(self, path: UPath) -> None:
        await self.hook("remove_file", path)
        await self.inner.remove_file(path)

    async def remove_tree(self, path: UPath) -> None:
        await self.hook("remove_tree", path)
        await self.inner.remove_tree(path)

    async def rename_dir(self, src: UPath, dst: UPath) -> None:
        await self.hook("rename_dir", dst)
        await self.inner.rename_dir(src, dst)

    async def exchange_dirs(self, a: UPath, b: UPath) -> None:
        await self.hook("exchange_dirs", b)
        await self.inner.exchange_dirs(a, b)

    async def sync_tree(self, path: UPath) -> None:
        await self.hook("sync_tree", path)
        await self.inner.sync_tree(path)

    async def sync_dir(self, path: UPath) -> None:
        await self.hook("sync_dir", path)
        await self.inner.sync_dir(path)

    async def exists_many(self, paths: Sequence[UPath]) -> list[bool]:
        for p in paths:
            await self.hook("exists", p)
        return await self.inner.exists_many(paths)

    async def exists_in_children(
        self, base: UPath, names: Sequence[str], filename: str
    ) -> list[bool]:
        await self.hook("exists_in_children", base)
        return await self.inner.exists_in_children(base, names, filename)

    async def tree_size(self, path: UPath) -> int:
        await self.hook("tree_size", path)
        return await self.inner.tree_size(path)

    async def file_size(self, path: UPath) -> int:
        await self.hook("file_size", path)
        return await self.inner.file_size(path)

    async def file_sizes(self, path: UPath) -> dict[str, int]:
        await self.hook("file_sizes", path)
        return await self.inner.file_sizes(path)

    async def modified_ns(self, path: UPath) -> int | None:
        await self.hook("modified_ns", path)
        return await self.inner.modified_ns(path)

    def copy_methods(self) -> list[str]:
        return self.inner.copy_methods()

    async def copy_tree(self, src: UPath, dst: UPath, *, method: str | None = None) -> str:
        await self.hook("copy_tree", dst)
        return await self.inner.copy_tree(src, dst, method=method)

    async def apply_dir_mode(self, path: UPath, mode: int) -> None:
        await self.hook("apply_dir_mode", path)
        await self.inner.apply_dir_mode(path, mode)
