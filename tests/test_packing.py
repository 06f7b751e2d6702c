"""Small array leaves packed into a few files (format version 2), on local disk; S3 request
counts for packs are in backends/s3/tests/test_s3_packing.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest

import ckpt
from ckpt import tree_format, tree_read


def many_leaves(n: int = 300) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    dtypes = [np.float32, ml_dtypes.bfloat16, np.float16, np.int8, np.bool_, np.complex64]
    tree: dict[str, Any] = {}
    for i in range(n):
        shape = (int(rng.integers(0, 40)), int(rng.integers(1, 5)))
        tree[f"l{i:03d}"] = rng.standard_normal(shape).astype(dtypes[i % len(dtypes)])
    tree["scalar"] = np.int32(7)
    tree["zero_d"] = np.array(2.5, np.float64)
    tree["empty"] = np.zeros((0, 3), np.float32)
    tree["big"] = rng.standard_normal(tree_format.PACK_MAX_LEAF_BYTES // 4 + 1).astype(
        np.float32
    )  # over the threshold: its own zarr array
    return tree


def same(a: Any, b: Any) -> None:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def test_small_leaves_share_a_few_files(tmp_path: Path) -> None:
    tree = many_leaves()
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    files = sorted(
        p.relative_to(tmp_path / "1").as_posix() for p in (tmp_path / "1").rglob("*") if p.is_file()
    )
    arrays = {f.split("/")[1] for f in files if f.startswith("arrays/")}
    assert [f for f in files if f.startswith("packed/")] == ["packed/0"]
    assert len(arrays) == 1  # only "big"
    doc = json.loads((tmp_path / "1/_TREE.json").read_text())
    assert doc["version"] == 2
    packed = [leaf for leaf in doc["leaves"] if "offset" in leaf]
    assert len(packed) == len(tree) - 1
    assert all(leaf["offset"] % 64 == 0 for leaf in packed)
    for restored in (
        ckpt.Checkpointer().restore(tmp_path / "1"),
        ckpt.Checkpointer(verify_checksums=True).restore(tmp_path / "1"),
    ):
        same(restored, tree)
        assert isinstance(restored["scalar"], np.int32)


def test_pack_files_split_at_their_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tree_format, "PACK_FILE_BYTES", 4096)
    tree = {f"x{i}": np.full(300, i, np.float32) for i in range(20)}  # 1,200 bytes each
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    packs = sorted(p.name for p in (tmp_path / "1/packed").iterdir())
    assert len(packs) == 7  # three leaves (3 x 1,216 aligned bytes) per 4 KiB pack
    same(ckpt.Checkpointer().restore(tmp_path / "1"), tree)


def test_restore_to_jax_and_async_saves(tmp_path: Path) -> None:
    tree = {"w": jax.numpy.arange(12.0).reshape(3, 4), "b": jax.numpy.ones(4, jax.numpy.bfloat16)}
    with ckpt.AsyncCheckpointer() as ac:
        ac.save(tmp_path / "1", tree)
        ac.wait_until_finished()
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    out = ckpt.Checkpointer().restore(tmp_path / "1", target)
    assert all(isinstance(v, jax.Array) for v in out.values())
    same(out, tree)


def test_remote_read_path_reads_each_pack_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without direct local reads (as on object stores) a pack is read once for all its
    leaves."""
    from ckpt_backend_local import LocalBackend
    from ckpt_conformance.instrumented import InstrumentedBackend

    tree = many_leaves(50)
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    monkeypatch.setattr(tree_format, "DIRECT_LOCAL_READS", False)
    backend = InstrumentedBackend(LocalBackend())
    same(ckpt.Checkpointer(backend=backend).restore(tmp_path / "1"), tree)
    reads = [p for op, p in backend.log if op == "read_bytes"]
    assert reads.count("0") == 1, reads  # the one pack file, packed/0


@pytest.mark.parametrize("held", [1, 2])
def test_remote_read_path_holds_a_bounded_number_of_packs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: int
) -> None:
    """Without direct local reads, at most PACK_WRITE_CONCURRENCY packs are held at once
    (read and not yet released), and the restore completes with every leaf exact."""
    from ckpt_backend_local import LocalBackend

    monkeypatch.setattr(tree_format, "PACK_FILE_BYTES", 4096)
    tree = {f"x{i}": np.full(300, i, np.float32) for i in range(20)}  # 7 packs
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    monkeypatch.setattr(tree_format, "DIRECT_LOCAL_READS", False)
    monkeypatch.setattr(tree_format, "PACK_WRITE_CONCURRENCY", held)
    peak = 0
    real_init = tree_read._PackReader.__init__

    def spying_init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        real_load = self._load

        async def load(rel: str) -> Any:
            nonlocal peak
            raw = await real_load(rel)
            peak = max(peak, len(self.holding))
            return raw

        self._load = load

    monkeypatch.setattr(tree_read._PackReader, "__init__", spying_init)
    same(ckpt.Checkpointer(backend=LocalBackend()).restore(tmp_path / "1"), tree)
    assert 1 <= peak <= held


def test_partial_saves_with_packs(tmp_path: Path) -> None:
    ckpt.partial.save(tmp_path / "p", {"a": np.arange(5.0), "n": {"x": np.ones(3, np.int8)}})
    ckpt.partial.save(tmp_path / "p", {"b": np.zeros(2)})
    ckpt.partial.finalize(tmp_path / "p")
    out = ckpt.Checkpointer(verify_checksums=True).restore(tmp_path / "p")
    assert np.array_equal(out["a"], np.arange(5.0)) and out["n"]["x"].dtype == np.int8


def test_version_1_checkpoints_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved before packs (format 1: a zarr array per leaf) restores."""
    monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", -1)
    tree = {"w": np.arange(6.0), "s": np.float32(1)}
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    path = tmp_path / "1/_TREE.json"
    doc = json.loads(path.read_text())
    doc["version"] = 1
    del doc["manifest"]
    path.write_text(json.dumps(doc))
    (tmp_path / "1" / ckpt.MANIFEST_FILE).unlink()
    monkeypatch.undo()
    same(ckpt.Checkpointer().restore(tmp_path / "1"), tree)


def test_truncated_pack_is_corrupt(tmp_path: Path) -> None:
    tree = many_leaves(20)
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    pack = tmp_path / "1/packed/0"
    pack.write_bytes(pack.read_bytes()[:-10])
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"packed/0: has .* \(holds leaves"):
        ckpt.Checkpointer().restore(tmp_path / "1")
