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
:func:`ckpt.tree_read.read` reads such files with ``os.preadv`` straight into the output arrays (no
intermediate buffer); everything else (other stores, other layouts) is read with tensorstore.

This module holds the format itself: its names, limits and tunables, the dtypes it
stores, and the validation of tree documents. The code that uses it is split by job:

* :mod:`ckpt.tree_snapshot`: :func:`~ckpt.tree_snapshot.prepare`, the short blocking part
  of a save (validate, flatten and snapshot the tree, assign packs);
* :mod:`ckpt.tree_write`: :func:`~ckpt.tree_write.write`, the I/O part of a save;
* :mod:`ckpt.tree_read`: :func:`~ckpt.tree_read.read`, a restore;
* :mod:`ckpt.tree_integrity`: the manifest checks a restore makes;
* :mod:`ckpt.direct_read`: the local fast path of a restore (``os.preadv``);
* :mod:`ckpt.placement`: matching a restore target and placing outputs (numpy, jax).

The tunables (:data:`PACK_MAX_LEAF_BYTES`, :data:`CHUNK_BYTES`, ...) are read from this
module at call time, so a test (or a user) may change them here.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts
from upath import UPath

from ckpt.backend import Backend

__all__ = [
    "ARRAYS_DIR",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PACKS_DIR",
    "TREE_FILE",
    "tree_metadata",
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
#: Array leaves of at most this many bytes (16 MiB) are packed; larger ones are zarr3
#: arrays. A zarr3 array costs a metadata file, chunk files and their directories (on a
#: local disk each created and fsynced: ~10 ms here, the time to write ~10 MB; on an object
#: store 2 requests), while a packed leaf costs only its bytes. Multi-process arrays are
#: never packed (each process writes its own shards).
PACK_MAX_LEAF_BYTES = 16 * 1024 * 1024
#: A pack file holds up to this many bytes (one larger leaf may make it bigger).
PACK_FILE_BYTES = 64 * 1024 * 1024
#: Pack files one :func:`write` writes at once. A backend without in-place buffer writes
#: joins a pack's leaves into one buffer, so this bounds the extra memory of a save
#: (8 x 64 MiB) whatever the size of the tree.
PACK_WRITE_CONCURRENCY = 8

#: Zarr3 chunks are at most this many bytes (split along the leading axes).
CHUNK_BYTES = 64 * 1024 * 1024
#: Concurrent file operations of one :func:`write` or :func:`read` (tensorstore's default,
#: ``max(4, cores)``, leaves local disks idle on small machines).
FILE_IO_CONCURRENCY = 16
#: Read plain local chunk files with ``os.preadv`` into the output arrays (see
#: :func:`_read_direct`); False: always read through tensorstore.
DIRECT_LOCAL_READS = hasattr(os, "preadv") and sys.byteorder == "little"
#: Open arrays of checkpoints with a manifest from the metadata in hand (the tree
#: document's dtype, shape and chunks, vouched for by the manifest's record of
#: ``zarr.json``) instead of reading each ``zarr.json``: one request less per array on
#: object stores. False: always read ``zarr.json`` (what version-1 checkpoints get).
ASSUME_RECORDED_METADATA = True

_ALIGN = 64  # bytes; what XLA's CPU client needs to alias a host buffer
_PADDING = bytes(_ALIGN)  # between packed leaves
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


def _join_node_key(prefix: str, key: str | int) -> str:
    return _join_index(prefix, key) if isinstance(key, int) else _join_key(prefix, key)


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


def _chunk_key(index: tuple[int, ...]) -> str:
    """zarr3's default chunk key (``c/0/1``; ``c`` for a 0-d array)."""
    return "/".join(("c", *map(str, index)))


def _array_spec(backend: Backend, directory: UPath, subpath: str) -> dict[str, Any]:
    return {"driver": "zarr3", "kvstore": backend.kvstore_spec(_subpath(directory, subpath))}


def _zarr_json(store: ts.TensorStore) -> bytes:
    """The ``zarr.json`` that :func:`write` stores for ``store`` (its metadata as JSON)."""
    return json.dumps(store.spec().to_json()["metadata"]).encode()


def _subpath(directory: UPath, subpath: str) -> UPath:
    path = directory
    for part in subpath.split("/"):
        path = path / part
    return path


# -- validating tree documents -----------------------------------------------------------


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
            items = [(c, _join_node_key(keypath, k)) for k, c in zip(keys, children, strict=True)]
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


def _logical_dtype(meta: dict[str, Any]) -> np.dtype:
    """The dtype of a saved array leaf as it was given (not its storage dtype)."""
    logical = meta.get("logical_dtype")
    return _VIEW_DTYPES[logical] if logical is not None else _DTYPES[meta["dtype"]]


def _scalar_value(meta: dict[str, Any]) -> Any:
    kind = meta["kind"]
    if kind == "none":
        return None
    if kind == "float":
        return _decode_float(meta["value"])
    if kind == "complex":
        return complex(_decode_float(meta["value"][0]), _decode_float(meta["value"][1]))
    return meta["value"]


def _is_pack_file(relpath: str) -> bool:
    parts = relpath.split("/")
    return len(parts) >= 2 and parts[-2] == PACKS_DIR and parts[-1].isdigit()


def _leaf_nbytes(meta: dict[str, Any]) -> int:
    return math.prod(meta["shape"]) * _DTYPES[meta["dtype"]].itemsize
