"""Reading a saved tree: the tree document, the integrity checks, every array (zarr3 through
tensorstore or the local fast path, packed leaves, per-shard reads for multi-process
targets), and the rebuilt structure."""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from upath import UPath

from ckpt import tree_format
from ckpt.backend import Backend
from ckpt.direct_read import _aligned_empty, _local_root, _pread_exact, _read_direct
from ckpt.manifest import (
    Problem,
    checksum_problem,
    crc32c,
)
from ckpt.placement import (
    _check_jax_precision,
    _check_target,
    _per_shard,
    _target_sharding,
    _to_output,
)
from ckpt.tree_format import (
    _ALIGN,
    _ARRAY_KINDS,
    _DTYPES,
    ARRAYS_DIR,
    TREE_FILE,
    _array_spec,
    _chunk_key,
    _display,
    _is_pack_file,
    _leaf_nbytes,
    _logical_dtype,
    _parse_tree_document,
    _scalar_value,
    _subpath,
    _zarr_json,
)
from ckpt.tree_integrity import _array_dir_of, _check_against_manifest, _Integrity

__all__ = ["read"]


#: tensorstore's error for a missing chunk under ``fill_missing_data_reads: false``
#: (``chunk {3, 0} stored at local file "..." is missing``; the wording of the location
#: depends on the kvstore).
_MISSING_CHUNK = re.compile(r"chunk \{([0-9, ]*)\} stored at .* is missing")


async def _open_array(
    backend: Backend,
    directory: UPath,
    meta: dict[str, Any],
    context: ts.Context,
    integrity: _Integrity | None,
) -> ts.TensorStore:
    """Open the zarr3 array of leaf ``meta`` for reading, checked against ``meta``.

    In a checkpoint with a manifest every chunk is stored (also one equal to the fill
    value), so a missing chunk is an error, never zeros. The manifest also records the
    size and CRC32C of the array's ``zarr.json``: if the metadata rebuilt from ``meta``
    (dtype, shape, chunks) serializes to exactly those bytes, the array is opened with it
    and ``zarr.json`` is not read (its presence and size were checked by the listing of
    :meth:`_Integrity.check_sizes`); otherwise (older checkpoints, another tensorstore's
    JSON, damage) ``zarr.json`` is read and checked against ``meta`` as before."""
    where = _display(meta["keypath"])
    dtype = _DTYPES[meta["dtype"]]
    spec = _array_spec(backend, directory, meta["path"])
    if integrity is not None:
        spec["fill_missing_data_reads"] = False
    record = (
        integrity.manifest.files.get(f"{meta['path']}/zarr.json") if integrity is not None else None
    )
    chunks = meta.get("chunks")
    if (
        tree_format.ASSUME_RECORDED_METADATA
        and record is not None
        and isinstance(chunks, list)
        and len(chunks) == len(meta["shape"])
        and all(type(c) is int and c > 0 for c in chunks)
    ):
        try:
            store = await ts.open(
                spec,
                open=True,
                assume_metadata=True,  # no I/O
                dtype=ts.dtype(dtype),
                shape=list(meta["shape"]),
                chunk_layout=ts.ChunkLayout(chunk_shape=chunks),
                context=context,
            )
        except ValueError:
            pass  # not metadata write() would have made: read zarr.json below
        else:
            expected = _zarr_json(store)
            if len(expected) == record.size and crc32c(expected) == record.crc32c:
                return store
    try:
        store = await ts.open(spec, open=True, context=context)
    except ValueError as e:
        raise ValueError(
            f"Leaf {where!r}: cannot open array {directory / meta['path']}: {e}"
        ) from e
    if store.dtype.numpy_dtype != dtype or list(store.shape) != meta["shape"]:
        raise ValueError(
            f"Leaf {where!r}: array {directory / meta['path']} holds "
            f"{store.dtype.numpy_dtype}{tuple(store.shape)}, metadata says "
            f"{meta['dtype']}{tuple(meta['shape'])}."
        )
    return store


async def _read_checked(read: Any, meta: dict[str, Any], integrity: _Integrity | None) -> Any:
    """Await the tensorstore ``read`` of leaf ``meta``'s array; a chunk found missing
    (deleted after the listing) raises :class:`CorruptCheckpointError`."""
    try:
        return await read
    except ValueError as e:
        found = _MISSING_CHUNK.search(str(e)) if integrity is not None else None
        if found is None or integrity is None:
            raise
        index = tuple(int(i) for i in found.group(1).replace(",", " ").split())
        rel = f"{meta['path']}/{_chunk_key(index)}"
        raise integrity.fail([Problem(rel, "missing", "missing")]) from None


