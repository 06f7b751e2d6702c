"""Tests of the pytree storage format (ckpt.tree_format)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from upath import UPath

from ckpt import direct_read, tree_integrity, tree_read, tree_snapshot, tree_write
from ckpt import tree_format as tf
from ckpt.errors import CorruptCheckpointError
from ckpt.manifest import MANIFEST_FILE
from ckpt_backend_local import LocalBackend


@pytest.fixture
def backend() -> Any:
    return LocalBackend()


@pytest.fixture
def ckdir(tmp_path: Path) -> UPath:
    return UPath(tmp_path / "ck")


@pytest.fixture(autouse=True)
def _zarr_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the zarr array path: no leaf is packed (packs have their own
    tests in test_packing.py)."""
    monkeypatch.setattr(tf, "PACK_MAX_LEAF_BYTES", -1)


def save(backend: Any, directory: UPath, tree: Any, durable: bool = True) -> None:
    asyncio.run(tree_write.write(backend, directory, tree_snapshot.prepare(tree), durable=durable))


def load(backend: Any, directory: UPath, target: Any = None) -> Any:
    return asyncio.run(tree_read.read(backend, directory, target))


def roundtrip(backend: Any, directory: UPath, tree: Any, target: Any = None) -> Any:
    save(backend, directory, tree)
    return load(backend, directory, target)


def assert_same_array(a: Any, b: Any) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


DTYPES = [
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
]


def sample(dtype: Any, shape: tuple[int, ...] = (5, 7), seed: int = 0) -> np.ndarray:
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if dt == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        values = rng.integers(info.min, info.max, size=n, dtype=dt, endpoint=True)
        values[:2] = [info.min, info.max]
        return values.reshape(shape)
    if dt.kind == "c":
        return (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt).reshape(shape)
    values = (rng.standard_normal(n) * 1e3).astype(dt)
    values[:4] = np.array([np.nan, np.inf, -np.inf, -0.0]).astype(dt)
    return values.reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_roundtrip_every_dtype(backend: Any, ckdir: UPath, dtype: Any) -> None:
    x = sample(dtype)
    with jax.enable_x64(True):  # 64-bit jax arrays stay 64-bit
        tree = {"np": x, "jax": jnp.asarray(x), "np0d": x.reshape(-1)[1:2].reshape(())}
        out = roundtrip(backend, ckdir, tree)
        jax_out = load(backend, ckdir, {"np": x, "jax": tree["jax"], "np0d": tree["np0d"]})
    assert isinstance(jax_out["jax"], jax.Array)
    assert_same_array(jax_out["jax"], x)
    for key in tree:
        assert isinstance(out[key], np.ndarray)
        assert_same_array(out[key], x if key != "np0d" else tree["np0d"])
    meta = asyncio.run(tf.tree_metadata(backend, ckdir))
    assert {leaf["dtype"] for leaf in meta["leaves"]} == {np.dtype(dtype).name}


def test_nested_structures(backend: Any, ckdir: UPath) -> None:
    tree: dict[str, Any] = {
        "params": {"dense": {"kernel": np.ones((3, 4), np.float32), "bias": np.zeros(4)}},
        "layers": [
            {"w": np.arange(6).reshape(2, 3)},
            ({"a": [1, 2.5]}, (np.int8(3),)),
            [],
            (),
            {},
        ],
        "opt": (np.array([1, 2]), [None, "x"]),
    }
    out = roundtrip(backend, ckdir, tree)
    assert isinstance(out["layers"], list)
    assert isinstance(out["layers"][1], tuple)
    assert isinstance(out["layers"][1][1], tuple)
    assert out["layers"][2] == [] and out["layers"][3] == () and out["layers"][4] == {}
    assert isinstance(out["opt"], tuple) and isinstance(out["opt"][1], list)
    assert_same_array(out["params"]["dense"]["kernel"], tree["params"]["dense"]["kernel"])
    assert_same_array(out["layers"][0]["w"], tree["layers"][0]["w"])
    assert out["layers"][1][0] == {"a": [1, 2.5]}
    assert out["layers"][1][1][0] == np.int8(3)
    assert isinstance(out["layers"][1][1][0], np.int8)
    assert out["opt"][1] == [None, "x"]
    assert list(out) == list(tree)  # key order kept


