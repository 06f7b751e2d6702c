"""The pytree storage format: nested dicts/lists/tuples of arrays and scalars on any backend.

One saved tree is a directory::

    <directory>/
        _TREE.json          structure, per-leaf metadata, inline scalars/strings/None
        arrays/0/           one zarr3 array per array leaf (written with tensorstore)
        arrays/1/
        ...

Array subdirectories are named by the leaf's index in flattening order, so any dict key
(spaces, unicode, ``/``, ``..``) is safe: keys only ever appear inside the JSON file.
The JSON file is written last, through :meth:`ckpt.backend.Backend.write_bytes`.

``_TREE.json`` (format version 1)::

    {
      "format": "ckpt-tree",
      "version": 1,
      "structure": {"type": "dict", "keys": ["params", "step"],
                    "children": [{"type": "dict", ...}, {"type": "leaf", "index": 1}]},
      "leaves": [
        {"keypath": "params/w", "kind": "array", "dtype": "float32", "shape": [4, 4],
         "path": "arrays/0", "chunks": [4, 4], "nbytes": 64, "source": "jax"},
        {"keypath": "step", "kind": "int", "value": 10}
      ]
    }

Leaf kinds: ``array`` (numpy or jax array), ``numpy_scalar`` (a numpy scalar such as
``np.float32(1)``, stored as a 0-d array), ``bool``, ``int``, ``float``, ``complex``,
``str`` and ``none`` (inline). Non-finite floats are stored as the strings ``"nan"``,
``"inf"`` and ``"-inf"``; complex numbers as ``[real, imag]``.

Array chunks are plain (unsharded) zarr3 chunks of at most :data:`CHUNK_BYTES`, stored
uncompressed: on a local disk each chunk file holds exactly the chunk's bytes, and
:func:`read` reads such files with ``os.preadv`` straight into the output arrays (no
intermediate buffer); everything else (other stores, other layouts) is read with tensorstore.

Saving is split in two so it can run asynchronously: :func:`prepare` is the short
blocking part (validate, flatten and snapshot the tree), :func:`write` the I/O part.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
FORMAT_VERSION = 1

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
_ARRAY_KINDS = ("array", "numpy_scalar")
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

    def metadata(self) -> dict[str, Any]:
        """The JSON document that :func:`write` stores as :data:`TREE_FILE`."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
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
    dt = np.dtype(dtype)
    if dt.byteorder not in "=|":
        dt = dt.newbyteorder("=")  # big-endian input is stored (and restored) native
    if dt.name not in _DTYPES or _DTYPES[dt.name] != dt:
        raise TypeError(
            f"Leaf {_display(keypath)!r}: unsupported array dtype {dt!s}; supported: "
            f"{', '.join(sorted(_DTYPES))}."
        )
    return _DTYPES[dt.name]


def _is_cpu(x: jax.Array) -> bool:
    devices: set[Any] = x.sharding.device_set
    return all(d.platform == "cpu" for d in devices)


def _snapshot_jax(x: jax.Array, keypath: str, copy: bool) -> Any:
    """Cheap, donation-safe snapshot of a jax array (see :class:`_ArrayItem`)."""
    if x.is_deleted():
        raise ValueError(f"Leaf {_display(keypath)!r}: the jax array has been deleted.")
    if not x.is_fully_addressable:
        raise ValueError(
            f"Leaf {_display(keypath)!r}: the jax array spans several processes; "
            "tree_format saves only fully addressable arrays."
        )
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
        dtype = _check_dtype(value.dtype, keypath)
        shape = tuple(int(d) for d in value.shape)
        index = len(leaves)
        subpath = f"{ARRAYS_DIR}/{index}"
        chunks = _chunk_shape(shape, dtype.itemsize)
        if isinstance(value, jax.Array):
            data = _snapshot_jax(value, keypath, copy)
        else:
            data = np.array(value, dtype=dtype, copy=copy or None)
        arrays.append(_ArrayItem(index, subpath, shape, dtype, chunks, data))
        return {
            "keypath": keypath,
            "kind": kind,
            "dtype": dtype.name,
            "shape": list(shape),
            "path": subpath,
            "chunks": list(chunks),
            "nbytes": int(math.prod(shape)) * dtype.itemsize,
            "source": source,
        }

    def leaf(value: Any, keypath: str) -> dict[str, Any]:
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
            f"Leaf {_display(keypath)!r}: unsupported type {type(value).__qualname__}; "
            "expected a dict, list, tuple, jax or numpy array, int, float, bool, complex, "
            "str or None."
        )

    structure = _flatten(tree, "", leaf, leaves)
    return PreparedTree(structure, leaves, arrays)


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
    if isinstance(node, dict):
        keys = list(node)
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(
                    f"Leaf {_display(_join_key(keypath, repr(key)))!r}: dict keys must "
                    f"be str, got {type(key).__qualname__} {key!r}."
                )
        children = [_flatten(node[k], _join_key(keypath, k), leaf, leaves) for k in keys]
        return {"type": "dict", "keys": keys, "children": children}
    if type(node) is list or type(node) is tuple:
        children = [_flatten(v, _join_index(keypath, i), leaf, leaves) for i, v in enumerate(node)]
        return {"type": "list" if isinstance(node, list) else "tuple", "children": children}
    if isinstance(node, (list, tuple)):
        raise TypeError(
            f"Leaf {_display(keypath)!r}: unsupported container "
            f"{type(node).__qualname__}; use a dict, list or tuple."
        )
    leaves.append(leaf(node, keypath))
    return {"type": "leaf", "index": len(leaves) - 1}


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


