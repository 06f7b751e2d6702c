"""The pytree storage format: nested dicts/lists/tuples of arrays and scalars on any backend.

One saved tree is a directory::

    <directory>/
        _TREE.json          structure, per-leaf metadata, inline scalars/strings/None
        _CKPT_MANIFEST.json size and CRC32C of every file (see ckpt.manifest)
        packed/0            small array leaves (up to PACK_MAX_LEAF_BYTES), back to back
        packed/1            (64-byte aligned) in files of about PACK_FILE_BYTES
        arrays/3/           one zarr3 array per larger array leaf (chunks by tensorstore)
        ...

Array subdirectories are named by the leaf's index in flattening order, so any dict key
(spaces, unicode, ``/``, ``..``) is safe: keys only ever appear inside the JSON file.
The JSON file is written last, through :meth:`ckpt.backend.Backend.write_bytes`.

``_TREE.json`` (format version 2; version 1, without packs, is still read)::

    {
      "format": "ckpt-tree",
      "version": 2,
      "manifest": "_CKPT_MANIFEST.json",
      "structure": {"type": "dict", "keys": ["params", "step"],
                    "children": [{"type": "dict", ...}, {"type": "leaf", "index": 1}]},
      "leaves": [
        {"keypath": "params/w", "kind": "array", "dtype": "float32", "shape": [1024, 1024],
         "path": "arrays/0", "chunks": [1024, 1024], "nbytes": 4194304, "source": "jax"},
        {"keypath": "params/b", "kind": "array", "dtype": "float32", "shape": [1024],
         "path": "packed/0", "offset": 0, "nbytes": 4096, "source": "jax"},
        {"keypath": "step", "kind": "int", "value": 10}
      ]
    }

A packed leaf (one with an ``offset``) is the C-order little-endian bytes of the array at
``offset`` in its pack file. Thousands of small leaves (biases, norms, step counters) thus
cost a few files and requests, not a zarr array (metadata file, chunk files, directories)
each; a restore reads each pack once (on local disk, each leaf straight into its output).

Leaf kinds: ``array`` (numpy or jax array), ``numpy_scalar`` (a numpy scalar such as
``np.float32(1)``, stored as a 0-d array), ``bool``, ``int``, ``float``, ``complex``,
``str`` and ``none`` (inline), and ``prng_key`` (a typed jax PRNG key array, stored as its
``uint32`` key data with ``key_impl`` and ``key_shape``). Non-finite floats are stored as
the strings ``"nan"``, ``"inf"`` and ``"-inf"``; complex numbers as ``[real, imag]``.
Narrow dtypes that zarr3 readers do not all know (``int4``, ``float8_e4m3fn``, ...) are
stored as a bit-identical ``uint8`` view: ``dtype`` is the stored dtype, ``logical_dtype``
the leaf's own.

Structure nodes: ``dict``, ``ordered_dict`` (``keys``), ``list``, ``tuple``,
``namedtuple`` (``class`` as ``module:qualname``, ``keys`` = its fields) and ``node`` (a
custom pytree node registered with jax: ``class`` and the children's ``keys``, attribute
names or indices).

Array chunks are plain (unsharded) zarr3 chunks of at most :data:`CHUNK_BYTES`, stored
uncompressed: on a local disk each chunk file holds exactly the chunk's bytes, and
:func:`read` reads such files with ``os.preadv`` straight into the output arrays (no
intermediate buffer); everything else (other stores, other layouts) is read with tensorstore.

Saving is split in two so it can run asynchronously: :func:`prepare` is the short
blocking part (validate, flatten and snapshot the tree), :func:`write` the I/O part.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from upath import UPath

from ckpt.backend import Backend
from ckpt.errors import CorruptCheckpointError
from ckpt.manifest import (
    MANIFEST_FILE,
    FileRecord,
    Manifest,
    Problem,
    checksum_problem,
    compare_sizes,
    crc32c,
    crc32c_extend,
    crc32c_zeros,
    read_manifest,
)

__all__ = [
    "ARRAYS_DIR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TREE_FILE",
    "PreparedTree",
    "prepare",
    "read",
    "tree_metadata",
    "tree_nbytes",
    "write",
]

#: Name of the JSON file that holds the structure, leaf metadata and inline leaves.
TREE_FILE = "_TREE.json"
#: Subdirectory holding one zarr3 array per array leaf (``arrays/<index>``).
ARRAYS_DIR = "arrays"
#: The ``format`` field of :data:`TREE_FILE`.
FORMAT_NAME = "ckpt-tree"
#: The ``version`` field of :data:`TREE_FILE` written by this module.
FORMAT_VERSION = 2
#: Versions of the document this ckpt reads (1: every array leaf its own zarr3 array).
READABLE_VERSIONS = (1, 2)
#: Directory of the pack files: small array leaves stored back to back in one file each
#: (format version 2), so a tree of thousands of small leaves costs a few files, not
#: thousands of arrays.
PACKS_DIR = "packed"
#: Array leaves of at most this many bytes are packed (larger ones are zarr3 arrays).
PACK_MAX_LEAF_BYTES = 1024 * 1024
#: A pack file holds up to this many bytes (one larger leaf may make it bigger).
PACK_FILE_BYTES = 64 * 1024 * 1024

#: Zarr3 chunks are at most this many bytes (split along the leading axes).
CHUNK_BYTES = 64 * 1024 * 1024
#: Concurrent file operations of one :func:`write` or :func:`read` (tensorstore's default,
#: ``max(4, cores)``, leaves local disks idle on small machines).
FILE_IO_CONCURRENCY = 16
#: Read plain local chunk files with ``os.preadv`` into the output arrays (see
#: :func:`_read_direct`); False: always read through tensorstore.
DIRECT_LOCAL_READS = hasattr(os, "preadv") and sys.byteorder == "little"

_ALIGN = 64  # bytes; what XLA's CPU client needs to alias a host buffer
_SCALAR_KINDS = ("bool", "int", "float", "complex", "str", "none")
_ARRAY_KINDS = ("array", "numpy_scalar", "prng_key")
_ROOT = "<root>"
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")

_DTYPES: dict[str, np.dtype] = {
    np.dtype(t).name: np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
        np.complex64,
        np.complex128,
        ml_dtypes.bfloat16,
    )
}

#: The narrow dtypes of ml_dtypes (and jax): sub-byte integers, float8/float6/float4. numpy
#: holds each element in one byte, so they are stored as a bit-identical ``uint8`` view
#: (``dtype: uint8`` in the leaf metadata) and :data:`TREE_FILE` records the real dtype as
#: ``logical_dtype``; the array I/O only ever sees plain dtypes.
_VIEW_DTYPES: dict[str, np.dtype] = {
    np.dtype(t).name: np.dtype(t)
    for t in (
        getattr(ml_dtypes, name)
        for name in (
            "int1",
            "int2",
            "int4",
            "uint1",
            "uint2",
            "uint4",
            "float4_e2m1fn",
            "float6_e2m3fn",
            "float6_e3m2fn",
            "float8_e3m4",
            "float8_e4m3",
            "float8_e4m3b11fnuz",
            "float8_e4m3fn",
            "float8_e4m3fnuz",
            "float8_e5m2",
            "float8_e5m2fnuz",
            "float8_e8m0fnu",
        )
        if hasattr(ml_dtypes, name)
    )
}
_VIEW_STORAGE = np.dtype(np.uint8)


# -- key paths ------------------------------------------------------------------


def _display(keypath: str) -> str:
    return keypath or _ROOT


def _join_key(prefix: str, key: str) -> str:
    """``params/dense`` + ``kernel`` -> ``params/dense/kernel`` (odd keys are quoted)."""
    if key == "" or any(c in key for c in "/[]'\"") or key != key.strip():
        key = repr(key)
    return f"{prefix}/{key}" if prefix else key


def _join_index(prefix: str, index: int) -> str:
    return f"{prefix}[{index}]"


# -- prepared trees ---------------------------------------------------------------


@dataclasses.dataclass
class _ArrayItem:
    """One array leaf waiting to be written.

    ``data`` is a host numpy array (ours: a copy, or a read-only view of an immutable
    jax CPU buffer), a list of ``(index, host view)`` shards of a multi-device CPU
    array, or a jax array copied on its (non-CPU) device whose host transfer has
    been started.
    """

    leaf: int
    subpath: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    data: Any
    #: A multi-process array: ``data`` lists only the ``(index, host data)`` shards this
    #: process writes (its addressable shards with ``replica_id == 0``), and ``chunks``
    #: tile every shard exactly, so each chunk file has exactly one writer.
    partial: bool = False
    #: ``(pack index, byte offset)`` of a packed leaf, else None.
    pack: tuple[int, int] | None = None


@dataclasses.dataclass
class PreparedTree:
    """A snapshot of a tree, made by :func:`prepare`, ready for :func:`write`.

    Holds no reference to the caller's mutable numpy arrays, nor (for non-CPU devices)
    to the caller's jax arrays, so they may be changed, donated or deleted once
    :func:`prepare` has returned.
    """

    structure: dict[str, Any]
    leaves: list[dict[str, Any]]
    arrays: list[_ArrayItem]
    #: Sizes in bytes of the pack files (see :data:`PACKS_DIR`).
    packs: list[int] = dataclasses.field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        """The JSON document that :func:`write` stores as :data:`TREE_FILE`."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            # The checkpoint's integrity manifest, written before its commit, at the top of
            # the content directory (readers of checkpoints without this key check nothing).
            "manifest": MANIFEST_FILE,
            "structure": self.structure,
            "leaves": self.leaves,
        }


