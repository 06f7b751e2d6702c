"""Restore targets and outputs: match a target tree against the stored structure (shapes,
dtypes, kinds, PRNG keys) and place each array as numpy or as a jax array with the target's
sharding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ckpt.tree_format import (
    _ARRAY_KINDS,
    _display,
    _join_index,
    _join_key,
    _join_node_key,
    _logical_dtype,
)
from ckpt.tree_snapshot import _class_name, _is_key, _key_dtype, _registered_children

__all__: list[str] = []  # used by ckpt.tree_read only


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


def _check_jax_precision(plan: dict[int, Any], leaves: list[dict[str, Any]], x64: bool) -> None:
    """ValueError if a leaf restored as a jax array would be narrowed by jax (a 64-bit
    dtype while ``jax_enable_x64`` is off: float64 -> float32 turns 1e300 into inf)."""
    if x64:
        return
    for index, target in plan.items():
        meta = leaves[index]
        if meta["kind"] == "prng_key" or not isinstance(target, (jax.Array, jax.ShapeDtypeStruct)):
            continue
        dtype = _logical_dtype(meta)
        with jax.enable_x64(False):
            narrowed = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
        if narrowed != dtype:
            raise ValueError(
                f"Leaf {_display(meta['keypath'])!r}: the checkpoint holds {dtype}, but jax's "
                f"64-bit mode is off, so a jax array of it would be {narrowed} (values "
                "rounded or wrapped). Turn it on (jax.config.update('jax_enable_x64', True), "
                "or `with jax.enable_x64(True):` around the restore), or restore this leaf "
                "as numpy (a numpy target or none)."
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