def test_leaf_and_empty_roots(backend: Any, tmp_path: Path) -> None:
    trees: list[Any] = [np.arange(3), 7, None, "s", [], {}, ()]
    for i, tree in enumerate(trees):
        out = roundtrip(backend, UPath(tmp_path / str(i)), tree)
        if isinstance(tree, np.ndarray):
            assert_same_array(out, tree)
        else:
            assert out == tree and type(out) is type(tree)


def test_scalars_strings_none(backend: Any, ckdir: UPath) -> None:
    tree = {
        "int": 3,
        "neg": -(2**40),
        "big": 2**70,
        "bool_t": True,
        "bool_f": False,
        "float": 0.1,
        "neg_zero": -0.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": float("-inf"),
        "tiny": 5e-324,
        "complex": complex(1.5, -2.25),
        "complex_nan": complex(float("nan"), float("inf")),
        "str": "héllo wörld ✓ 🚀",
        "empty": "",
        "quote": 'a"b\\c\n',
        "none": None,
    }
    out = roundtrip(backend, ckdir, tree)
    assert list(out) == list(tree)
    for key, value in tree.items():
        assert type(out[key]) is type(value), key
    assert out["bool_t"] is True and out["bool_f"] is False and out["none"] is None
    for key in ("int", "neg", "big", "float", "tiny", "complex", "str", "empty", "quote"):
        assert out[key] == tree[key], key
    assert math.copysign(1, out["neg_zero"]) == -1
    assert math.isnan(out["nan"]) and out["inf"] == math.inf and out["ninf"] == -math.inf
    assert math.isnan(out["complex_nan"].real) and out["complex_nan"].imag == math.inf
    # The JSON is strict (no NaN/Infinity tokens) and no array files were written.
    text = (Path(str(ckdir)) / tf.TREE_FILE).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert not (Path(str(ckdir)) / tf.ARRAYS_DIR).exists()


def test_zero_d_and_empty_arrays(backend: Any, ckdir: UPath) -> None:
    tree = {
        "zero_d": np.array(3.5),
        "zero_d_bool": np.array(True),
        "zero_d_jax": jnp.array(7, jnp.int32),
        "empty": np.zeros((0,), np.float32),
        "empty2": np.zeros((4, 0, 3), np.int8),
        "empty_jax": jnp.zeros((0, 2), jnp.bfloat16),
        "np_scalar": np.float16(1.5),
        "np_bool": np.bool_(True),
    }
    out = roundtrip(backend, ckdir, tree)
    for key in ("zero_d", "zero_d_bool", "zero_d_jax", "empty", "empty2", "empty_jax"):
        assert_same_array(out[key], tree[key])
    assert isinstance(out["np_scalar"], np.float16) and out["np_scalar"] == np.float16(1.5)
    assert isinstance(out["np_bool"], np.bool_) and bool(out["np_bool"])
    assert tree_snapshot.tree_nbytes(tree_snapshot.prepare(tree)) == 8 + 1 + 4 + 0 + 0 + 0 + 2 + 1


def test_odd_keys_are_safe(backend: Any, tmp_path: Path) -> None:
    ckdir = UPath(tmp_path / "ck")
    keys = ["with space", "ünïcødé ключ 鍵", "a/b", "..", "../escape", "/abs", ".", "", "c:\\d"]
    tree = {k: {k: np.full((2,), i, np.int32)} for i, k in enumerate(keys)}
    out = roundtrip(backend, ckdir, tree)
    assert list(out) == keys
    for i, k in enumerate(keys):
        assert_same_array(out[k][k], np.full((2,), i, np.int32))
    # Nothing escaped the checkpoint directory; arrays live under arrays/<index>.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    root = Path(str(ckdir))
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [tf.ARRAYS_DIR, tf.TREE_FILE, MANIFEST_FILE]
    )
    indices = sorted(int(p.name) for p in (root / tf.ARRAYS_DIR).iterdir())
    assert indices == list(range(len(keys)))