def tree_nbytes(prepared: PreparedTree) -> int:
    """Total bytes of the array data in ``prepared`` (inline leaves not counted)."""
    return sum(int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize for a in prepared.arrays)


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of at most :data:`CHUNK_BYTES`, split along the leading axes."""
    chunks = [max(1, d) for d in shape]
    for axis in range(len(chunks)):
        if math.prod(chunks) * itemsize <= CHUNK_BYTES:
            break
        inner = math.prod(chunks[axis + 1 :]) * itemsize
        chunks[axis] = max(1, min(chunks[axis], CHUNK_BYTES // inner)) if inner else chunks[axis]
    return tuple(chunks)


def _check_dtype(dtype: Any, keypath: str) -> np.dtype:
    """The (native byte order) dtype to save for ``dtype``; TypeError naming the leaf if
    it cannot be saved. Narrow ml_dtypes types (:data:`_VIEW_DTYPES`) are returned as
    themselves; :func:`prepare` stores them as ``uint8`` views."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is not None and dt.byteorder not in "=|":
        dt = dt.newbyteorder("=")  # big-endian input is stored (and restored) native
    for table in (_DTYPES, _VIEW_DTYPES):
        if dt is not None and dt.name in table and table[dt.name] == dt:
            return table[dt.name]
    raise TypeError(
        f"Leaf {_display(keypath)!r}: unsupported array dtype {dtype!s}; supported: "
        f"{', '.join(sorted([*_DTYPES, *_VIEW_DTYPES]))} and jax PRNG keys. Convert the "
        "leaf to one of these (e.g. np.asarray(x, np.float32)) or leave it out of the tree."
    )


def _is_key(x: Any) -> bool:
    """A typed jax PRNG key array (``jax.random.key``), or a ShapeDtypeStruct of one."""
    dtype = getattr(x, "dtype", None)
    try:
        return dtype is not None and bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


@functools.cache
def _key_dtype(impl: str) -> Any:
    """The dtype of typed keys of the PRNG implementation named ``impl``."""
    return jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype


def _as_storage(data: Any, dtype: np.dtype) -> Any:
    """``data`` (a host array or ``(index, host array)`` shards) viewed as ``dtype``."""
    if isinstance(data, list):
        return [(index, np.asarray(view).view(dtype)) for index, view in data]
    return np.asarray(data).view(dtype)


def _is_cpu(x: jax.Array) -> bool:
    devices: set[Any] = x.sharding.device_set
    return all(d.platform == "cpu" for d in devices)