def _array_spec(backend: Backend, directory: UPath, subpath: str) -> dict[str, Any]:
    path = directory
    for part in subpath.split("/"):
        path = path / part
    return {"driver": "zarr3", "kvstore": backend.kvstore_spec(path)}


async def _host_data(item: _ArrayItem) -> Any:
    if isinstance(item.data, jax.Array):
        # The device-to-host copy was started by prepare(); wait for it off the loop.
        return await asyncio.to_thread(np.asarray, item.data)
    return item.data


async def _write_array(
    backend: Backend, directory: UPath, item: _ArrayItem, context: ts.Context
) -> None:
    store = await ts.open(
        _array_spec(backend, directory, item.subpath),
        create=True,
        delete_existing=False,
        dtype=ts.dtype(item.dtype),
        shape=list(item.shape),
        # Plain chunks: with only a write chunk shape, tensorstore stores large arrays as
        # shards of 4 MB inner chunks (an index per file, no direct reads).
        chunk_layout=ts.ChunkLayout(chunk_shape=list(item.chunks)),
        context=context,
    )
    if 0 in item.shape:
        return
    data = await _host_data(item)
    if isinstance(data, list):
        await asyncio.gather(
            *(
                store[tuple(index)].write(view, can_reference_source_data_indefinitely=True)
                for index, view in data
            )
        )
    else:
        await store.write(data, can_reference_source_data_indefinitely=True)


async def write(
    backend: Backend,
    directory: UPath,
    prepared: PreparedTree,
    *,
    durable: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``prepared`` under ``directory``: all arrays concurrently, then :data:`TREE_FILE`.

    Arrays are zarr3 arrays (uncompressed, plain chunks of up to :data:`CHUNK_BYTES`) written
    through ``backend.kvstore_spec``; with ``durable`` tensorstore fsyncs what it writes
    on local files. Existing arrays are never replaced (write to a fresh directory).
    Making the JSON file and the directory entries durable is the job of the caller's
    commit (``backend.sync_tree``). ``progress(advance_bytes, total_bytes)`` is called as
    arrays finish.
    """
    await backend.mkdir(directory, parents=True, exist_ok=True)
    context = ts.Context(
        {"file_io_sync": bool(durable), "file_io_concurrency": {"limit": FILE_IO_CONCURRENCY}}
    )
    total = tree_nbytes(prepared)

    async def one(item: _ArrayItem) -> None:
        await _write_array(backend, directory, item, context)
        if progress is not None:
            progress(int(np.prod(item.shape)) * item.dtype.itemsize, total)

    if progress is not None:
        progress(0, total)
    await asyncio.gather(*(one(a) for a in prepared.arrays))
    data = json.dumps(prepared.metadata(), ensure_ascii=True, allow_nan=False).encode()
    await backend.write_bytes(directory / TREE_FILE, data)


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
        version == FORMAT_VERSION,
        f"unknown format version {version!r} (this ckpt reads version {FORMAT_VERSION})",
    )
    leaves = doc.get("leaves")
    _require(isinstance(leaves, list), "'leaves' is not a list")
    paths: set[str] = set()
    for i, leaf in enumerate(leaves):
        _validate_leaf(i, leaf)
        if leaf["kind"] in _ARRAY_KINDS:
            _require(leaf["path"] not in paths, f"leaf {i}: array path {leaf['path']!r} reused")
            paths.add(leaf["path"])
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
        path = leaf.get("path")
        # Relative, inside the checkpoint: no '..', '.', '/x', '' or hidden components.
        _require(
            isinstance(path, str) and all(_SAFE_COMPONENT.fullmatch(p) for p in path.split("/")),
            f"{where}: unsafe or missing array path {path!r} (expected a relative path "
            "inside the checkpoint, such as 'arrays/0')",
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
        if kind == "dict":
            keys = node.get("keys")
            _require(
                isinstance(keys, list)
                and all(isinstance(k, str) for k in keys)
                and len(keys) == len(children)
                and len(set(keys)) == len(keys),
                f"dict at {where!r} has bad 'keys'",
            )
            items = [(c, _join_key(keypath, k)) for k, c in zip(keys, children, strict=True)]
        elif kind in ("list", "tuple"):
            items = [(c, _join_index(keypath, i)) for i, c in enumerate(children)]
        else:
            raise ValueError(f"structure node at {where!r} has unknown type {kind!r}")
        # Reversed: leaves are checked (and errors reported) in document order.
        stack.extend((c, kp, depth + 1) for c, kp in reversed(items))


async def tree_metadata(backend: Backend, directory: UPath) -> dict[str, Any]:
    """The validated contents of ``directory``'s :data:`TREE_FILE` (no array reads).

    Keys: ``format``, ``version``, ``structure`` (nested ``{"type": "dict"|"list"|"tuple",
    ...}`` / ``{"type": "leaf", "index": i}`` nodes) and ``leaves`` (per-leaf metadata).

    Raises:
        FileNotFoundError: there is no :data:`TREE_FILE`.
        ValueError: the file is not valid JSON or not a supported format version; the
            message names the file.
    """
    path = directory / TREE_FILE
    raw = await backend.read_bytes(path)
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
    if kind == "dict":
        if not isinstance(target, Mapping):
            raise ValueError(
                f"Tree mismatch at {where!r}: checkpoint has a dict, target has "
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
        if dtype.name != meta["dtype"]:
            raise ValueError(
                f"Leaf {where!r}: dtype mismatch: checkpoint {meta['dtype']}, target {dtype}."
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


async def _read_array(
    backend: Backend,
    directory: UPath,
    meta: dict[str, Any],
    context: ts.Context,
    pool: ThreadPoolExecutor | None,
) -> np.ndarray:
    where = _display(meta["keypath"])
    dtype = _DTYPES[meta["dtype"]]
    spec = _array_spec(backend, directory, meta["path"])
    root = _local_root(spec)
    if pool is not None and root is not None and math.prod(meta["shape"]):
        direct = await _read_direct(root, meta, pool)
        if direct is not None:
            return direct
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
    out = _aligned_empty(tuple(meta["shape"]), dtype)
    if out.size:
        await ts.array(out, copy=False, write=True).write(store)
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


def _read_file_into(path: str, buffer: np.ndarray, file_size: int) -> None:
    """Fill the uint8 array ``buffer`` from the start of ``path``, which must hold exactly
    ``file_size`` bytes (else :class:`_NotPlain`). A missing file is a chunk equal to the
    fill value (zero), which tensorstore does not store: ``buffer`` is zeroed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        buffer.fill(0)
        return
    try:
        if os.fstat(fd).st_size != file_size:
            raise _NotPlain(path)
        view = buffer.data  # a 1-d uint8 array: a flat byte view
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], done)
            if n <= 0:
                raise _NotPlain(path)  # the file shrank under us
            done += n
    finally:
        os.close(fd)