def test_non_string_key_refused(backend: Any, ckdir: UPath) -> None:
    with pytest.raises(TypeError, match=r"params/3.*dict keys must be str"):
        tree_snapshot.prepare({"params": {3: np.zeros(1)}})
    with pytest.raises(TypeError, match=r"layers\[1\].*dict keys must be str"):
        tree_snapshot.prepare({"layers": [{}, {("a",): 1}]})


def test_unsupported_leaves_refused() -> None:
    with pytest.raises(TypeError, match=r"a/b.*unsupported type bytes"):
        tree_snapshot.prepare({"a": {"b": b"raw"}})
    with pytest.raises(TypeError, match=r"x\[0\].*unsupported type object"):
        tree_snapshot.prepare({"x": [object()]})
    with pytest.raises(TypeError, match=r"s.*unsupported array dtype"):
        tree_snapshot.prepare({"s": np.array(["a", "b"])})
    with pytest.raises(TypeError, match=r"o.*unsupported array dtype"):
        tree_snapshot.prepare({"o": np.array([None], dtype=object)})


def test_jax_restore_with_targets(backend: Any, ckdir: UPath) -> None:
    tree = {
        "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
        "b": np.arange(4, dtype=ml_dtypes.bfloat16),
        "c": np.arange(3, dtype=np.int32),
        "step": 5,
    }
    save(backend, ckdir, tree)
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    target: dict[str, Any] = {
        "w": jnp.zeros((3, 4), jnp.float32),
        "b": jax.ShapeDtypeStruct((4,), jnp.bfloat16, sharding=sharding),
        "c": jax.ShapeDtypeStruct((3,), jnp.int32),
        "step": 0,
    }
    out = load(backend, ckdir, target)
    for key in ("w", "b", "c"):
        assert isinstance(out[key], jax.Array), key
        assert_same_array(out[key], tree[key])
    assert out["b"].sharding == sharding
    assert out["w"].sharding == target["w"].sharding
    assert out["step"] == 5
    # numpy targets give numpy arrays.
    out = load(backend, ckdir, {**target, "w": np.zeros((3, 4), np.float32)})
    assert isinstance(out["w"], np.ndarray) and not isinstance(out["w"], jax.Array)


def test_target_mismatch_errors_name_the_leaf(backend: Any, ckdir: UPath) -> None:
    tree = {
        "params": {"dense": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3)}},
        "layers": [np.zeros(1), np.zeros(2), np.zeros((4, 4), np.int8)],
        "pair": (1, "a"),
        "step": 3,
    }
    save(backend, ckdir, tree)
    good: dict[str, Any] = {
        "params": {
            "dense": {
                "kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32),
                "bias": np.zeros(3),
            }
        },
        "layers": [np.zeros(1), np.zeros(2), np.zeros((4, 4), np.int8)],
        "pair": (0, ""),
        "step": 0,
    }
    load(backend, ckdir, good)

    def bad(match: str, **changes: Any) -> None:
        target = {**good, **changes}
        with pytest.raises(ValueError, match=match):
            load(backend, ckdir, target)

    kernel_bad_shape = {"dense": {**good["params"]["dense"], "kernel": np.zeros((3, 2))}}
    bad(r"params/dense/kernel.*shape.*\(2, 3\).*\(3, 2\)", params=kernel_bad_shape)
    kernel_bad_dtype = {
        "dense": {**good["params"]["dense"], "kernel": jax.ShapeDtypeStruct((2, 3), jnp.int32)}
    }
    bad(r"params/dense/kernel.*dtype.*float32.*int32", params=kernel_bad_dtype)
    bad(r"layers\[2\].*shape", layers=[np.zeros(1), np.zeros(2), np.zeros((4, 5), np.int8)])
    bad(r"layers\[2\].*dtype.*int8.*uint8", layers=[*good["layers"][:2], np.zeros((4, 4), "u1")])
    bad(r"layers.*3 items.*2", layers=good["layers"][:2])
    bad(r"layers.*list.*tuple", layers=tuple(good["layers"]))
    bad(
        r"params/dense.*keys differ.*'weight'.*'kernel'",
        params={"dense": {"weight": np.zeros((2, 3)), "bias": np.zeros(3)}},
    )
    bad(r"params.*dict.*list", params=[1])
    bad(r"step.*int.*float", step=0.0)
    bad(r"step.*checkpoint has a int.*array", step=np.zeros(()))
    bad(r"layers\[0\].*array.*str", layers=["x", *good["layers"][1:]])
    bad(r"pair\[1\].*leaf.*dict", pair=(0, {}))
    with pytest.raises(ValueError, match=r"<root>.*dict.*list"):
        load(backend, ckdir, [1])