def _shard_chunks(shard_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks that tile a shard of ``shard_shape`` exactly: the shard, split along axis 0
    into the largest number of rows that divides it and fits :data:`CHUNK_BYTES`."""
    if not shard_shape or 0 in shard_shape:
        return tuple(max(1, d) for d in shard_shape)
    inner = math.prod(shard_shape[1:]) * itemsize
    rows = shard_shape[0]
    fit = max(1, CHUNK_BYTES // inner) if inner else rows
    best = max((d for d in range(1, min(rows, fit) + 1) if rows % d == 0), default=1)
    return (best, *shard_shape[1:])


def _local_shards(x: jax.Array) -> list[tuple[Any, np.ndarray]]:
    """The shards of a multi-process array this process writes: addressable, replica 0."""
    out = []
    for shard in x.addressable_shards:
        if shard.replica_id == 0:
            out.append((shard.index, np.asarray(shard.data)))
    return out


def _snapshot_jax(x: jax.Array, keypath: str, copy: bool) -> Any:
    """Cheap, donation-safe snapshot of a jax array (see :class:`_ArrayItem`)."""
    if x.is_deleted():
        raise ValueError(f"Leaf {_display(keypath)!r}: the jax array has been deleted.")
    if not x.is_fully_addressable:
        # Host copies (CPU: zero-copy views) of this process's shards only.
        return _local_shards(x)
    if _is_cpu(x):
        # A numpy view of a CPU buffer is zero-copy; it keeps the buffer alive even if
        # the caller deletes or donates the array (XLA then skips the donation).
        shards = [s for s in x.addressable_shards if s.replica_id == 0]
        if len(shards) == 1 and shards[0].data.shape == x.shape:
            return np.asarray(shards[0].data)
        return [(s.index, np.asarray(s.data)) for s in shards]
    snapshot = x.copy() if copy else x
    snapshot.copy_to_host_async()
    return snapshot


def prepare(tree: Any, *, copy: bool = True) -> PreparedTree:
    """Validate, flatten and snapshot ``tree``: the blocking part of an async save.

    numpy arrays are copied; jax arrays on CPU are kept as zero-copy host views of their
    (immutable) buffers; jax arrays on other devices are copied on device and their
    transfer to host is started. Afterwards the caller may mutate, donate or delete
    the leaves of ``tree``.

    With ``copy=False`` (for a synchronous save, where the caller waits for
    :func:`write`) numpy arrays and non-CPU jax arrays are referenced, not copied: they
    must not be changed, donated or deleted until :func:`write` returns.

    Raises:
        TypeError: a dict key is not a string or a leaf has an unsupported type or
            dtype; the message names the leaf path.
    """
    leaves: list[dict[str, Any]] = []
    arrays: list[_ArrayItem] = []

    def add_array(value: Any, keypath: str, kind: str, source: str) -> dict[str, Any]:
        logical = _check_dtype(value.dtype, keypath)
        # Narrow ml_dtypes types go to storage as a bit-identical uint8 view.
        dtype = _VIEW_STORAGE if logical.name in _VIEW_DTYPES else logical
        shape = tuple(int(d) for d in value.shape)
        index = len(leaves)
        subpath = f"{ARRAYS_DIR}/{index}"
        chunks = _chunk_shape(shape, dtype.itemsize)
        partial = isinstance(value, jax.Array) and not value.is_fully_addressable
        if partial:
            shard_shape = tuple(int(d) for d in value.sharding.shard_shape(value.shape))
            chunks = _shard_chunks(shard_shape, dtype.itemsize)
        if isinstance(value, jax.Array):
            data = _snapshot_jax(value, keypath, copy)
            if dtype != logical:
                if isinstance(data, jax.Array):  # on an accelerator: copy to host now
                    data = np.asarray(data)
                data = _as_storage(data, dtype)
        else:
            data = np.array(value, dtype=logical, copy=copy or None)
            if dtype != logical:
                data = data.view(dtype)
        arrays.append(_ArrayItem(index, subpath, shape, dtype, chunks, data, partial))
        meta = {
            "keypath": keypath,
            "kind": kind,
            "dtype": dtype.name,
            "shape": list(shape),
            "path": subpath,
            "chunks": list(chunks),
            "nbytes": int(math.prod(shape)) * dtype.itemsize,
            "source": source,
        }
        if dtype != logical:
            meta["logical_dtype"] = logical.name
        if partial:
            # How it was written (the global array; not the writers' mesh, which a restore
            # need not share).
            meta["written"] = {"processes": jax.process_count(), "shard_shape": list(shard_shape)}
        return meta

    def leaf(value: Any, keypath: str) -> dict[str, Any]:
        if isinstance(value, jax.Array) and _is_key(value):
            # A typed PRNG key: its uint32 key data, plus the implementation's name.
            if value.is_deleted():
                raise ValueError(f"Leaf {_display(keypath)!r}: the jax array has been deleted.")
            meta = add_array(jax.random.key_data(value), keypath, "prng_key", "jax")
            meta["key_impl"] = str(jax.random.key_impl(value))
            meta["key_shape"] = [int(d) for d in value.shape]
            return meta
        if isinstance(value, jax.Array):
            return add_array(value, keypath, "array", "jax")
        if isinstance(value, np.ndarray):
            return add_array(value, keypath, "array", "numpy")
        if isinstance(value, np.generic):
            return add_array(np.asarray(value), keypath, "numpy_scalar", "numpy")
        if value is None:
            return {"keypath": keypath, "kind": "none"}
        if isinstance(value, bool):
            return {"keypath": keypath, "kind": "bool", "value": value}
        if isinstance(value, int):
            return {"keypath": keypath, "kind": "int", "value": int(value)}
        if isinstance(value, float):
            return {"keypath": keypath, "kind": "float", "value": _encode_float(value)}
        if isinstance(value, complex):
            v = [_encode_float(value.real), _encode_float(value.imag)]
            return {"keypath": keypath, "kind": "complex", "value": v}
        if isinstance(value, str):
            return {"keypath": keypath, "kind": "str", "value": str(value)}
        raise TypeError(
            f"Leaf {_display(keypath)!r}: unsupported type {_type_name(type(value))}; "
            "expected a container jax treats as a pytree node (dict, OrderedDict, list, "
            "tuple, namedtuple, a registered dataclass) or a leaf: a jax or numpy array, a "
            "jax PRNG key, int, float, bool, complex, str or None. Convert it, or register "
            "its class as a pytree node (jax.tree_util.register_dataclass)."
        )

    structure = _flatten(tree, "", leaf, leaves)
    return PreparedTree(structure, leaves, arrays, _assign_packs(arrays, leaves))


def _assign_packs(arrays: list[_ArrayItem], leaves: list[dict[str, Any]]) -> list[int]:
    """Pack small array leaves (at most :data:`PACK_MAX_LEAF_BYTES`, not multi-process)
    back to back, 64-byte aligned, into files of about :data:`PACK_FILE_BYTES`; record
    each one's file (``path``) and ``offset`` in its leaf metadata. Returns the pack
    sizes."""
    sizes: list[int] = []
    offset = 0
    for item in arrays:
        nbytes = math.prod(item.shape) * item.dtype.itemsize
        if item.partial or nbytes > PACK_MAX_LEAF_BYTES:
            continue
        if not sizes or (offset and offset + nbytes > PACK_FILE_BYTES):
            sizes.append(0)
            offset = 0
        item.pack = (len(sizes) - 1, offset)
        meta = leaves[item.leaf]
        meta["path"] = f"{PACKS_DIR}/{len(sizes) - 1}"
        meta["offset"] = offset
        meta.pop("chunks", None)
        sizes[-1] = offset + nbytes
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return sizes


def _flatten(
    node: Any,
    keypath: str,
    leaf: Callable[[Any, str], dict[str, Any]],
    leaves: list[dict[str, Any]],
) -> dict[str, Any]:
    """The structure of ``node``; appends each leaf's ``leaf(value, keypath)`` to ``leaves``.

    A module-level function, not a recursive closure: a closure that calls itself is a
    reference cycle, which would keep the snapshot (copies of the caller's arrays) alive
    until the garbage collector runs, long after the save."""
    kind = type(node)
    if kind is dict or kind is collections.OrderedDict:
        keys = list(node)
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(
                    f"Leaf {_display(_join_key(keypath, repr(key)))!r}: dict keys must "
                    f"be str, got {type(key).__qualname__} {key!r}."
                )
        children = [_flatten(node[k], _join_key(keypath, k), leaf, leaves) for k in keys]
        name = "dict" if kind is dict else "ordered_dict"
        return {"type": name, "keys": keys, "children": children}
    if kind is list or kind is tuple:
        children = [_flatten(v, _join_index(keypath, i), leaf, leaves) for i, v in enumerate(node)]
        return {"type": "list" if kind is list else "tuple", "children": children}
    if isinstance(node, tuple) and isinstance(getattr(kind, "_fields", None), tuple):
        fields = [str(f) for f in kind._fields]
        children = [
            _flatten(v, _join_key(keypath, f), leaf, leaves)
            for f, v in zip(fields, node, strict=True)
        ]
        return {
            "type": "namedtuple",
            "class": _class_name(kind),
            "keys": fields,
            "children": children,
        }
    registered = _registered_children(node, keypath)
    if registered is not None:
        keys, values = registered
        children = [
            _flatten(v, _join_node_key(keypath, k), leaf, leaves)
            for k, v in zip(keys, values, strict=True)
        ]
        return {"type": "node", "class": _class_name(kind), "keys": keys, "children": children}
    leaves.append(leaf(node, keypath))
    return {"type": "leaf", "index": len(leaves) - 1}


def _class_name(cls: type) -> str:
    """``module:qualname`` of a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _type_name(cls: type) -> str:
    """A class's name for messages: ``bytes``, ``mymodule:MyClass``."""
    return cls.__qualname__ if cls.__module__ == "builtins" else _class_name(cls)


def _join_node_key(prefix: str, key: str | int) -> str:
    return _join_index(prefix, key) if isinstance(key, int) else _join_key(prefix, key)


_LEAF_TYPES = (jax.Array, np.ndarray, np.generic, bool, int, float, complex, str, type(None))


def _registered_children(node: Any, keypath: str) -> tuple[list[str | int], list[Any]] | None:
    """Keys and children of a custom pytree node (registered with jax: a flax/equinox
    style dataclass, a defaultdict, ...); None if jax treats ``node`` as a leaf."""
    if isinstance(node, _LEAF_TYPES):
        return None
    flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(flat) == 1 and flat[0][0] == ():  # jax flattens it to itself: a leaf
        return None
    keys: list[str | int] = []
    for path, _ in flat:
        entry = path[0] if len(path) == 1 else None
        if isinstance(entry, jax.tree_util.GetAttrKey):
            keys.append(entry.name)
        elif isinstance(entry, jax.tree_util.DictKey) and isinstance(entry.key, str):
            keys.append(entry.key)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            keys.append(entry.idx)
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            keys.append(entry.key)
        else:
            raise TypeError(
                f"Leaf {_display(keypath)!r}: the pytree node {_class_name(type(node))} has a "
                f"child with key {entry!r}, which ckpt cannot name; register it with string "
                "attribute names (jax.tree_util.register_dataclass) or convert it to a dict."
            )
    if len(set(keys)) != len(keys):
        raise TypeError(
            f"Leaf {_display(keypath)!r}: the pytree node {_class_name(type(node))} has "
            f"repeated child keys {keys}; convert it to a dict."
        )
    return keys, [v for _, v in flat]


def _encode_float(x: float) -> float | str:
    if math.isfinite(x):
        return float(x)
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _decode_float(x: Any) -> float:
    if isinstance(x, str):
        if x not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float {x!r}")
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"bad float {x!r}")
    return float(x)


# -- writing --------------------------------------------------------------------------


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


def _chunk_key(index: tuple[int, ...]) -> str:
    """zarr3's default chunk key (``c/0/1``; ``c`` for a 0-d array)."""
    return "/".join(("c", *map(str, index)))


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


def _array_spec(backend: Backend, directory: UPath, subpath: str) -> dict[str, Any]:
    return {"driver": "zarr3", "kvstore": backend.kvstore_spec(_subpath(directory, subpath))}


def _zarr_json(store: ts.TensorStore) -> bytes:
    """The ``zarr.json`` that :func:`write` stores for ``store`` (its metadata as JSON)."""
    return json.dumps(store.spec().to_json()["metadata"]).encode()


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
            origin = tuple(
                (sl.start or 0) // c for sl, c in zip(index, item.chunks, strict=True)
            )
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
        await asyncio.gather(*writes)
    except BaseException:
        # tensorstore goes on writing in its own threads when the awaiting task is
        # cancelled or a sibling fails: wait until it has stopped, so that nothing lands
        # in a temporary the caller is about to discard.
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


def _subpath(directory: UPath, subpath: str) -> UPath:
    path = directory
    for part in subpath.split("/"):
        path = path / part
    return path


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
        {"file_io_sync": bool(durable), "file_io_concurrency": {"limit": FILE_IO_CONCURRENCY}}
    )
    total = tree_nbytes(prepared)
    manifest = Manifest()

    async def one(item: _ArrayItem) -> None:
        records = await _write_array(backend, directory, item, context, primary)
        manifest.files.update(records)
        if progress is not None:
            progress(int(np.prod(item.shape)) * item.dtype.itemsize, total)

    async def pack(index: int) -> None:
        items = [a for a in prepared.arrays if a.pack is not None and a.pack[0] == index]
        buffer = np.zeros(prepared.packs[index], np.uint8)  # zero padding between leaves
        for item in items:
            assert item.pack is not None
            flat = _leaf_bytes(await _host_data(item))
            buffer[item.pack[1] : item.pack[1] + flat.size] = flat
        rel = f"{PACKS_DIR}/{index}"
        await backend.write_bytes(_subpath(directory, rel), buffer.tobytes())
        manifest.add(rel, buffer)
        if progress is not None:
            progress(sum(math.prod(a.shape) * a.dtype.itemsize for a in items), total)

    if progress is not None:
        progress(0, total)
    tasks = [asyncio.ensure_future(one(a)) for a in prepared.arrays if a.pack is None]
    if primary:  # packed leaves are process-local arrays: the primary's copy is written
        tasks += [asyncio.ensure_future(pack(k)) for k in range(len(prepared.packs))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # Never leave a write running into a directory the caller is about to discard.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    data = json.dumps(prepared.metadata(), ensure_ascii=True, allow_nan=False).encode()
    if not primary:
        return manifest
    await backend.write_bytes(directory / TREE_FILE, data)
    manifest.add(TREE_FILE, data)
    if store_manifest:
        await backend.write_bytes(directory / MANIFEST_FILE, manifest.to_bytes())
    return manifest


# -- reading ---------------------------------------------------------------------------


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


#: Deepest structure (nested dicts, lists, tuples) a tree document may describe. Deeper
#: trees cannot be saved either (flattening them exceeds Python's recursion limit).
MAX_TREE_DEPTH = 512
#: Largest :data:`TREE_FILE` read (about 4 million leaves); a larger file is refused
#: before it is parsed.
MAX_TREE_BYTES = 1 << 30


def _validate_document(doc: Any) -> dict[str, Any]:
    """Check the whole JSON document; raise ValueError (message without the file name)."""
    _require(isinstance(doc, dict), "the document is not a JSON object")
    _require(
        doc.get("format") == FORMAT_NAME,
        f"format is {doc.get('format')!r}, expected {FORMAT_NAME!r}",
    )
    version = doc.get("version")
    _require(
        version in READABLE_VERSIONS,
        f"unknown format version {version!r} (this ckpt reads versions "
        f"{', '.join(map(str, READABLE_VERSIONS))}; a newer ckpt wrote it)",
    )
    leaves = doc.get("leaves")
    _require(isinstance(leaves, list), "'leaves' is not a list")
    paths: set[str] = set()
    packed: dict[str, list[tuple[int, int, int]]] = {}
    for i, leaf in enumerate(leaves):
        _validate_leaf(i, leaf)
        if leaf["kind"] not in _ARRAY_KINDS:
            continue
        if "offset" in leaf:  # a packed leaf: a byte range of a pack file
            nbytes = math.prod(leaf["shape"]) * _DTYPES[leaf["dtype"]].itemsize
            packed.setdefault(leaf["path"], []).append((leaf["offset"], nbytes, i))
            continue
        _require(leaf["path"] not in paths, f"leaf {i}: array path {leaf['path']!r} reused")
        paths.add(leaf["path"])
    for path, ranges in packed.items():
        _require(path not in paths, f"pack file {path!r} is also an array path")
        end = 0
        for offset, nbytes, i in sorted(ranges):
            _require(offset >= end, f"leaf {i}: its bytes in {path!r} overlap another leaf's")
            end = offset + nbytes
    seen: set[int] = set()
    _validate_node(doc.get("structure"), len(leaves), seen, "")
    _require(len(seen) == len(leaves), "some leaves are not referenced by the structure")
    return doc


def _validate_leaf(i: int, leaf: Any) -> None:
    _require(isinstance(leaf, dict), f"leaf {i} is not an object")
    _require(isinstance(leaf.get("keypath"), str), f"leaf {i} has no 'keypath'")
    kind = leaf.get("kind")
    where = f"leaf {i} ({_display(leaf['keypath'])!r})"
    _require(kind in _ARRAY_KINDS + _SCALAR_KINDS, f"{where} has unknown kind {kind!r}")
    if kind in _ARRAY_KINDS:
        dtype = leaf.get("dtype")
        _require(isinstance(dtype, str) and dtype in _DTYPES, f"{where}: bad dtype {dtype!r}")
        shape = leaf.get("shape")
        _require(
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape),
            f"{where}: bad shape {shape!r}",
        )
        _require(kind != "numpy_scalar" or shape == [], f"{where}: numpy scalar with a shape")
        logical = leaf.get("logical_dtype")
        _require(
            logical is None or (logical in _VIEW_DTYPES and dtype == _VIEW_STORAGE.name),
            f"{where}: bad logical_dtype {logical!r} for dtype {dtype!r}",
        )
        if kind == "prng_key":
            impl = leaf.get("key_impl")
            key_shape = leaf.get("key_shape")
            _require(
                isinstance(impl, str) and dtype == "uint32" and logical is None,
                f"{where}: bad PRNG key metadata",
            )
            _require(
                isinstance(key_shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) for d in key_shape)
                and shape[: len(key_shape)] == key_shape
                and len(shape) == len(key_shape) + 1,
                f"{where}: bad key_shape {key_shape!r}",
            )
        path = leaf.get("path")
        # Relative, inside the checkpoint: no '..', '.', '/x', '' or hidden components.
        _require(
            isinstance(path, str) and all(_SAFE_COMPONENT.fullmatch(p) for p in path.split("/")),
            f"{where}: unsafe or missing array path {path!r} (expected a relative path "
            "inside the checkpoint, such as 'arrays/0')",
        )
        offset = leaf.get("offset")
        _require(
            offset is None or (type(offset) is int and offset >= 0 and _is_pack_file(path)),
            f"{where}: bad pack file {path!r} or offset {offset!r} (expected a file "
            f"{PACKS_DIR}/<n> and a byte offset)",
        )
        return
    value = leaf.get("value")
    try:
        if kind == "bool":
            _require(isinstance(value, bool), "not a bool")
        elif kind == "int":
            _require(isinstance(value, int) and not isinstance(value, bool), "not an int")
        elif kind == "float":
            _decode_float(value)
        elif kind == "complex":
            _require(isinstance(value, list) and len(value) == 2, "not [real, imag]")
            _decode_float(value[0])
            _decode_float(value[1])
        elif kind == "str":
            _require(isinstance(value, str), "not a str")
    except ValueError as e:
        raise ValueError(f"{where}: bad {kind} value {value!r} ({e})") from None