async def _read_direct(
    root: str, meta: dict[str, Any], pool: ThreadPoolExecutor
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
    tasks = []
    if not shape:
        tasks.append(
            loop.run_in_executor(pool, _read_file_into, os.path.join(root, "c"), flat, flat.size)
        )
    else:
        tail = ["0"] * (len(shape) - 1)
        for i, start in enumerate(range(0, shape[0], rows)):
            stop = min(start + rows, shape[0])
            path = os.path.join(root, "c", str(i), *tail)
            part = flat[start * row_bytes : stop * row_bytes]
            tasks.append(loop.run_in_executor(pool, _read_file_into, path, part, rows * row_bytes))
    # Wait for every task: none is left writing into ``out`` after an error.
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
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


async def read(
    backend: Backend,
    directory: UPath,
    target: Any = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Read the tree saved under ``directory``.

    Arrays come back as numpy arrays (numpy scalars for saved numpy scalars), or as
    jax arrays where the matching ``target`` leaf is a ``jax.Array`` (placed with its
    sharding) or a ``jax.ShapeDtypeStruct`` (placed with its ``sharding`` if set, else
    on the default device). Tuples come back as tuples, lists as lists. All arrays
    are read concurrently; ``progress(advance_bytes, total_bytes)`` is called as they
    finish.

    Raises:
        ValueError: ``target``'s structure, or a leaf's shape, dtype or kind, differs
            from the checkpoint (the message names the leaf path, e.g.
            ``params/dense/kernel`` or ``layers[2]``), or the metadata is malformed.
    """
    doc = await tree_metadata(backend, directory)
    leaves: list[dict[str, Any]] = doc["leaves"]
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

    async def read_leaf(i: int) -> Any:
        array = await _read_array(backend, directory, leaves[i], context, pool)
        if progress is not None:
            progress(_leaf_nbytes(leaves[i]), total)
        if isinstance(plan.get(i), (jax.Array, jax.ShapeDtypeStruct)):
            # Place on device while the other arrays are still being read.
            return await asyncio.to_thread(place, array, i)
        return _to_output(array, leaves[i], plan.get(i))

    try:
        outputs = await asyncio.gather(*(read_leaf(i) for i in array_leaves))
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
    if kind == "list":
        return [_build(c, values, leaves) for c in node["children"]]
    if kind == "tuple":
        return tuple(_build(c, values, leaves) for c in node["children"])
    index = node["index"]
    return values[index] if index in values else _scalar_value(leaves[index])