def test_mutation_after_prepare_is_not_written(backend: Any, ckdir: UPath) -> None:
    x = np.arange(10, dtype=np.float32)
    nested = [np.ones(3)]
    prepared = tree_snapshot.prepare({"x": x, "nested": nested})
    x[:] = -1
    nested[0][:] = 7
    nested.append(np.zeros(1))  # changes to the containers do not matter either
    asyncio.run(tree_write.write(backend, ckdir, prepared))
    out = load(backend, ckdir)
    assert_same_array(out["x"], np.arange(10, dtype=np.float32))
    assert len(out["nested"]) == 1
    assert_same_array(out["nested"][0], np.ones(3))


def test_jax_arrays_deleted_or_donated_after_prepare(backend: Any, ckdir: UPath) -> None:
    a = jnp.arange(8, dtype=jnp.float32)
    b = jnp.arange(8, dtype=jnp.int32) * 2
    prepared = tree_snapshot.prepare({"a": a, "b": b})
    a.delete()
    jax.jit(lambda v: v + 1, donate_argnums=0)(b).block_until_ready()
    asyncio.run(tree_write.write(backend, ckdir, prepared))
    out = load(backend, ckdir)
    assert_same_array(out["a"], np.arange(8, dtype=np.float32))
    assert_same_array(out["b"], np.arange(8, dtype=np.int32) * 2)
    c = jnp.zeros(2)
    c.delete()
    with pytest.raises(ValueError, match=r"'c'.*deleted"):
        tree_snapshot.prepare({"c": c})


def test_metadata_and_nbytes(backend: Any, ckdir: UPath) -> None:
    tree = {"w": np.zeros((4, 8), np.float32), "j": jnp.ones(3, jnp.bfloat16), "n": "x"}
    prepared = tree_snapshot.prepare(tree)
    assert tree_snapshot.tree_nbytes(prepared) == 4 * 8 * 4 + 3 * 2
    asyncio.run(tree_write.write(backend, ckdir, prepared, durable=False))
    meta = asyncio.run(tf.tree_metadata(backend, ckdir))
    assert meta["format"] == tf.FORMAT_NAME and meta["version"] == tf.FORMAT_VERSION
    assert meta["structure"]["type"] == "dict" and meta["structure"]["keys"] == ["w", "j", "n"]
    w, j, n = meta["leaves"]
    assert w["kind"] == "array" and w["dtype"] == "float32" and w["shape"] == [4, 8]
    assert w["source"] == "numpy" and j["source"] == "jax" and j["dtype"] == "bfloat16"
    assert w["path"] == "arrays/0" and w["nbytes"] == 128
    assert n == {"keypath": "n", "kind": "str", "value": "x"}
    zarr = json.loads((Path(str(ckdir)) / "arrays/0/zarr.json").read_text())
    assert zarr["zarr_format"] == 3
    assert [c["name"] for c in zarr["codecs"]] == ["bytes"]  # uncompressed


def test_multichunk_arrays(backend: Any, ckdir: UPath, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tf, "CHUNK_BYTES", 1000)
    tree = {
        "rows": sample(np.float32, (100, 7)),  # 28 bytes a row -> 35 rows a chunk
        "wide": sample(np.int16, (3, 2000)),  # a row is 4000 bytes -> split axis 1
        "cube": sample(np.complex128, (5, 4, 30)),
    }
    out = roundtrip(backend, ckdir, tree)
    for key in tree:
        assert_same_array(out[key], tree[key])
    meta = asyncio.run(tf.tree_metadata(backend, ckdir))
    chunks = {leaf["keypath"]: leaf["chunks"] for leaf in meta["leaves"]}
    assert chunks == {"rows": [35, 7], "wide": [1, 500], "cube": [1, 2, 30]}
    assert len(list((Path(str(ckdir)) / "arrays/0/c").iterdir())) == 3