def _validate_node(node: Any, n_leaves: int, seen: set[int], keypath: str) -> None:
    """Check the structure below ``node`` (iteratively: no recursion, however deep the
    document) and record the leaf indices it references in ``seen``."""
    stack: list[tuple[Any, str, int]] = [(node, keypath, 0)]
    while stack:
        node, keypath, depth = stack.pop()
        where = _display(keypath)
        _require(isinstance(node, dict), f"structure node at {where!r} is not an object")
        kind = node.get("type")
        _require("_rebuild" not in node, f"structure node at {where!r} has a reserved key")
        if kind == "leaf":
            index = node.get("index")
            _require(
                isinstance(index, int) and not isinstance(index, bool) and 0 <= index < n_leaves,
                f"structure node at {where!r} has a bad leaf index {index!r}",
            )
            _require(index not in seen, f"leaf {index} is referenced twice")
            seen.add(index)
            continue
        _require(
            depth < MAX_TREE_DEPTH,
            f"structure at {where[:200]!r} is nested deeper than {MAX_TREE_DEPTH} levels",
        )
        children = node.get("children")
        _require(isinstance(children, list), f"structure node at {where!r} has no 'children'")
        if kind in ("dict", "ordered_dict", "namedtuple", "node"):
            keys = node.get("keys")
            key_types: tuple[type, ...] = (str, int) if kind == "node" else (str,)
            _require(
                isinstance(keys, list)
                and all(isinstance(k, key_types) and not isinstance(k, bool) for k in keys)
                and len(keys) == len(children)
                and len(set(keys)) == len(keys),
                f"{kind} at {where!r} has bad 'keys'",
            )
            if kind in ("namedtuple", "node"):
                cls = node.get("class")
                _require(
                    isinstance(cls, str) and cls.count(":") == 1,
                    f"{kind} at {where!r} has a bad 'class' {cls!r}",
                )
            if kind == "namedtuple":
                _require(
                    all(k.isidentifier() for k in keys) and node["class"].rpartition(".")[2],
                    f"namedtuple at {where!r} has bad field names",
                )
            items = [
                (c, _join_node_key(keypath, k)) for k, c in zip(keys, children, strict=True)
            ]
        elif kind in ("list", "tuple"):
            items = [(c, _join_index(keypath, i)) for i, c in enumerate(children)]
        else:
            raise ValueError(f"structure node at {where!r} has unknown type {kind!r}")
        # Reversed: leaves are checked (and errors reported) in document order.
        stack.extend((c, kp, depth + 1) for c, kp in reversed(items))


