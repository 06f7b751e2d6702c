"""The local fast path of a restore: plain zarr3 chunk files and pack files on a local disk
read with ``os.preadv`` straight into the output arrays (no intermediate buffer), with
checksums computed inline. Anything else is read through tensorstore."""

from __future__ import annotations

import asyncio
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ckpt.manifest import (
    FileRecord,
    Problem,
    crc32c,
    crc32c_extend,
)
from ckpt.tree_format import _ALIGN, _DTYPES
from ckpt.tree_integrity import _Integrity

__all__: list[str] = []  # used by ckpt.tree_read only


# -- direct reads of local chunk files ----------------------------------------------------


class _NotPlain(Exception):
    """The direct read does not apply to these files: read them with tensorstore."""


_ZARR_KEYS = frozenset(
    {
        "zarr_format",
        "node_type",
        "shape",
        "data_type",
        "chunk_grid",
        "chunk_key_encoding",
        "fill_value",
        "codecs",
        "attributes",
        "dimension_names",
    }
)
_DEFAULT_KEY_ENCODINGS = (
    {"name": "default"},
    {"name": "default", "configuration": {"separator": "/"}},
)


def _local_root(spec: dict[str, Any]) -> str | None:
    """The local directory of a zarr3 spec on the ``file`` kvstore, else None."""
    kvstore = spec.get("kvstore")
    if (
        isinstance(kvstore, dict)
        and set(kvstore) == {"driver", "path"}
        and kvstore["driver"] == "file"
        and isinstance(kvstore["path"], str)
    ):
        return kvstore["path"]
    return None


def _is_positive_zero(value: Any) -> bool:
    """A JSON number equal to +0 (the bytes of a missing chunk are zeros)."""
    if isinstance(value, bool):
        return value is False
    return isinstance(value, (int, float)) and value == 0 and math.copysign(1.0, value) > 0


def _plain_rows(root: str, meta: dict[str, Any]) -> int | None:
    """Rows (along axis 0) per chunk of the zarr3 array in the local directory ``root``
    if it is stored as :func:`write` stores it (same dtype and shape as ``meta``,
    little-endian ``bytes`` codec only, regular chunks split along axis 0 only, default
    chunk keys, a zero fill value); None otherwise (the caller uses tensorstore)."""
    try:
        with open(os.path.join(root, "zarr.json"), "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not set(doc) <= _ZARR_KEYS:
        return None
    shape: list[int] = meta["shape"]
    dtype = _DTYPES[meta["dtype"]]
    codecs = doc.get("codecs")
    little = [{"name": "bytes", "configuration": {"endian": "little"}}]
    grid = doc.get("chunk_grid")
    chunks = None
    if isinstance(grid, dict) and grid.get("name") == "regular":
        config = grid.get("configuration")
        chunks = config.get("chunk_shape") if isinstance(config, dict) else None
    fill = doc.get("fill_value")
    fill_ok = (
        all(_is_positive_zero(v) for v in fill) and len(fill) == 2
        if isinstance(fill, list) and dtype.kind == "c"
        else _is_positive_zero(fill)
    )
    if not (
        doc.get("zarr_format") == 3
        and doc.get("node_type") == "array"
        and doc.get("shape") == shape
        and doc.get("data_type") == dtype.name
        and doc.get("chunk_key_encoding") in _DEFAULT_KEY_ENCODINGS
        and (codecs == little or (dtype.itemsize == 1 and codecs == [{"name": "bytes"}]))
        and fill_ok
        and isinstance(chunks, list)
        and len(chunks) == len(shape)
        and all(type(c) is int and c > 0 for c in chunks)
        and chunks[1:] == shape[1:]
    ):
        return None
    return chunks[0] if shape else 1


class _BadChunk(Exception):
    """A chunk file is missing or does not match its manifest record."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def _read_file_into(
    path: str, buffer: np.ndarray, file_size: int, record: FileRecord | None, strict: bool
) -> None:
    """Fill the uint8 array ``buffer`` from the start of ``path``, which must hold exactly
    ``file_size`` bytes (else :class:`_NotPlain`).

    Checkpoints with a manifest (``strict``) store every chunk: a missing file raises
    :class:`_BadChunk`, and with ``record`` the CRC32C of the whole file (``buffer`` plus
    the edge chunk's padding) must match. Older checkpoints did not store chunks equal to
    the fill value (zero): for them a missing file zeroes ``buffer``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if strict:
            raise _BadChunk(path, "missing") from None
        buffer.fill(0)
        return
    try:
        size = os.fstat(fd).st_size
        if size != file_size:
            if strict:
                raise _BadChunk(path, f"has {size} bytes, expected {file_size}")
            raise _NotPlain(path)
        view = buffer.data  # a 1-d uint8 array: a flat byte view
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], done)
            if n <= 0:
                if strict:
                    raise _BadChunk(path, f"shrank to {done} bytes while being read")
                raise _NotPlain(path)  # the file shrank under us
            done += n
        if record is not None:
            crc = crc32c(buffer)
            if file_size > len(view):  # the padding of an edge chunk
                crc = crc32c_extend(crc, os.pread(fd, file_size - len(view), len(view)))
            if crc != record.crc32c:
                raise _BadChunk(
                    path, f"CRC32C {crc:08x} differs from the manifest's {record.crc32c:08x}"
                )
    finally:
        os.close(fd)


