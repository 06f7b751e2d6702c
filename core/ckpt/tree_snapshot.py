"""Snapshotting a tree for saving: validate and flatten it, take donation-safe host copies
(or zero-copy views) of its arrays, and decide which leaves are packed.

:func:`prepare` is the short blocking part of a save; :func:`ckpt.tree_write.write` the
I/O part. The on-disk format is described in :mod:`ckpt.tree_format`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ckpt import tree_format
from ckpt.manifest import (
    MANIFEST_FILE,
)
from ckpt.tree_format import (
    _ALIGN,
    _DTYPES,
    _VIEW_DTYPES,
    _VIEW_STORAGE,
    ARRAYS_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    PACKS_DIR,
    _display,
    _encode_float,
    _join_index,
    _join_key,
    _join_node_key,
)

__all__ = ["PreparedTree", "prepare", "tree_nbytes"]


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
        if math.prod(chunks) * itemsize <= tree_format.CHUNK_BYTES:
            break
        inner = math.prod(chunks[axis + 1 :]) * itemsize
        chunks[axis] = (
            max(1, min(chunks[axis], tree_format.CHUNK_BYTES // inner)) if inner else chunks[axis]
        )
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
    fit = max(1, tree_format.CHUNK_BYTES // inner) if inner else rows
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
        if item.partial or nbytes > tree_format.PACK_MAX_LEAF_BYTES:
            continue
        if not sizes or (offset and offset + nbytes > tree_format.PACK_FILE_BYTES):
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