async def tree_metadata(backend: Backend, directory: UPath) -> dict[str, Any]:
    """The validated contents of ``directory``'s :data:`TREE_FILE` (no array reads).

    Keys: ``format``, ``version``, ``structure`` (nested ``{"type": "dict"|"list"|"tuple",
    ...}`` / ``{"type": "leaf", "index": i}`` nodes), ``leaves`` (per-leaf metadata) and,
    in checkpoints written with an integrity manifest, ``manifest`` (its file name).

    Raises:
        FileNotFoundError: there is no :data:`TREE_FILE`.
        ValueError: the file is not valid JSON or not a supported format version; the
            message names the file.
    """
    return _parse_tree_document(await backend.read_bytes(directory / TREE_FILE), directory)


def _parse_tree_document(raw: bytes, directory: UPath) -> dict[str, Any]:
    path = directory / TREE_FILE
    if len(raw) > MAX_TREE_BYTES:
        raise ValueError(
            f"Malformed tree metadata {path}: {len(raw)} bytes, more than the "
            f"{MAX_TREE_BYTES} bytes of a {TREE_FILE} ckpt reads."
        )
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"Malformed tree metadata {path}: not valid JSON ({e}).") from None
    except RecursionError:
        raise ValueError(
            f"Malformed tree metadata {path}: nested deeper than {MAX_TREE_DEPTH} levels."
        ) from None
    try:
        return _validate_document(doc)
    except ValueError as e:
        raise ValueError(f"Malformed tree metadata {path}: {e}.") from None