def test_second_write_to_same_directory_refused(backend: Any, ckdir: UPath) -> None:
    save(backend, ckdir, {"a": np.zeros(2)})
    with pytest.raises(ValueError):
        save(backend, ckdir, {"a": np.ones(2)})
    assert_same_array(load(backend, ckdir)["a"], np.zeros(2))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b"{}", "format"),
        (b'{"format": "ckpt-tree", "version": 99}', "unknown format version 99"),
        (b'{"format": "ckpt-tree", "version": 1}', "leaves"),
        (b'{"format": "ckpt-tree", "version": 1, "leaves": []}', "structure"),
        (
            b'{"format": "ckpt-tree", "version": 1, "leaves": [],'
            b' "structure": {"type": "leaf", "index": 0}}',
            "bad leaf index",
        ),
        (
            b'{"format": "ckpt-tree", "version": 1, "structure": {"type": "leaf", "index": 0},'
            b' "leaves": [{"keypath": "a", "kind": "array", "dtype": "float32", "shape": [1],'
            b' "path": "../../etc"}]}',
            "unsafe or missing array path",
        ),
        (
            b'{"format": "ckpt-tree", "version": 1, "structure": {"type": "leaf", "index": 0},'
            b' "leaves": [{"keypath": "a", "kind": "array", "dtype": "object", "shape": [1],'
            b' "path": "arrays/0"}]}',
            "bad dtype",
        ),
        (
            b'{"format": "ckpt-tree", "version": 1, "structure": {"type": "leaf", "index": 0},'
            b' "leaves": [{"keypath": "a", "kind": "float", "value": "NaN!"}]}',
            "bad float",
        ),
        (
            b'{"format": "ckpt-tree", "version": 1, "structure": {"type": "dict",'
            b' "keys": ["a"], "children": []}, "leaves": []}',
            "bad 'keys'",
        ),
        (
            b'{"format": "ckpt-tree", "version": 1, "structure": {"type": "set",'
            b' "children": []}, "leaves": []}',
            "unknown type 'set'",
        ),
    ],
)
def test_malformed_json(backend: Any, ckdir: UPath, content: bytes, match: str) -> None:
    save(backend, ckdir, {"a": np.zeros(1)})
    # Without a manifest (with one, any change to the document is corruption: test_integrity)
    (Path(str(ckdir)) / MANIFEST_FILE).unlink()
    (Path(str(ckdir)) / tf.TREE_FILE).write_bytes(content)
    for call in (tf.tree_metadata(backend, ckdir), tree_read.read(backend, ckdir)):
        with pytest.raises(ValueError, match=match) as info:
            asyncio.run(call)
        assert str(Path(str(ckdir)) / tf.TREE_FILE) in str(info.value)


def test_missing_tree_file(backend: Any, ckdir: UPath) -> None:
    with pytest.raises(FileNotFoundError):
        load(backend, ckdir)


def test_array_disagreeing_with_metadata(backend: Any, ckdir: UPath) -> None:
    save(backend, ckdir, {"a": np.zeros((2, 2), np.float32)})
    path = Path(str(ckdir)) / tf.TREE_FILE
    doc = json.loads(path.read_text())
    doc["leaves"][0]["shape"] = [4]
    path.write_text(json.dumps(doc))
    # The manifest records the tree document: an edited one is corrupt.
    with pytest.raises(CorruptCheckpointError, match=r"_TREE\.json: has"):
        asyncio.run(tree_read.read(backend, ckdir))
    # Without a manifest (a checkpoint from before manifests) the arrays are checked.
    del doc["manifest"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"Leaf 'a'.*float32\(2, 2\).*metadata says"):
        load(backend, ckdir)


