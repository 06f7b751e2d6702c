"""Every leaf type and container a JAX user saves: narrow dtypes (int4, float8, ...), typed
PRNG keys, OrderedDict, namedtuple, registered dataclasses; refused leaves raise TypeError
naming their path before any storage call."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import ckpt
from ckpt_conformance.instrumented import InstrumentedBackend

#: Every narrow dtype ml_dtypes defines (jax's int2/int4/uint2/uint4/float8*/float4* are
#: these same types).
NARROW = [
    name
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
]
#: The narrow dtypes jax places on devices (jnp also names int1/uint1/float6_*, which XLA
#: cannot hold yet; numpy leaves of those are covered above).
JAX_PREFIXES = ("int2", "int4", "uint2", "uint4", "float8_", "float4_")
JAX_NARROW = [n for n in NARROW if hasattr(jnp, n) and n.startswith(JAX_PREFIXES)]
KEY_IMPLS = ["threefry2x32", "rbg", "unsafe_rbg"]


def every_bit_pattern(dtype: np.dtype, shape: tuple[int, ...] = (256,)) -> np.ndarray:
    """All 256 byte values as ``dtype`` (numpy keeps each narrow value in one byte)."""
    return np.arange(256, dtype=np.uint8).view(dtype).reshape(shape)


def same_bits(a: Any, b: Any) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.fixture
def ckptr() -> ckpt.Checkpointer:
    return ckpt.Checkpointer()


def test_jax_dtypes_are_ml_dtypes() -> None:
    # The list above covers what jax defines.
    jax_names = [n for n in dir(jnp) if n.startswith(JAX_PREFIXES)]
    assert jax_names and set(jax_names) <= set(JAX_NARROW)


@pytest.mark.parametrize("name", NARROW)
def test_numpy_narrow_dtypes_roundtrip_bit_exactly(
    ckptr: ckpt.Checkpointer, tmp_path: Path, name: str
) -> None:
    dtype = np.dtype(getattr(ml_dtypes, name))
    tree = {
        "all": every_bit_pattern(dtype, (16, 16)),
        "zero_d": every_bit_pattern(dtype)[7:8].reshape(()),
        "scalar": every_bit_pattern(dtype)[3],  # a numpy scalar
        "empty": np.zeros((0, 4), dtype),
    }
    ckptr.save(tmp_path / "c", tree)
    restored = ckptr.restore(tmp_path / "c")
    for key in ("all", "zero_d", "empty"):
        assert isinstance(restored[key], np.ndarray)
        same_bits(restored[key], tree[key])
    assert type(restored["scalar"]) is type(tree["scalar"])
    same_bits(restored["scalar"], tree["scalar"])
    # The metadata keeps the logical dtype; storage is plain uint8 bytes (small leaves
    # packed into a pack file, at their offset).
    doc = json.loads((tmp_path / "c" / "_TREE.json").read_text())
    leaf = doc["leaves"][0]
    assert (leaf["logical_dtype"], leaf["dtype"]) == (name, "uint8")
    stored = (tmp_path / "c" / leaf["path"]).read_bytes()
    raw = np.asarray(tree["all"]).view(np.uint8).tobytes()
    assert stored[leaf["offset"] : leaf["offset"] + len(raw)] == raw


@pytest.mark.parametrize("name", JAX_NARROW)
@pytest.mark.parametrize("async_save", [False, True])
def test_jax_narrow_dtypes_roundtrip(tmp_path: Path, name: str, async_save: bool) -> None:
    dtype = getattr(jnp, name)
    bits = every_bit_pattern(np.dtype(dtype), (16, 16))
    tree = {
        "q": jnp.asarray(bits),
        "zero_d": jnp.asarray(bits[0, 5]),
        "empty": jnp.zeros((3, 0), dtype),
    }
    cls = ckpt.AsyncCheckpointer if async_save else ckpt.Checkpointer
    with cls() as ckptr:
        ckptr.save(tmp_path / "c", tree)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
        restored = ckptr.restore(tmp_path / "c", target=target)
        plain = ckptr.restore(tmp_path / "c")
    for key, value in tree.items():
        assert isinstance(restored[key], jax.Array)
        assert restored[key].dtype == value.dtype
        same_bits(restored[key], value)
        same_bits(plain[key], value)


def test_issue_example_int4(ckptr: ckpt.Checkpointer, tmp_path: Path) -> None:
    tree = {"q": jnp.array(np.arange(-8, 8), jnp.int4)}
    ckptr.save(tmp_path / "c", tree)
    restored = ckptr.restore(tmp_path / "c", target=tree)
    assert restored["q"].dtype == jnp.int4
    assert np.asarray(restored["q"]).astype(np.int32).tolist() == list(range(-8, 8))


def test_narrow_dtype_target_mismatch_is_named(ckptr: ckpt.Checkpointer, tmp_path: Path) -> None:
    ckptr.save(tmp_path / "c", {"q": np.zeros(4, ml_dtypes.int4)})
    with pytest.raises(ValueError, match=r"'q'.*dtype mismatch: checkpoint int4, target uint8"):
        ckptr.restore(tmp_path / "c", target={"q": np.zeros(4, np.uint8)})


@pytest.mark.parametrize("impl", KEY_IMPLS)
def test_typed_prng_keys_roundtrip(ckptr: ckpt.Checkpointer, tmp_path: Path, impl: str) -> None:
    tree = {
        "rngs": {
            "dropout": jax.random.key(0, impl=impl),
            "many": jax.random.split(jax.random.key(7, impl=impl), 6).reshape(2, 3),
            "none": jax.random.split(jax.random.key(1, impl=impl), 0),
        }
    }
    ckptr.save(tmp_path / "c", tree)
    for target in (
        None,
        tree,
        jax.tree.map(lambda k: jax.ShapeDtypeStruct(k.shape, k.dtype), tree),
    ):
        restored = ckptr.restore(tmp_path / "c", target=target)
        for key, value in tree["rngs"].items():
            got = restored["rngs"][key]
            assert isinstance(got, jax.Array)
            assert jax.random.key_impl(got) == jax.random.key_impl(value) == impl
            assert got.dtype == value.dtype and got.shape == value.shape
            same_bits(jax.random.key_data(got), jax.random.key_data(value))
        # Equal keys draw equal numbers.
        got = restored["rngs"]["dropout"]
        assert jnp.array_equal(
            jax.random.normal(got, (3,)), jax.random.normal(tree["rngs"]["dropout"], (3,))
        )


def test_prng_key_issue_example_and_mismatch(ckptr: ckpt.Checkpointer, tmp_path: Path) -> None:
    ckptr.save(tmp_path / "c", {"rngs": {"dropout": jax.random.key(0)}})
    with pytest.raises(ValueError, match=r"rngs/dropout.*key mismatch.*threefry2x32"):
        ckptr.restore(tmp_path / "c", target={"rngs": {"dropout": jax.random.key(0, impl="rbg")}})
    with pytest.raises(ValueError, match=r"rngs/dropout.*PRNG key.*target has ndarray"):
        ckptr.restore(tmp_path / "c", target={"rngs": {"dropout": np.zeros(2, np.uint32)}})


class Point(NamedTuple):
    x: Any
    y: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: dict[str, Any]
    step: Any
    opt: Any


def test_ordered_dict_and_namedtuple_keep_their_type(
    ckptr: ckpt.Checkpointer, tmp_path: Path
) -> None:
    plain_nt = collections.namedtuple("Pair", ["a", "b"])
    tree = {
        "od": collections.OrderedDict([("z", np.ones(2)), ("a", 1)]),
        "pt": Point(np.arange(3), {"inner": Point(1, 2.5)}),
        "pair": plain_nt(1, 2),
        "none": None,
        "t": (1, [2, None]),
    }
    ckptr.save(tmp_path / "c", tree)
    restored = ckptr.restore(tmp_path / "c")
    assert type(restored["od"]) is collections.OrderedDict
    assert list(restored["od"]) == ["z", "a"]
    assert type(restored["pt"]) is Point and type(restored["pt"].y["inner"]) is Point
    assert restored["pt"].y["inner"] == Point(1, 2.5)
    np.testing.assert_array_equal(restored["pt"].x, np.arange(3))
    # A namedtuple whose class is not importable comes back with its name and fields.
    assert restored["pair"]._fields == ("a", "b") and restored["pair"] == (1, 2)
    assert type(restored["pair"]).__name__ == "Pair"
    assert restored["none"] is None and restored["t"] == (1, [2, None])
    # With a target, the target's classes are used.
    again = ckptr.restore(tmp_path / "c", target=tree)
    assert type(again["pair"]) is plain_nt
    with pytest.raises(ValueError, match=r"'pt'.*namedtuple fields differ"):
        ckptr.restore(tmp_path / "c", target={**tree, "pt": plain_nt(1, 2)})


def test_registered_dataclass_roundtrips_with_target(
    ckptr: ckpt.Checkpointer, tmp_path: Path
) -> None:
    state = TrainState(params={"w": jnp.ones((2, 2))}, step=3, opt=(jnp.zeros(2), None))
    ckptr.save(tmp_path / "c", {"state": state})
    restored = ckptr.restore(tmp_path / "c", target={"state": state})
    assert type(restored["state"]) is TrainState
    assert restored["state"].step == 3
    assert isinstance(restored["state"].params["w"], jax.Array)
    np.testing.assert_array_equal(restored["state"].params["w"], np.ones((2, 2)))
    assert restored["state"].opt[1] is None
    # Without a target: a dict of its fields (documented).
    plain = ckptr.restore(tmp_path / "c")
    assert set(plain["state"]) == {"params", "step", "opt"}
    with pytest.raises(ValueError, match=r"'state'.*pytree node.*TrainState"):
        ckptr.restore(tmp_path / "c", target={"state": {"params": 1, "step": 2, "opt": 3}})


class NotANode:
    pass


class MyDict(dict):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    ("tree", "where"),
    [
        ({"a": {"b": NotANode()}}, r"'a/b'.*unsupported type .*NotANode"),
        ({"layers": [MyDict(x=1)]}, r"'layers\[0\]'.*unsupported type .*MyDict"),
        ({"s": {1, 2}}, r"'s'.*unsupported type set"),
        ({"p": Point(1, object())}, r"'p/y'.*unsupported type"),
        ({"a": np.array(["x"])}, r"'a'.*unsupported array dtype"),
    ],
)
@pytest.mark.parametrize("cls", [ckpt.Checkpointer, ckpt.AsyncCheckpointer])
def test_unsavable_leaf_raises_typeerror_before_any_storage_call(
    tmp_path: Path, tree: Any, where: str, cls: type[ckpt.Checkpointer]
) -> None:
    backend = InstrumentedBackend(ckpt.get_backend(str(tmp_path)))
    with cls(backend=backend) as ckptr, pytest.raises(TypeError, match=where):
        ckptr.save(tmp_path / "c", tree)
    assert backend.log == []
    assert not (tmp_path / "c").exists()


def test_manager_saves_every_leaf_type(tmp_path: Path) -> None:
    tree = {
        "q": jnp.array(np.arange(-8, 8), jnp.int4),
        "rngs": {"dropout": jax.random.key(0)},
        "od": collections.OrderedDict(a=np.float32(1)),
        "pt": Point(1, 2),
    }
    with ckpt.CheckpointManager(tmp_path / "run") as mngr:
        mngr.save(0, tree)
        mngr.wait_until_finished()
        restored = mngr.restore(0, target=tree)
    same_bits(restored["q"], tree["q"])
    assert jax.random.key_impl(restored["rngs"]["dropout"]) == "threefry2x32"
    assert type(restored["od"]) is collections.OrderedDict and type(restored["pt"]) is Point


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(np.float64, 1e300), (np.int64, 2**40), (np.uint64, 2**63), (np.complex128, 1e300 + 1j)],
)
def test_64_bit_leaf_to_a_jax_target_without_x64_is_refused(
    ckptr: ckpt.Checkpointer, tmp_path: Path, dtype: Any, value: Any
) -> None:
    """With jax's 64-bit mode off (its default), a float64 leaf placed as a jax array would
    silently become float32 (1e300 -> inf): the restore refuses, naming the leaf and the fix,
    before reading anything; as numpy, or with 64-bit mode on (also the thread-local
    ``jax.enable_x64`` around the restore), the values come back exactly."""
    ckptr.save(tmp_path / "1", {"x": np.array([value, 1], dtype)})
    target = {"x": jax.ShapeDtypeStruct((2,), dtype)}
    assert not jax.config.read("jax_enable_x64")
    with pytest.raises(ValueError, match=r"Leaf 'x'.*64-bit mode is off.*jax_enable_x64"):
        ckptr.restore(tmp_path / "1", target)
    assert np.array_equal(ckptr.restore(tmp_path / "1")["x"], np.array([value, 1], dtype))
    with jax.enable_x64(True):
        out = ckptr.restore(tmp_path / "1", target)["x"]
        assert isinstance(out, jax.Array) and out.dtype == dtype
        assert np.array_equal(np.asarray(out), np.array([value, 1], dtype))