async def _verify_chunks(meta: dict[str, Any], integrity: _Integrity | None) -> None:
    """With ``verify_checksums``, check the CRC32C of the array's chunk files (a separate
    read pass: tensorstore does not hand out the files' bytes)."""
    if integrity is not None and integrity.verify_checksums:
        await integrity.verify_files(
            [r for r in integrity.files_of.get(meta["path"], []) if not r.endswith("zarr.json")]
        )


async def _read_array(
    backend: Backend,
    directory: UPath,
    meta: dict[str, Any],
    context: ts.Context,
    pool: ThreadPoolExecutor | None,
    integrity: _Integrity | None,
    *,
    aligned: bool = True,
) -> np.ndarray:
    """The array of leaf ``meta`` in host memory.

    On local disk, chunk files stored as :func:`write` stores them are read straight into
    the output (:func:`_read_direct`). Elsewhere tensorstore reads the chunks with its own
    ``read``; with ``aligned`` the result is copied into a fresh :data:`_ALIGN`-aligned
    array if it is not aligned already (a jax CPU array can alias only such a buffer)."""
    dtype = _DTYPES[meta["dtype"]]
    spec = _array_spec(backend, directory, meta["path"])
    root = _local_root(spec)
    if pool is not None and root is not None and math.prod(meta["shape"]):
        direct = await _read_direct(root, meta, pool, integrity)
        if direct is not None:
            return direct
    await _verify_chunks(meta, integrity)
    store = await _open_array(backend, directory, meta, context, integrity)
    if not math.prod(meta["shape"]):
        return _aligned_empty(tuple(meta["shape"]), dtype)
    # tensorstore's own read fetches the chunks concurrently and hands out the decoded
    # chunk of a single-chunk array as it is (a copy into a caller's array through
    # ``ts.array(out).write(store)`` was up to 2x slower from object stores).
    array = np.asarray(await _read_checked(store.read(), meta, integrity))
    if aligned and (array.ctypes.data % _ALIGN or not array.flags.c_contiguous):
        out = _aligned_empty(tuple(meta["shape"]), dtype)
        out[...] = array  # a jax CPU array aliases only 64-byte aligned buffers
        return out
    return array if array.flags.writeable else array.copy()


class _PackReader:
    """Reads packed leaves: on local disk each leaf straight from its pack file into its
    output (``os.preadv``); elsewhere each pack file once (one GET), shared by its leaves
    and dropped when the last one is read. At most :data:`PACK_WRITE_CONCURRENCY` packs
    are held at once, so a restore needs the memory of its outputs plus a few packs,
    whatever the size of the tree. With ``verify_checksums`` every pack's CRC32C is
    checked before any of its leaves is returned."""

    def __init__(
        self,
        backend: Backend,
        directory: UPath,
        metas: list[dict[str, Any]],
        pool: ThreadPoolExecutor | None,
        integrity: _Integrity | None,
    ) -> None:
        self.backend = backend
        self.directory = directory
        self.pool = pool
        self.integrity = integrity
        self.local = (
            _local_root({"kvstore": backend.kvstore_spec(directory)})
            if (pool is not None)
            else None
        )
        self.remaining: dict[str, int] = {}
        for meta in metas:
            if "offset" in meta:
                self.remaining[meta["path"]] = self.remaining.get(meta["path"], 0) + 1
        self.loaded: dict[str, asyncio.Future[bytes | None]] = {}
        self.held = asyncio.Semaphore(tree_format.PACK_WRITE_CONCURRENCY)
        self.holding: set[str] = set()

    async def _load(self, rel: str) -> bytes | None:
        """The pack's bytes (None on local disk: leaves are read in place), checked."""
        checks = self.integrity is not None and self.integrity.verify_checksums
        if self.local is not None:
            if checks and self.integrity is not None:
                await self.integrity.verify_files([rel])
            return None
        await self.held.acquire()  # released when the pack's last leaf is read
        self.holding.add(rel)
        raw = await self.backend.read_bytes(_subpath(self.directory, rel))
        if checks and self.integrity is not None:
            record = self.integrity.manifest.files.get(rel)
            problem = (
                checksum_problem(rel, record, raw)
                if record is not None
                else Problem(rel, "missing", "not recorded in the manifest")
            )
            if problem is not None:
                raise self.integrity.fail([problem])
        return raw

    async def read(self, meta: dict[str, Any]) -> np.ndarray:
        rel, offset = meta["path"], meta["offset"]
        out = _aligned_empty(tuple(meta["shape"]), _DTYPES[meta["dtype"]])
        target = out.reshape(-1).view(np.uint8)
        loading = self.loaded.get(rel)
        if loading is None:
            loading = self.loaded[rel] = asyncio.ensure_future(self._load(rel))
        try:
            raw = await loading
            if target.size == 0:
                return out
            where = f"leaf {_display(meta['keypath'])!r}"
            if raw is None:
                assert self.local is not None and self.pool is not None
                path = os.path.join(self.local, *rel.split("/"))
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(self.pool, _pread_exact, path, target, offset)
                except ValueError as exc:
                    raise ValueError(f"{where}: pack file {exc}") from None
            else:
                if offset + target.size > len(raw):
                    raise ValueError(
                        f"{where}: pack file {self.directory / rel} holds {len(raw)} bytes, "
                        f"the leaf ends at byte {offset + target.size}"
                    )
                target[:] = np.frombuffer(raw, np.uint8, count=target.size, offset=offset)
            return out
        finally:
            self.remaining[rel] -= 1
            if self.remaining[rel] == 0:
                self.loaded.pop(rel, None)  # the last leaf of this pack: free its bytes
                if rel in self.holding:
                    self.holding.discard(rel)
                    self.held.release()