def _check_target(
    node: dict[str, Any], target: Any, leaves: list[dict[str, Any]], kp: str, plan: dict[int, Any]
) -> None:
    """Match ``target`` against the stored structure; record each leaf's target in ``plan``."""
    where = _display(kp)
    kind = node["type"]
    if kind == "namedtuple" or kind == "node":
        _check_node_target(node, target, leaves, kp, plan)
        return
    if kind == "dict" or kind == "ordered_dict":
        if not isinstance(target, Mapping):
            raise ValueError(
                f"Tree mismatch at {where!r}: checkpoint has a {kind}, target has "
                f"{type(target).__qualname__}."
            )
        stored, wanted = node["keys"], list(target)
        if set(stored) != set(wanted):
            missing = [k for k in wanted if k not in stored]
            extra = [k for k in stored if k not in set(wanted)]
            raise ValueError(
                f"Tree mismatch at {where!r}: dict keys differ; in target but not in "
                f"checkpoint: {missing}; in checkpoint but not in target: {extra}."
            )
        for key, child in zip(stored, node["children"], strict=True):
            _check_target(child, target[key], leaves, _join_key(kp, key), plan)
        return
    if kind in ("list", "tuple"):
        want_type = list if kind == "list" else tuple
        if type(target) is not want_type:
            raise ValueError(
                f"Tree mismatch at {where!r}: checkpoint has a {kind}, target has "
                f"{type(target).__qualname__}."
            )
        if len(target) != len(node["children"]):
            raise ValueError(
                f"Tree mismatch at {where!r}: checkpoint {kind} has "
                f"{len(node['children'])} items, target has {len(target)}."
            )
        for i, child in enumerate(node["children"]):
            _check_target(child, target[i], leaves, _join_index(kp, i), plan)
        return
    index = node["index"]
    meta = leaves[index]
    if isinstance(target, (Mapping, list, tuple)):
        raise ValueError(
            f"Tree mismatch at {where!r}: checkpoint has a leaf ({meta['kind']}), target "
            f"has a {type(target).__qualname__}."
        )
    is_array_target = isinstance(target, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic))
    if meta["kind"] == "prng_key" or (is_array_target and _is_key(target)):
        _check_key_target(meta, target, where)
        plan[index] = target
        return
    if meta["kind"] in _ARRAY_KINDS:
        if not is_array_target:
            raise ValueError(
                f"Leaf {where!r}: checkpoint has an array "
                f"({meta['dtype']}{meta['shape']}), target has {type(target).__qualname__}."
            )
        shape = [int(d) for d in target.shape]
        if shape != meta["shape"]:
            raise ValueError(
                f"Leaf {where!r}: shape mismatch: checkpoint {tuple(meta['shape'])}, target "
                f"{tuple(shape)}."
            )
        dtype = np.dtype(target.dtype)
        if dtype.name != _logical_dtype(meta).name:
            raise ValueError(
                f"Leaf {where!r}: dtype mismatch: checkpoint {_logical_dtype(meta)}, target "
                f"{dtype}."
            )
        plan[index] = target
        return
    if is_array_target:
        raise ValueError(
            f"Leaf {where!r}: checkpoint has a {meta['kind']}, target has an array "
            f"({np.dtype(target.dtype)}{tuple(target.shape)})."
        )
    target_kind = _scalar_kind(target)
    if target_kind is None:
        raise TypeError(
            f"Leaf {where!r}: unsupported target leaf type {type(target).__qualname__}."
        )
    if target_kind != meta["kind"]:
        raise ValueError(
            f"Leaf {where!r}: type mismatch: checkpoint {meta['kind']}, target {target_kind}."
        )


def _check_key_target(meta: dict[str, Any], target: Any, where: str) -> None:
    """A PRNG key leaf needs a key target (array or ShapeDtypeStruct) of the same
    implementation and shape, and a key target needs a key leaf."""
    if meta["kind"] != "prng_key":
        raise ValueError(
            f"Leaf {where!r}: checkpoint has a {meta['kind']}, target has a jax PRNG key "
            f"array ({target.dtype})."
        )
    impl = meta["key_impl"]
    if not (isinstance(target, (jax.Array, jax.ShapeDtypeStruct)) and _is_key(target)):
        raise ValueError(
            f"Leaf {where!r}: checkpoint has a jax PRNG key array ({impl}), target has "
            f"{type(target).__qualname__}; use a key array or a jax.ShapeDtypeStruct of one."
        )
    try:
        expected = _key_dtype(impl)
    except Exception as e:  # an implementation this jax does not have
        raise ValueError(f"Leaf {where!r}: unknown PRNG key implementation {impl!r}: {e}") from e
    if target.dtype != expected:
        raise ValueError(
            f"Leaf {where!r}: key mismatch: checkpoint has {impl} keys ({expected}), target "
            f"{target.dtype}."
        )
    if [int(d) for d in target.shape] != meta["key_shape"]:
        raise ValueError(
            f"Leaf {where!r}: shape mismatch: checkpoint {tuple(meta['key_shape'])}, target "
            f"{tuple(target.shape)}."
        )


def _check_node_target(
    node: dict[str, Any], target: Any, leaves: list[dict[str, Any]], kp: str, plan: dict[int, Any]
) -> None:
    """A namedtuple or registered pytree node against ``target``: same keys, and the
    target's class is recorded (in ``node``) so that :func:`_build` rebuilds it."""
    where = _display(kp)
    kind, stored = node["type"], node["keys"]
    if kind == "namedtuple":
        fields = getattr(type(target), "_fields", None)
        if not isinstance(target, tuple) or not isinstance(fields, tuple):
            raise ValueError(
                f"Tree mismatch at {where!r}: checkpoint has a namedtuple ({node['class']}), "
                f"target has {type(target).__qualname__}."
            )
        if list(fields) != stored:
            raise ValueError(
                f"Tree mismatch at {where!r}: namedtuple fields differ; checkpoint "
                f"{stored}, target {list(fields)}."
            )
        node["_rebuild"] = type(target)._make  # type: ignore[attr-defined]
        children = list(target)
    else:
        found = _registered_children(target, kp)
        # The same class (by name: a class may move between modules).
        same_class = type(target).__qualname__ == node["class"].partition(":")[2]
        if found is None or not same_class:
            raise ValueError(
                f"Tree mismatch at {where!r}: checkpoint has a pytree node of class "
                f"{node['class']}, target has {type(target).__qualname__}."
            )
        keys, children = found
        if keys != stored:
            raise ValueError(
                f"Tree mismatch at {where!r}: the children of {node['class']} differ; "
                f"checkpoint {stored}, target {keys} ({_class_name(type(target))})."
            )
        treedef = jax.tree_util.tree_structure(target, is_leaf=lambda x: x is not target)
        node["_rebuild"] = treedef.unflatten  # type: ignore[attr-defined]
    for key, child, value in zip(stored, node["children"], children, strict=True):
        _check_target(child, value, leaves, _join_node_key(kp, key), plan)


