"""Writing a prepared tree (see :mod:`ckpt.tree_format` for the layout): zarr3 arrays through
tensorstore, packed leaves through the backend, the tree document, and the manifest of
every file written."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from upath import UPath

from ckpt import tree_format
from ckpt.backend import Backend
from ckpt.manifest import (
    MANIFEST_FILE,
    FileRecord,
    Manifest,
    crc32c,
    crc32c_extend,
    crc32c_zeros,
)
from ckpt.tree_format import (
    _PADDING,
    PACKS_DIR,
    TREE_FILE,
    _array_spec,
    _chunk_key,
    _subpath,
    _zarr_json,
)
from ckpt.tree_snapshot import PreparedTree, _ArrayItem, tree_nbytes

__all__ = ["write"]


async def _host_data(item: _ArrayItem) -> Any:
    if isinstance(item.data, jax.Array):
        # The device-to-host copy was started by prepare(); wait for it off the loop.
        return await asyncio.to_thread(np.asarray, item.data)
    if isinstance(item.data, list) and item.partial:
        return item.data  # this process's shards of a multi-process array
    if isinstance(item.data, list):
        # Shards of a multi-device CPU array: one host array, so that each chunk's bytes
        # (and checksum) come from one place.
        full = np.empty(item.shape, item.dtype)
        for index, view in item.data:
            full[tuple(index)] = view
        return full
    return item.data


def _chunk_records(
    data: np.ndarray, chunks: tuple[int, ...], origin: tuple[int, ...] | None = None
) -> dict[str, FileRecord]:
    """Size and CRC32C of every chunk file tensorstore writes for ``data``, computed from
    ``data`` itself: a zarr3 chunk (``bytes`` codec, little-endian, no compression) holds
    the chunk's elements in C order, edge chunks padded with the fill value (zero) to the
    full chunk shape. Keys are chunk keys relative to the array directory; ``origin`` is
    the chunk index of ``data``'s first element (a shard of a larger array), default 0."""
    shape = data.shape
    if 0 in shape:
        return {}
    if sys.byteorder != "little" and data.dtype.itemsize > 1:
        data = data.astype(data.dtype.newbyteorder("<"))
    chunk_bytes = math.prod(chunks) * data.dtype.itemsize
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks, strict=True)]
    records = {}
    for index in itertools.product(*grid):
        bounds = zip(index, chunks, shape, strict=True)
        region = data[tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in bounds)]
        if region.flags.c_contiguous and region.shape[1:] == tuple(chunks[1:]):
            # The chunk's bytes are one contiguous run of ``data``, then zero padding.
            crc = crc32c(region.reshape(-1).view(np.uint8))
            crc = crc32c_zeros(crc, chunk_bytes - region.nbytes)
        else:
            padded = np.zeros(chunks, data.dtype)
            padded[tuple(slice(0, n) for n in region.shape)] = region
            crc = crc32c(padded.reshape(-1).view(np.uint8))
        key = index if origin is None else tuple(i + o for i, o in zip(index, origin, strict=True))
        records[_chunk_key(key)] = FileRecord(chunk_bytes, crc)
    return records


async def _write_array(
    backend: Backend, directory: UPath, item: _ArrayItem, context: ts.Context, primary: bool
) -> dict[str, FileRecord]:
    """Write one array: ``zarr.json`` through the backend (``primary`` only), the chunks
    (of a multi-process array: this process's shards) with tensorstore.

    Returns the manifest records of the files written (relative to ``directory``)."""
    spec = _array_spec(backend, directory, item.subpath)
    # Every chunk is stored, also one equal to the fill value, so a missing chunk file
    # is always an error, never "zeros".
    spec["store_data_equal_to_fill_value"] = True
    store = await ts.open(
        spec,
        # The metadata is computed here, not read or written by tensorstore: ckpt writes
        # zarr.json itself (one request, and its bytes are in hand for the manifest).
        open=True,
        assume_metadata=True,
        dtype=ts.dtype(item.dtype),
        shape=list(item.shape),
        # Plain chunks: with only a write chunk shape, tensorstore stores large arrays as
        # shards of 4 MB inner chunks (an index per file, no direct reads).
        chunk_layout=ts.ChunkLayout(chunk_shape=list(item.chunks)),
        context=context,
    )
    zarr_json = _zarr_json(store)
    array_dir = _subpath(directory, item.subpath)
    records: dict[str, FileRecord] = {}
    if primary:
        records[f"{item.subpath}/zarr.json"] = FileRecord(len(zarr_json), crc32c(zarr_json))
        try:
            # Created, never replaced: an existing array is refused before any chunk.
            await backend.create_exclusive(array_dir / "zarr.json", zarr_json)
        except FileExistsError:
            raise ValueError(
                f"An array already exists at {array_dir}; write a tree to a fresh directory."
            ) from None
    if 0 in item.shape or not (primary or item.partial):
        return records  # a process-local array of a multi-process save: the primary's copy
    data = await _host_data(item)
    if item.partial:
        pieces = [(tuple(index), np.asarray(view)) for index, view in data]
    else:
        pieces = [(tuple(slice(0, n) for n in item.shape), np.asarray(data))]

    def checksums() -> dict[str, FileRecord]:
        out: dict[str, FileRecord] = {}
        for index, view in pieces:
            origin = tuple((sl.start or 0) // c for sl, c in zip(index, item.chunks, strict=True))
            out.update(_chunk_records(view, item.chunks, origin))
        return out

    computing = asyncio.ensure_future(asyncio.to_thread(checksums))
    if item.partial:
        writes = [
            store[index].write(view, can_reference_source_data_indefinitely=True)
            for index, view in pieces
        ]
    else:
        writes = [store.write(data, can_reference_source_data_indefinitely=True)]
    try:
        # Shielded: cancelling a tensorstore future marks it done at once, while the write
        # may go on in tensorstore's threads, so the futures themselves are never cancelled.
        await asyncio.gather(*(asyncio.shield(w) for w in writes))
    except BaseException:
        # A sibling failed or this task was cancelled: wait until every write of this
        # array has stopped, so that nothing lands in a temporary the caller discards.
        await asyncio.shield(asyncio.to_thread(_settle, writes))
        raise
    finally:
        chunk_records = await computing
    records.update({f"{item.subpath}/{k}": r for k, r in chunk_records.items()})
    return records


def _settle(futures: list[Any]) -> None:
    """Block until every tensorstore future in ``futures`` is done (errors ignored)."""
    for future in futures:
        try:
            future.result()
        except BaseException:
            pass


def _leaf_bytes(data: Any) -> np.ndarray:
    """The stored bytes of one array (C order, little-endian) as a flat uint8 array."""
    array = np.ascontiguousarray(np.asarray(data))
    if sys.byteorder != "little" and array.dtype.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8)