async def _read_sharded(
    backend: Backend,
    directory: UPath,
    meta: dict[str, Any],
    sharding: Any,
    context: ts.Context,
    integrity: _Integrity | None,
) -> jax.Array:
    """The array of leaf ``meta`` as a global jax array placed by ``sharding``, this process
    reading only the regions of its addressable devices (each distinct region once)."""
    shape = tuple(meta["shape"])
    await _verify_chunks(meta, integrity)
    store = await _open_array(backend, directory, meta, context, integrity)
    indices = sharding.addressable_devices_indices_map(shape)
    regions: dict[tuple[tuple[int, int], ...], Any] = {}
    for index in indices.values():
        key = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))
        if key not in regions:
            regions[key] = store[index].read()
    keys = list(regions)
    values = await asyncio.gather(*(_read_checked(regions[k], meta, integrity) for k in keys))
    found = dict(zip(keys, values, strict=True))
    logical = _logical_dtype(meta) if "logical_dtype" in meta else None
    arrays = []
    for device, index in indices.items():
        key = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))
        region = np.asarray(found[key])
        if logical is not None:
            region = region.view(logical)
        arrays.append(jax.device_put(region, device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


async def read(
    backend: Backend,
    directory: UPath,
    target: Any = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    verify_checksums: bool = False,
    checkpoint: str | None = None,
    jax_enable_x64: bool | None = None,
) -> Any:
    """Read the tree saved under ``directory``.

    Arrays come back as numpy arrays (numpy scalars for saved numpy scalars), or as
    jax arrays where the matching ``target`` leaf is a ``jax.Array`` (placed with its
    sharding) or a ``jax.ShapeDtypeStruct`` (placed with its ``sharding`` if set, else
    on the default device). Tuples come back as tuples, lists as lists. All arrays
    are read concurrently; ``progress(advance_bytes, total_bytes)`` is called as they
    finish.

    If the tree was saved with an integrity manifest (see :mod:`ckpt.manifest`), every
    file it records must be present with its recorded size before any data is returned
    (one listing of ``directory``); with ``verify_checksums`` the CRC32C of every file is
    checked as well (inline for direct local reads, else in a separate read pass).
    ``checkpoint`` names the checkpoint in errors (default: ``directory``).
    ``jax_enable_x64`` is jax's 64-bit mode as the caller sees it (``jax.enable_x64`` is
    thread-local, and this coroutine may run on another thread; None: read it here).

    Raises:
        ckpt.CorruptCheckpointError: a recorded file is missing, has another size, or
            (with ``verify_checksums``) another checksum; it names the checkpoint, the
            leaf and the file.
        ValueError: ``target``'s structure, or a leaf's shape, dtype or kind, differs
            from the checkpoint (the message names the leaf path, e.g.
            ``params/dense/kernel`` or ``layers[2]``); a jax target asks for a 64-bit
            dtype (float64, int64, uint64, complex128) while jax's 64-bit mode is off, so
            jax would silently narrow the values; or the metadata is malformed.
    """
    tree_raw = await backend.read_bytes(directory / TREE_FILE)
    try:
        doc = _parse_tree_document(tree_raw, directory)
    except ValueError:
        # An unreadable tree document cannot say whether a manifest exists: look.
        await _check_against_manifest(backend, directory, tree_raw, checkpoint)
        raise
    leaves: list[dict[str, Any]] = doc["leaves"]
    integrity = None
    if doc.get("manifest") is not None:
        integrity = await _Integrity.load(
            backend,
            directory,
            doc,
            verify_checksums=verify_checksums,
            checkpoint=checkpoint or str(directory),
        )
        await integrity.check_sizes(tree_raw)
        if verify_checksums:  # pack files are checked as they are read
            await integrity.verify_files(
                [
                    r
                    for r in integrity.manifest.files
                    if r != TREE_FILE
                    and not _is_pack_file(r)
                    and (_array_dir_of(r) is None or r.endswith("/zarr.json"))
                ]
            )
    plan: dict[int, Any] = {}
    x64 = bool(jax.config.read("jax_enable_x64")) if jax_enable_x64 is None else jax_enable_x64
    if target is not None:
        _check_target(doc["structure"], target, leaves, "", plan)
        _check_jax_precision(plan, leaves, x64)
    context = ts.Context({"file_io_concurrency": {"limit": tree_format.FILE_IO_CONCURRENCY}})
    array_leaves = [i for i, m in enumerate(leaves) if m["kind"] in _ARRAY_KINDS]
    pool = None
    if (
        tree_format.DIRECT_LOCAL_READS
        and array_leaves
        and _local_root(_array_spec(backend, directory, ARRAYS_DIR))
    ):
        pool = ThreadPoolExecutor(tree_format.FILE_IO_CONCURRENCY, thread_name_prefix="ckpt-read")

    def place(array: np.ndarray, i: int) -> Any:
        with jax.enable_x64(x64):
            return _to_output(array, leaves[i], plan[i])

    total = sum(_leaf_nbytes(leaves[i]) for i in array_leaves)
    if progress is not None:
        progress(0, total)
    packs = _PackReader(backend, directory, [leaves[i] for i in array_leaves], pool, integrity)

    async def read_leaf(i: int) -> Any:
        sharding = _target_sharding(plan.get(i))
        if "offset" in leaves[i]:
            array = await packs.read(leaves[i])
            if progress is not None:
                progress(_leaf_nbytes(leaves[i]), total)
            if isinstance(plan.get(i), (jax.Array, jax.ShapeDtypeStruct)):
                return await asyncio.to_thread(place, array, i)
            return _to_output(array, leaves[i], plan.get(i))
        if sharding is not None and leaves[i]["kind"] != "prng_key" and _per_shard(sharding):
            # Each process reads only the regions of its own devices' shards (tensorstore
            # reads just the chunks that overlap them).
            out = await _read_sharded(backend, directory, leaves[i], sharding, context, integrity)
            if progress is not None:
                progress(_leaf_nbytes(leaves[i]), total)
            return out
        # To numpy: tensorstore's own read (no second copy); to jax: an aligned buffer.
        to_jax = isinstance(plan.get(i), (jax.Array, jax.ShapeDtypeStruct))
        array = await _read_array(
            backend, directory, leaves[i], context, pool, integrity, aligned=to_jax
        )
        if progress is not None:
            progress(_leaf_nbytes(leaves[i]), total)
        if isinstance(plan.get(i), (jax.Array, jax.ShapeDtypeStruct)):
            # Place on device while the other arrays are still being read.
            return await asyncio.to_thread(place, array, i)
        return _to_output(array, leaves[i], plan.get(i))

    tasks = [asyncio.ensure_future(read_leaf(i)) for i in array_leaves]
    try:
        outputs = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    values: dict[int, Any] = dict(zip(array_leaves, outputs, strict=True))

    return _build(doc["structure"], values, leaves)


def _build(node: dict[str, Any], values: dict[int, Any], leaves: list[dict[str, Any]]) -> Any:
    """The tree described by ``node``: arrays from ``values``, inline leaves from ``leaves``.

    Module-level (not a recursive closure, a reference cycle that would keep every restored
    array alive until the garbage collector runs, after the caller has dropped them)."""
    kind = node["type"]
    if kind == "dict":
        return {
            k: _build(c, values, leaves)
            for k, c in zip(node["keys"], node["children"], strict=True)
        }
    if kind == "ordered_dict":
        return collections.OrderedDict(
            (k, _build(c, values, leaves))
            for k, c in zip(node["keys"], node["children"], strict=True)
        )
    if kind == "namedtuple" or kind == "node":
        children = [_build(c, values, leaves) for c in node["children"]]
        rebuild = node.get("_rebuild")  # set by _check_target from the target's class
        if rebuild is not None:
            return rebuild(children)
        if kind == "node":  # without a target: a dict of the node's children
            return dict(zip(node["keys"], children, strict=True))
        return _namedtuple_class(node["class"], tuple(node["keys"]))._make(children)
    if kind == "list":
        return [_build(c, values, leaves) for c in node["children"]]
    if kind == "tuple":
        return tuple(_build(c, values, leaves) for c in node["children"])
    index = node["index"]
    return values[index] if index in values else _scalar_value(leaves[index])


@functools.cache
def _namedtuple_class(name: str, fields: tuple[str, ...]) -> Any:
    """The namedtuple class ``module:qualname`` if its module is already imported and it
    has these fields (no module is imported: a checkpoint never runs code); else a
    namedtuple of the same name and fields."""
    module, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if (
        isinstance(found, type)
        and issubclass(found, tuple)
        and getattr(found, "_fields", None) == fields
    ):
        return found
    return collections.namedtuple(qualname.rpartition(".")[2], fields)  # type: ignore[misc]