def _logical_dtype(meta: dict[str, Any]) -> np.dtype:
    """The dtype of a saved array leaf as it was given (not its storage dtype)."""
    logical = meta.get("logical_dtype")
    return _VIEW_DTYPES[logical] if logical is not None else _DTYPES[meta["dtype"]]


def _scalar_kind(x: Any) -> str | None:
    if x is None:
        return "none"
    for kind, typ in (
        ("bool", bool),
        ("int", int),
        ("float", float),
        ("complex", complex),
        ("str", str),
    ):
        if isinstance(x, typ):
            return kind
    return None


def _scalar_value(meta: dict[str, Any]) -> Any:
    kind = meta["kind"]
    if kind == "none":
        return None
    if kind == "float":
        return _decode_float(meta["value"])
    if kind == "complex":
        return complex(_decode_float(meta["value"][0]), _decode_float(meta["value"][1]))
    return meta["value"]


# -- integrity checks on read -----------------------------------------------------------


def _array_dir_of(relpath: str) -> str | None:
    """The array directory (e.g. ``arrays/3``) of a zarr file path, else None."""
    if relpath.endswith("/zarr.json"):
        return relpath[: -len("/zarr.json")]
    if relpath.endswith("/c"):
        return relpath[:-2]
    if "/c/" in relpath:
        return relpath.split("/c/", 1)[0]
    return None


class _Integrity:
    """The manifest of the checkpoint being read, and the checks made against it."""

    def __init__(
        self,
        backend: Backend,
        directory: UPath,
        manifest: Manifest,
        leaves: list[dict[str, Any]],
        *,
        verify_checksums: bool,
        checkpoint: str,
    ) -> None:
        self.backend = backend
        self.directory = directory
        self.manifest = manifest
        self.verify_checksums = verify_checksums
        self.checkpoint = checkpoint
        self.keypaths = {
            m["path"]: m["keypath"] for m in leaves if "path" in m and "offset" not in m
        }
        self.packed: dict[str, list[str]] = {}  # pack file -> keypaths of its leaves
        for m in leaves:
            if "offset" in m:
                self.packed.setdefault(m["path"], []).append(m["keypath"])
        self.files_of: dict[str, list[str]] = {}
        for rel in manifest.files:
            array_dir = _array_dir_of(rel)
            if array_dir is not None:
                self.files_of.setdefault(array_dir, []).append(rel)

    @classmethod
    async def load(
        cls,
        backend: Backend,
        directory: UPath,
        doc: dict[str, Any],
        *,
        verify_checksums: bool,
        checkpoint: str,
    ) -> _Integrity:
        name = doc["manifest"]
        if name != MANIFEST_FILE:
            raise ValueError(f"Malformed tree metadata {directory / TREE_FILE}: unknown "
                             f"manifest {name!r}.")
        path = directory / MANIFEST_FILE
        try:
            raw = await backend.read_bytes(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                checkpoint,
                [f"{path}: missing (the tree document says the save recorded a manifest)"],
                file=str(path),
            ) from None
        try:
            manifest = Manifest.from_bytes(raw, str(path))
        except ValueError as exc:
            raise CorruptCheckpointError(checkpoint, [str(exc)], file=str(path)) from None
        return cls(
            backend,
            directory,
            manifest,
            doc["leaves"],
            verify_checksums=verify_checksums,
            checkpoint=checkpoint,
        )

    def leaf_of(self, relpath: str) -> str | None:
        if relpath in self.packed:  # a pack file: the first of the leaves it holds
            return _display(self.packed[relpath][0])
        array_dir = _array_dir_of(relpath)
        keypath = self.keypaths.get(array_dir) if array_dir is not None else None
        return _display(keypath) if keypath is not None else None

    def fail(self, problems: list[Problem]) -> CorruptCheckpointError:
        first = problems[0]

        def line(p: Problem) -> str:
            held = self.packed.get(p.relpath, [])
            more = f" (holds leaves {', '.join(map(repr, map(_display, held[:3])))}" + (
                f" and {len(held) - 3} more)" if len(held) > 3 else ")"
            )
            return f"{self.directory / p.relpath}: {p.detail}" + (more if held else "")

        return CorruptCheckpointError(
            self.checkpoint,
            [line(p) for p in problems],
            leaf=self.leaf_of(first.relpath),
            file=str(self.directory / first.relpath),
        )

    async def check_sizes(self, tree_raw: bytes) -> None:
        """Every recorded file is present with its size (one listing); the tree document
        read is the one recorded. Raises :class:`CorruptCheckpointError`."""
        record = self.manifest.files.get(TREE_FILE)
        if record is None:
            raise self.fail([Problem(TREE_FILE, "missing", "not recorded in the manifest")])
        # The tree document is in memory anyway: its checksum is always checked.
        problem = checksum_problem(TREE_FILE, record, tree_raw)
        problems = [problem] if problem is not None else []
        found = await self.backend.file_sizes(self.directory)
        problems += [p for p in compare_sizes(self.manifest, found) if p.relpath != TREE_FILE]
        if problems:
            raise self.fail(problems)

    async def verify_files(self, relpaths: list[str]) -> None:
        """Read ``relpaths`` and compare size and CRC32C (a separate read pass)."""
        limit = asyncio.Semaphore(FILE_IO_CONCURRENCY)

        async def one(rel: str) -> Problem | None:
            async with limit:
                try:
                    data = await self.backend.read_bytes(self.directory / rel)
                except FileNotFoundError:
                    return Problem(rel, "missing", "missing")
                return checksum_problem(rel, self.manifest.files[rel], data)

        found = await asyncio.gather(*(one(r) for r in relpaths))
        problems = [p for p in found if p is not None]
        if problems:
            raise self.fail(problems)

    def chunk_record(self, array_dir: str, key: str) -> FileRecord | None:
        return self.manifest.files.get(f"{array_dir}/{key}")