async def write(
    backend: Backend,
    directory: UPath,
    prepared: PreparedTree,
    *,
    durable: bool = True,
    progress: Callable[[int, int], None] | None = None,
    store_manifest: bool = True,
    primary: bool = True,
) -> Manifest:
    """Write ``prepared`` under ``directory``: all arrays concurrently, then :data:`TREE_FILE`.

    Arrays are zarr3 arrays (uncompressed, plain chunks of up to :data:`CHUNK_BYTES`, every
    chunk stored) whose chunks are written through ``backend.kvstore_spec``; with
    ``durable`` tensorstore fsyncs what it writes on local files. Existing arrays are never
    replaced (write to a fresh directory). Making the JSON file and the directory entries
    durable is the job of the caller's commit (``backend.sync_tree``).
    ``progress(advance_bytes, total_bytes)`` is called as arrays finish.

    Returns:
        The manifest of every file written (paths relative to ``directory``), with sizes
        and CRC32C computed from the bytes in memory. With ``store_manifest`` it is also
        written to ``directory``/:data:`ckpt.manifest.MANIFEST_FILE`; a checkpointer passes
        False, adds the step metadata and has the strategy store it before the commit.

    In a multi-process save every process calls this with the same tree: each writes the
    chunks of its own shards; only the ``primary`` writes the ``zarr.json`` files and
    :data:`TREE_FILE` (the others return before it, with the records of their chunks).

    Raises:
        OSError: a write failed. Every write of this call has finished (or been cancelled)
            before the error is raised, so nothing writes into ``directory`` afterwards.
    """
    await backend.mkdir(directory, parents=True, exist_ok=True)
    context = ts.Context(
        {
            "file_io_sync": bool(durable),
            "file_io_concurrency": {"limit": tree_format.FILE_IO_CONCURRENCY},
        }
    )
    total = tree_nbytes(prepared)
    manifest = Manifest()

    async def one(item: _ArrayItem) -> None:
        records = await _write_array(backend, directory, item, context, primary)
        manifest.files.update(records)
        if progress is not None:
            progress(int(np.prod(item.shape)) * item.dtype.itemsize, total)

    packs_in_flight = asyncio.Semaphore(tree_format.PACK_WRITE_CONCURRENCY)
    # The leaves of each pack, in offset order (grouped once: not a scan per pack).
    pack_items: dict[int, list[_ArrayItem]] = {}
    for array in prepared.arrays:
        if array.pack is not None:
            pack_items.setdefault(array.pack[0], []).append(array)
    for members in pack_items.values():
        members.sort(key=lambda a: a.pack[1] if a.pack is not None else 0)

    async def pack(index: int) -> None:
        async with packs_in_flight:
            await write_pack(index)

    async def write_pack(index: int) -> None:
        items = pack_items.get(index, [])
        # The pack is the leaves' own bytes back to back with zero padding between them:
        # written from the leaves' buffers (no copy where the backend writes buffers in
        # place) and checksummed piece by piece.
        parts: list[Any] = []
        crc, end = 0, 0
        for item in items:
            assert item.pack is not None
            flat = _leaf_bytes(await _host_data(item))
            gap = item.pack[1] - end
            if gap:
                parts.append(_PADDING[:gap])
                crc = crc32c_zeros(crc, gap)
            parts.append(flat)
            crc = crc32c_extend(crc, flat)
            end = item.pack[1] + flat.size
        rel = f"{PACKS_DIR}/{index}"
        await backend.write_buffers(_subpath(directory, rel), parts)
        manifest.add_record(rel, FileRecord(end, crc))
        if progress is not None:
            progress(sum(math.prod(a.shape) * a.dtype.itemsize for a in items), total)

    if progress is not None:
        progress(0, total)
    tasks = [asyncio.ensure_future(one(a)) for a in prepared.arrays if a.pack is None]
    if primary:  # packed leaves are process-local arrays: the primary's copy is written
        tasks += [asyncio.ensure_future(pack(k)) for k in range(len(prepared.packs))]
    # Never leave a write running into a directory the caller is about to discard: when
    # one write fails the others are not cancelled (a cancelled write may still land) but
    # awaited, and the first error is raised once every write has stopped.
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise next((f for f in failures if not isinstance(f, asyncio.CancelledError)), failures[0])
    data = json.dumps(prepared.metadata(), ensure_ascii=True, allow_nan=False).encode()
    if not primary:
        return manifest
    await backend.write_bytes(directory / TREE_FILE, data)
    manifest.add(TREE_FILE, data)
    if store_manifest:
        await backend.write_bytes(directory / MANIFEST_FILE, manifest.to_bytes())
    return manifest