async def _read_direct(
    root: str, meta: dict[str, Any], pool: ThreadPoolExecutor, integrity: _Integrity | None
) -> np.ndarray | None:
    """The array in the local directory ``root``, read with ``os.preadv``, one chunk file
    per task on ``pool``: the kernel copies from the page cache straight into the output,
    without tensorstore's intermediate per-chunk buffers (a copy, and a freshly
    page-faulted allocation as large as the array). None if the array is not stored as
    :func:`write` stores it (the caller then reads it with tensorstore)."""
    loop = asyncio.get_running_loop()
    rows = await loop.run_in_executor(pool, _plain_rows, root, meta)
    if rows is None:
        return None
    shape: list[int] = meta["shape"]
    out = _aligned_empty(tuple(shape), _DTYPES[meta["dtype"]])
    flat = out.reshape(-1).view(np.uint8)
    row_bytes = math.prod(shape[1:]) * out.dtype.itemsize
    strict = integrity is not None
    checks = integrity is not None and integrity.verify_checksums

    def record(key: str) -> FileRecord | None:
        return integrity.chunk_record(meta["path"], key) if checks and integrity else None

    tasks = []
    if not shape:
        tasks.append(
            loop.run_in_executor(
                pool,
                _read_file_into,
                os.path.join(root, "c"),
                flat,
                flat.size,
                record("c"),
                strict,
            )
        )
    else:
        tail = ["0"] * (len(shape) - 1)
        for i, start in enumerate(range(0, shape[0], rows)):
            stop = min(start + rows, shape[0])
            path = os.path.join(root, "c", str(i), *tail)
            part = flat[start * row_bytes : stop * row_bytes]
            key = "/".join(["c", str(i), *tail])
            tasks.append(
                loop.run_in_executor(
                    pool, _read_file_into, path, part, rows * row_bytes, record(key), strict
                )
            )
    # Wait for every task: none is left writing into ``out`` after an error.
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    bad = [e for e in errors if isinstance(e, _BadChunk)]
    if bad and integrity is not None:
        raise integrity.fail(
            [
                Problem(
                    f"{meta['path']}/{os.path.relpath(e.path, root).replace(os.sep, '/')}",
                    "chunk",
                    e.problem,
                )
                for e in bad
            ]
        )
    if any(isinstance(e, _NotPlain) for e in errors):
        return None
    if errors:
        raise errors[0]
    return out


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array aligned to :data:`_ALIGN` bytes (so jax CPU can alias it)."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = (-raw.ctypes.data) % _ALIGN
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _pread_exact(path: str, buffer: np.ndarray, offset: int) -> None:
    """Fill the uint8 array ``buffer`` from ``path`` at ``offset``; ValueError if the file
    ends first."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        view = buffer.data
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"{path} ends before byte {offset + len(view)}")
            done += n
    finally:
        os.close(fd)