#: Open arrays of checkpoints with a manifest from the metadata in hand (the tree
#: document's dtype, shape and chunks, vouched for by the manifest's record of
#: ``zarr.json``) instead of reading each ``zarr.json``: one request less per array on
#: object stores. False: always read ``zarr.json`` (what version-1 checkpoints get).
ASSUME_RECORDED_METADATA = True

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
        integrity.manifest.files.get(f"{meta['path']}/zarr.json")
        if integrity is not None
        else None
    )
    chunks = meta.get("chunks")
    if (
        ASSUME_RECORDED_METADATA
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


async def _read_checked(
    read: Any, meta: dict[str, Any], integrity: _Integrity | None
) -> Any:
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
    the output (:func:`_read_direct`). Elsewhere tensorstore reads the chunks: with
    ``aligned`` into a fresh :data:`_ALIGN`-aligned array (which a jax CPU array can alias
    without a copy), else with tensorstore's own ``read``, which hands out the decoded
    chunk of a single-chunk array as it is (no copy into a second array)."""
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
    if not aligned:
        array = np.asarray(await _read_checked(store.read(), meta, integrity))
        return array if array.flags.writeable else array.copy()
    out = _aligned_empty(tuple(meta["shape"]), dtype)
    await _read_checked(ts.array(out, copy=False, write=True).write(store), meta, integrity)
    return out


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
                pool, _read_file_into, os.path.join(root, "c"), flat, flat.size, record("c"),
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
                Problem(f"{meta['path']}/{os.path.relpath(e.path, root).replace(os.sep, '/')}",
                        "chunk", e.problem)
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


def _to_jax(array: np.ndarray, sharding: Any) -> jax.Array:
    """``array`` as a jax array placed by ``sharding`` (None: the default device).

    On a single CPU device the (aligned, never otherwise exposed) host buffer is aliased
    through DLPack instead of copied; elsewhere it is copied with ``jax.device_put``.
    """
    if sharding is None:
        device = jax.devices()[0]
    elif isinstance(sharding, jax.sharding.SingleDeviceSharding):
        device = next(iter(sharding.device_set))
    else:
        device = None
    if device is not None and device.platform == "cpu" and array.size:
        try:
            return jax.dlpack.from_dlpack(array, device=device, copy=None)
        except (TypeError, ValueError, RuntimeError, BufferError):  # e.g. bfloat16
            pass
    return jax.device_put(array, sharding)


def _to_output(array: np.ndarray, meta: dict[str, Any], target: Any) -> Any:
    if meta["kind"] == "prng_key":
        keys = jax.random.wrap_key_data(jax.numpy.asarray(array), impl=meta["key_impl"])
        sharding = getattr(target, "sharding", None) if target is not None else None
        if isinstance(target, jax.Array):
            try:
                sharding = target.sharding
            except Exception:  # a deleted array may not report its sharding
                sharding = None
        return keys if sharding is None else jax.device_put(keys, sharding)
    if "logical_dtype" in meta:
        array = array.view(_logical_dtype(meta))
    if isinstance(target, jax.ShapeDtypeStruct):
        return _to_jax(array, target.sharding)
    if isinstance(target, jax.Array):
        try:
            sharding = target.sharding
        except Exception:  # a deleted array may not report its sharding
            sharding = None
        return _to_jax(array, sharding)
    if meta["kind"] == "numpy_scalar" and (target is None or isinstance(target, np.generic)):
        return array[()]
    return array


def _is_pack_file(relpath: str) -> bool:
    parts = relpath.split("/")
    return len(parts) >= 2 and parts[-2] == PACKS_DIR and parts[-1].isdigit()


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


class _PackReader:
    """Reads packed leaves: on local disk each leaf straight from its pack file into its
    output (``os.preadv``); elsewhere each pack file once (one GET), shared by its leaves
    and dropped when the last one is read. With ``verify_checksums`` every pack's CRC32C
    is checked before any of its leaves is returned."""

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
        self.local = _local_root({"kvstore": backend.kvstore_spec(directory)}) if (
            pool is not None
        ) else None
        self.remaining: dict[str, int] = {}
        for meta in metas:
            if "offset" in meta:
                self.remaining[meta["path"]] = self.remaining.get(meta["path"], 0) + 1
        self.loaded: dict[str, asyncio.Future[bytes | None]] = {}

    async def _load(self, rel: str) -> bytes | None:
        """The pack's bytes (None on local disk: leaves are read in place), checked."""
        checks = self.integrity is not None and self.integrity.verify_checksums
        if self.local is not None:
            if checks and self.integrity is not None:
                await self.integrity.verify_files([rel])
            return None
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


def _target_sharding(target: Any) -> Any:
    """The sharding a target leaf asks for, or None."""
    if isinstance(target, jax.ShapeDtypeStruct):
        return target.sharding
    if isinstance(target, jax.Array):
        try:
            return target.sharding
        except Exception:  # a deleted array may not report its sharding
            return None
    return None


def _per_shard(sharding: Any) -> bool:
    """Whether to read shard by shard: the sharding spans other processes' devices (a
    full read per process would read what others need)."""
    return not sharding.is_fully_addressable


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


async def _check_against_manifest(
    backend: Backend, directory: UPath, tree_raw: bytes, checkpoint: str | None
) -> None:
    """CorruptCheckpointError if ``directory`` has a manifest whose record of the tree
    document does not match ``tree_raw``."""
    try:
        manifest = await read_manifest(backend, directory)
    except ValueError:
        manifest = None
    record = manifest.files.get(TREE_FILE) if manifest is not None else None
    if record is None:
        return
    problem = checksum_problem(TREE_FILE, record, tree_raw)
    if problem is not None:
        raise CorruptCheckpointError(
            checkpoint or str(directory),
            [f"{directory / TREE_FILE}: {problem.detail}"],
            file=str(directory / TREE_FILE),
        )


async def read(
    backend: Backend,
    directory: UPath,
    target: Any = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    verify_checksums: bool = False,
    checkpoint: str | None = None,
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

    Raises:
        ckpt.CorruptCheckpointError: a recorded file is missing, has another size, or
            (with ``verify_checksums``) another checksum; it names the checkpoint, the
            leaf and the file.
        ValueError: ``target``'s structure, or a leaf's shape, dtype or kind, differs
            from the checkpoint (the message names the leaf path, e.g.
            ``params/dense/kernel`` or ``layers[2]``), or the metadata is malformed.
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
    if target is not None:
        _check_target(doc["structure"], target, leaves, "", plan)
    context = ts.Context({"file_io_concurrency": {"limit": FILE_IO_CONCURRENCY}})
    array_leaves = [i for i, m in enumerate(leaves) if m["kind"] in _ARRAY_KINDS]
    pool = None
    if (
        DIRECT_LOCAL_READS
        and array_leaves
        and _local_root(_array_spec(backend, directory, ARRAYS_DIR))
    ):
        pool = ThreadPoolExecutor(FILE_IO_CONCURRENCY, thread_name_prefix="ckpt-read")
    x64 = bool(jax.config.read("jax_enable_x64"))  # thread-local under ``jax.enable_x64``

    def place(array: np.ndarray, i: int) -> Any:
        with jax.enable_x64(x64):
            return _to_output(array, leaves[i], plan[i])

    total = sum(_leaf_nbytes(leaves[i]) for i in array_leaves)
    if progress is not None:
        progress(0, total)
    packs = _PackReader(
        backend, directory, [leaves[i] for i in array_leaves], pool, integrity
    )

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
            out = await _read_sharded(
                backend, directory, leaves[i], sharding, context, integrity
            )
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


def _leaf_nbytes(meta: dict[str, Any]) -> int:
    return math.prod(meta["shape"]) * _DTYPES[meta["dtype"]].itemsize


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