def test_sharded_cpu_arrays(tmp_path: Path) -> None:
    """Multi-device (forced host platform) sharded and replicated arrays, in a subprocess."""
    script = textwrap.dedent(
        f"""
        import asyncio
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from upath import UPath
        from ckpt import tree_format as tf, tree_read, tree_snapshot, tree_write
        from ckpt_backend_local import LocalBackend
        backend = LocalBackend()
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
        host = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
        tree = {{
            "sharded": jax.device_put(host, NamedSharding(mesh, P("x", "y"))),
            "rows": jax.device_put(host, NamedSharding(mesh, P("x"))),
            "replicated": jax.device_put(host, NamedSharding(mesh, P())),
        }}
        d = UPath({str(tmp_path / "ck")!r})
        tf.CHUNK_BYTES = 48  # chunks that do not align with the shards
        asyncio.run(tree_write.write(backend, d, tree_snapshot.prepare(tree)))
        target = {{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                  for k, v in tree.items()}}
        out = asyncio.run(tree_read.read(backend, d, target))
        for k, v in out.items():
            assert v.sharding == tree[k].sharding, k
            np.testing.assert_array_equal(np.asarray(v), host)
        print("OK")
        """
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_prepare_without_copy_references_numpy_arrays(backend: Any, ckdir: UPath) -> None:
    x = np.arange(4, dtype=np.int64)
    prepared = tree_snapshot.prepare({"x": x}, copy=False)
    x[0] = 42  # visible: the caller promised not to do this before write() returns
    asyncio.run(tree_write.write(backend, ckdir, prepared))
    assert load(backend, ckdir)["x"].tolist() == [42, 1, 2, 3]


def test_jax_restore_outlives_host_buffers(backend: Any, ckdir: UPath) -> None:
    """On CPU the restored jax array may alias the host buffer read; it must stay valid."""
    import gc

    expected = sample(np.float32, (64, 33))
    save(backend, ckdir, {"w": expected, "e": np.zeros((0, 3), np.float32)})
    target = {
        "w": jax.ShapeDtypeStruct(expected.shape, expected.dtype),
        "e": jax.ShapeDtypeStruct((0, 3), jnp.float32),
    }
    out = load(backend, ckdir, target)
    gc.collect()
    junk = [np.full(1 << 16, 7.0) for _ in range(16)]
    assert_same_array(out["w"], expected)
    assert_same_array(jnp.array(out["w"], copy=True), expected)
    assert out["e"].shape == (0, 3)
    del junk


def test_accelerator_path_copies_on_device(
    backend: Any, ckdir: UPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The non-CPU path (device copy + async host transfer), exercised on CPU."""
    monkeypatch.setattr(tree_snapshot, "_is_cpu", lambda x: False)
    a = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    prepared = tree_snapshot.prepare({"a": a, "b": jnp.ones(3, jnp.bfloat16)})
    assert isinstance(prepared.arrays[0].data, jax.Array)
    assert prepared.arrays[0].data is not a
    a.delete()  # the caller donates the original right after save returns
    asyncio.run(tree_write.write(backend, ckdir, prepared))
    out = load(backend, ckdir)
    assert_same_array(out["a"], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert_same_array(out["b"], np.ones(3, ml_dtypes.bfloat16))


def test_non_native_byte_order(backend: Any, ckdir: UPath) -> None:
    x = np.arange(5, dtype=">i4")
    out = roundtrip(backend, ckdir, {"x": x})
    assert out["x"].dtype == np.dtype("int32") and out["x"].tolist() == list(range(5))


def test_large_arrays_are_plain_chunks(backend: Any, ckdir: UPath) -> None:
    """No sharding: each chunk file holds exactly the chunk's bytes (direct reads)."""
    x = sample(np.float32, (2048, 1024))  # 8 MB: tensorstore would shard it by default
    save(backend, ckdir, {"x": x})
    array_dir = Path(str(ckdir)) / "arrays/0"
    zarr = json.loads((array_dir / "zarr.json").read_text())
    assert [c["name"] for c in zarr["codecs"]] == ["bytes"]
    assert (array_dir / "c/0/0").read_bytes() == x.tobytes()


@pytest.fixture
def direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the direct read opened (the wrapped ``_read_file_into``)."""
    opened: list[str] = []
    real = direct_read._read_file_into

    def spy(path: str, *args: Any) -> None:
        opened.append(path)
        real(path, *args)

    monkeypatch.setattr(direct_read, "_read_file_into", spy)
    return opened


def test_direct_reads_match_tensorstore(
    backend: Any, ckdir: UPath, monkeypatch: pytest.MonkeyPatch, direct_reads: list[str]
) -> None:
    monkeypatch.setattr(tf, "CHUNK_BYTES", 1000)
    tree: dict[str, Any] = {np.dtype(d).name: sample(d, (50, 3)) for d in DTYPES}
    tree["rows"] = sample(np.float32, (100, 7))  # 35 rows a chunk, a partial edge chunk
    tree["zeros"] = np.zeros((90, 4), np.float64)  # chunks equal to the fill value: stored
    tree["mixed"] = np.concatenate([np.zeros((40, 5)), np.ones((40, 5))])  # one chunk missing
    tree["neg_zero"] = np.full((3, 2), -0.0, np.float32)
    tree["zero_d"] = np.array(2.5)
    tree["wide"] = sample(np.int16, (3, 2000))  # split along axis 1: tensorstore
    save(backend, ckdir, tree)
    arrays = {key: f"arrays/{i}/" for i, key in enumerate(tree)}
    zeros_dir = Path(str(ckdir)) / arrays["zeros"]
    # Every chunk is stored, also one equal to the fill value (a missing one is corrupt).
    stored = sorted(f.name for f in zeros_dir.rglob("*") if f.is_file())
    assert stored == ["0", "0", "0", "zarr.json"]
    fast = load(backend, ckdir)
    target = dict(tree, rows=jax.ShapeDtypeStruct((100, 7), jnp.float32))
    fast_jax = load(backend, ckdir, target)
    read_dirs = {os.path.relpath(p, str(ckdir)).split(os.sep)[1] for p in direct_reads}
    assert read_dirs == {a.split("/")[1] for k, a in arrays.items() if k != "wide"}
    monkeypatch.setattr(tf, "DIRECT_LOCAL_READS", False)
    slow = load(backend, ckdir)
    for key, value in tree.items():
        assert_same_array(fast[key], value)
        assert_same_array(slow[key], value)
    assert isinstance(fast_jax["rows"], jax.Array)
    assert_same_array(fast_jax["rows"], tree["rows"])


def as_written_before_manifests(ckdir: UPath) -> None:
    """Make ``ckdir`` look like a tree saved before integrity manifests existed."""
    path = Path(str(ckdir)) / tf.TREE_FILE
    doc = json.loads(path.read_text())
    del doc["manifest"]
    path.write_text(json.dumps(doc))
    (Path(str(ckdir)) / MANIFEST_FILE).unlink()


def test_sharded_arrays_are_read_with_tensorstore(
    backend: Any, ckdir: UPath, monkeypatch: pytest.MonkeyPatch, direct_reads: list[str]
) -> None:
    """Arrays written with a sharded layout (ckpt before plain chunks) still read."""
    import tensorstore as ts

    real_layout = ts.ChunkLayout

    def sharded(chunk_shape: list[int]) -> Any:
        return real_layout(write_chunk_shape=chunk_shape, read_chunk_shape=[1] * len(chunk_shape))

    monkeypatch.setattr(tree_write.ts, "ChunkLayout", sharded)
    x = sample(np.float32, (6, 4))
    save(backend, ckdir, {"x": x})
    monkeypatch.setattr(tree_write.ts, "ChunkLayout", real_layout)
    as_written_before_manifests(ckdir)
    zarr = json.loads((Path(str(ckdir)) / "arrays/0/zarr.json").read_text())
    assert [c["name"] for c in zarr["codecs"]] == ["sharding_indexed"]
    assert_same_array(load(backend, ckdir)["x"], x)
    assert direct_reads == []


def test_truncated_chunk_file_is_an_error(backend: Any, ckdir: UPath) -> None:
    save(backend, ckdir, {"x": sample(np.float32, (8, 8))})
    chunk = Path(str(ckdir)) / "arrays/0/c/0/0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    with pytest.raises(ValueError):
        load(backend, ckdir)


def test_no_reference_cycles_keep_arrays_alive(backend: Any, ckdir: UPath) -> None:
    """Dropped snapshots and restored trees are freed at once, not at the next GC pass."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        prepared = tree_snapshot.prepare({"a": {"x": np.ones(10)}, "b": [np.zeros(3)]})
        snapshot = weakref.ref(prepared.arrays[0].data)
        asyncio.run(tree_write.write(backend, ckdir, prepared))
        del prepared
        assert snapshot() is None
        out = load(backend, ckdir)
        restored = weakref.ref(out["a"]["x"])
        del out
        assert restored() is None
    finally:
        gc.enable()


def _after_listing(monkeypatch: pytest.MonkeyPatch, action: Any) -> None:
    """Run ``action()`` right after the read's size check (the listing) has passed."""
    check_sizes = tree_integrity._Integrity.check_sizes

    async def then(self: Any, tree_raw: bytes) -> None:
        await check_sizes(self, tree_raw)
        action()

    monkeypatch.setattr(tree_integrity._Integrity, "check_sizes", then)


@pytest.mark.parametrize("assume", [True, False])
def test_tensorstore_reads_open_arrays_from_the_recorded_metadata(
    backend: Any, ckdir: UPath, monkeypatch: pytest.MonkeyPatch, assume: bool
) -> None:
    """Reads through tensorstore (object stores) take dtype, shape and chunks from the
    tree document when the manifest's record of zarr.json matches them: no zarr.json
    request; with ASSUME_RECORDED_METADATA off, zarr.json is read as before."""
    monkeypatch.setattr(tf, "DIRECT_LOCAL_READS", False)
    monkeypatch.setattr(tf, "ASSUME_RECORDED_METADATA", assume)
    monkeypatch.setattr(tf, "CHUNK_BYTES", 64)  # "rows": 7 chunks, the last one partial
    tree = {"rows": sample(np.float32, (25, 3)), "one": sample(np.int16, (4, 2))}
    save(backend, ckdir, tree)
    zarr_json = Path(str(ckdir)) / "arrays/0/zarr.json"
    recorded = zarr_json.read_bytes()
    _after_listing(monkeypatch, zarr_json.unlink)  # gone once the listing has seen it
    if assume:
        out = load(backend, ckdir)
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in tree.items()}
        zarr_json.write_bytes(recorded)  # and again for the read to jax
        as_jax = load(backend, ckdir, target)
        for key, value in tree.items():
            assert_same_array(out[key], value)
            assert out[key].flags.writeable
            assert isinstance(as_jax[key], jax.Array)
            assert_same_array(as_jax[key], value)
    else:
        with pytest.raises(ValueError, match="cannot open array"):
            load(backend, ckdir)


def test_tensorstore_read_of_a_chunk_lost_after_the_listing_is_corrupt(
    backend: Any, ckdir: UPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk deleted between the listing and the read is a CorruptCheckpointError
    naming the file, never zeros."""
    monkeypatch.setattr(tf, "DIRECT_LOCAL_READS", False)
    monkeypatch.setattr(tf, "CHUNK_BYTES", 64)
    tree = {"rows": sample(np.float32, (25, 3))}
    save(backend, ckdir, tree)
    chunk = Path(str(ckdir)) / "arrays/0/c/3/0"
    _after_listing(monkeypatch, chunk.unlink)
    with pytest.raises(CorruptCheckpointError, match=r"arrays/0/c/3/0: missing") as info:
        load(backend, ckdir)
    assert info.value.leaf == "rows"


def test_damaged_zarr_json_record_falls_back_to_reading_zarr_json(
    backend: Any, ckdir: UPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metadata that does not serialize to the recorded zarr.json (another tensorstore's
    JSON, say) is not assumed: zarr.json is read and checked against the tree document."""
    monkeypatch.setattr(tf, "DIRECT_LOCAL_READS", False)
    tree = {"x": sample(np.float32, (6, 4))}
    save(backend, ckdir, tree)
    opened: list[bool] = []
    real_open = tree_read.ts.open

    def spy(spec: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(bool(kwargs.get("assume_metadata")))
        return real_open(spec, *args, **kwargs)

    monkeypatch.setattr(tree_read.ts, "open", spy)
    monkeypatch.setattr(tree_read, "_zarr_json", lambda store: b"{}")  # never the recorded bytes
    assert_same_array(load(backend, ckdir)["x"], tree["x"])
    assert opened == [True, False]
