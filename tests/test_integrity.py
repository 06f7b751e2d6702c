"""The integrity manifest on local disk: the issue's example, partial saves, forced
overwrites, configuration, and `ckpt verify` on checkpoints with nothing to verify against.
(Every kind of damage to every kind of file, on every backend: the conformance suite's
ckpt_conformance/integrity.py.)"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import ckpt
from ckpt.cli import app
from ckpt.manifest import Manifest, crc32c


def verify(path: Path | str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["verify", str(path)], env={"COLUMNS": "400"})
    return result.exit_code, result.output


def manifest_of(path: Path) -> Manifest:
    return Manifest.from_bytes((path / ckpt.MANIFEST_FILE).read_bytes(), str(path))


@pytest.mark.parametrize("packed", [True, False])
def test_lost_chunk_file_is_an_error_not_zeros(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """The issue's example: the file holding a leaf's data lost; restore used to return
    0.0. Small leaves live in a pack file, larger ones in zarr chunk files."""
    from ckpt import tree_format

    if not packed:
        monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", 16)
    c = tmp_path / "c"
    ckpt.Checkpointer().save(c / "7", {"w": np.full((4, 8), 5.0, np.float32)})
    pattern = "7/packed/0" if packed else "7/arrays/0/c/*/*"
    (lost,) = glob.glob(str(c / pattern))
    os.remove(lost)
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        ckpt.Checkpointer().restore(c / "7")
    assert info.value.leaf == "w"
    assert info.value.file == lost
    assert str(c / "7") in str(info.value) and "missing" in str(info.value)
    code, out = verify(c / "7")
    assert code == 1 and f"CORRUPT {lost}: missing" in out


def test_manifest_matches_the_stored_bytes(tmp_path: Path) -> None:
    tree = {
        "a": np.arange(10_000, dtype=np.float64).reshape(100, 100),
        "z": np.zeros((5, 3), np.int8),  # equal to the fill value: stored all the same
        "s": np.float32(3.5),
        "empty": np.zeros((0, 4), np.float32),
        "n": 7,
    }
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    manifest = manifest_of(tmp_path / "1")
    on_disk = {
        os.path.relpath(os.path.join(d, f), tmp_path / "1")
        for d, _, files in os.walk(tmp_path / "1")
        for f in files
    }
    # Every file but the commit marker and the manifest itself is recorded.
    assert set(manifest.files) == on_disk - {ckpt.MANIFEST_FILE, ckpt.COMMIT_SUCCESS_FILE}
    for rel, record in manifest.files.items():
        data = (tmp_path / "1" / rel).read_bytes()
        assert (record.size, record.crc32c) == (len(data), crc32c(data)), rel
    assert ckpt.METADATA_FILE in manifest.files and "_TREE.json" in manifest.files
    assert verify(tmp_path / "1")[0] == 0


def test_checksums_from_memory_match_edge_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge chunks are padded to the full chunk shape; arrays split along two axes."""
    from ckpt import tree_format

    monkeypatch.setattr(tree_format, "CHUNK_BYTES", 1000)
    rng = np.random.default_rng(1)
    tree = {
        "rows": rng.standard_normal((101, 7)).astype(np.float32),  # a partial edge chunk
        "wide": rng.integers(0, 100, (3, 2000)).astype(np.int16),  # split along axis 1
        "bf16": rng.standard_normal((33, 5)).astype(ckpt_bf16()),
    }
    ckpt.Checkpointer().save(tmp_path / "1", tree)
    assert verify(tmp_path / "1")[0] == 0
    out = ckpt.Checkpointer(verify_checksums=True).restore(tmp_path / "1")
    for key, value in tree.items():
        assert np.array_equal(out[key], value)


def ckpt_bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def test_partial_save_merges_the_pieces_manifests(tmp_path: Path) -> None:
    path = tmp_path / "p"
    ckpt.partial.save(path, {"a": np.arange(6.0)})
    ckpt.partial.save(path, {"b": np.ones((2, 2), np.int32)})
    ckpt.partial.finalize(path)
    manifest = manifest_of(path)
    pieces = {rel.split("/")[0] for rel in manifest.files if rel.startswith("piece-")}
    assert len(pieces) == 2
    assert verify(path)[0] == 0
    out = ckpt.Checkpointer(verify_checksums=True).restore(path)
    assert np.array_equal(out["a"], np.arange(6.0))
    chunk = next(rel for rel in manifest.files if rel.endswith("packed/0"))
    (path / chunk).write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpointError, match="has 0 bytes"):
        ckpt.Checkpointer().restore(path)
    assert verify(path)[0] == 1


def test_forced_overwrite_keeps_the_manifest_true(tmp_path: Path) -> None:
    ckptr = ckpt.Checkpointer()
    ckptr.save(tmp_path / "1", {"w": np.zeros(100), "old": np.ones(3)})
    ckptr.save(tmp_path / "1", {"w": np.arange(10.0)}, force=True)
    manifest = manifest_of(tmp_path / "1")
    assert not any("arrays/1/" in rel for rel in manifest.files)
    assert verify(tmp_path / "1")[0] == 0
    assert np.array_equal(ckptr.restore(tmp_path / "1")["w"], np.arange(10.0))


def test_verify_checksums_comes_from_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt.Checkpointer().save(tmp_path / "1", {"w": np.arange(1000.0)})
    chunk = tmp_path / "1/packed/0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    monkeypatch.chdir(tmp_path)
    assert ckpt.Checkpointer().restore(tmp_path / "1")["w"][12] != 12.0  # size unchanged
    (tmp_path / "ckpt.toml").write_text("verify_checksums = true\n")
    with pytest.raises(ckpt.CorruptCheckpointError, match="CRC32C"):
        ckpt.Checkpointer().restore(tmp_path / "1")
    with pytest.raises(ckpt.CorruptCheckpointError, match="CRC32C"):
        ckpt.CheckpointManager(tmp_path, async_save=False).restore(1)
    # The argument beats the config file, the environment beats the file.
    assert ckpt.Checkpointer(verify_checksums=False).restore(tmp_path / "1") is not None
    monkeypatch.setenv("CKPT_VERIFY_CHECKSUMS", "0")
    assert ckpt.Checkpointer().restore(tmp_path / "1") is not None
    monkeypatch.setenv("CKPT_VERIFY_CHECKSUMS", "maybe")
    with pytest.raises(ValueError, match=r"verify_checksums.*CKPT_VERIFY_CHECKSUMS"):
        ckpt.Checkpointer().restore(tmp_path / "1")


def test_verify_says_when_there_is_nothing_to_verify_against(tmp_path: Path) -> None:
    ckpt.Checkpointer().save(tmp_path / "1", {"w": np.ones(3)})
    # As saved before manifests existed: no manifest, and a tree document claiming none.
    doc = json.loads((tmp_path / "1/_TREE.json").read_text())
    del doc["manifest"]
    (tmp_path / "1/_TREE.json").write_text(json.dumps(doc))
    (tmp_path / "1" / ckpt.MANIFEST_FILE).unlink()
    code, out = verify(tmp_path / "1")
    assert code == 2 and "UNVERIFIED" in out and "before integrity manifests" in out
    assert np.array_equal(ckpt.Checkpointer().restore(tmp_path / "1")["w"], np.ones(3))
    # A manifest that went missing, while the tree document says one was written.
    ckpt.Checkpointer().save(tmp_path / "2", {"w": np.ones(3)})
    (tmp_path / "2" / ckpt.MANIFEST_FILE).unlink()
    code, out = verify(tmp_path / "2")
    assert code == 1 and "CORRUPT" in out
    with pytest.raises(ckpt.CorruptCheckpointError, match="manifest"):
        ckpt.Checkpointer().restore(tmp_path / "2")


def test_verify_on_an_orbax_checkpoint(tmp_path: Path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.StandardSave({"w": np.ones(3)}))
        manager.wait_until_finished()
    code, out = verify(tmp_path / "3")
    assert code == 2 and "UNVERIFIED" in out and "another tool" in out


def test_lost_tree_document_with_a_manifest_is_corrupt(tmp_path: Path) -> None:
    ckpt.Checkpointer().save(tmp_path / "1", {"w": np.ones(3)})
    (tmp_path / "1/_TREE.json").unlink()
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"_TREE\.json: missing"):
        ckpt.Checkpointer().restore(tmp_path / "1")


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("damage", ["unrecorded", "unrecorded_and_flipped", "unrecorded_and_lost"])
def test_file_the_tree_needs_but_the_manifest_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packed: bool, damage: str
) -> None:
    """A manifest that does not record a file the tree document needs (hand-edited or
    damaged) cannot vouch for that file's data: restore (with and without checksums) and
    ``ckpt verify`` report it as corrupt, naming the file, instead of returning unproven
    bytes (or, with checksums, failing with a KeyError)."""
    from ckpt import tree_format

    if not packed:
        monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", 16)
    step = tmp_path / "c" / "7"
    ckpt.Checkpointer().save(step, {"w": np.full((4, 8), 5.0, np.float32), "n": 3})
    rel = "packed/0" if packed else "arrays/0/c/0/0"
    doc = json.loads((step / ckpt.MANIFEST_FILE).read_bytes())
    del doc["files"][rel]
    (step / ckpt.MANIFEST_FILE).write_text(json.dumps(doc))
    if damage == "unrecorded_and_flipped":
        data = bytearray((step / rel).read_bytes())
        data[0] ^= 0xFF
        (step / rel).write_bytes(bytes(data))
    elif damage == "unrecorded_and_lost":
        (step / rel).unlink()
    for verify_checksums in (False, True):
        with pytest.raises(ckpt.CorruptCheckpointError) as info:
            ckpt.Checkpointer(verify_checksums=verify_checksums).restore(step)
        assert info.value.file == str(step / rel)
        assert "not recorded in the manifest" in str(info.value)
    code, out = verify(step)
    assert code == 1 and f"CORRUPT {step / rel}" in out, out
    assert "not recorded in the manifest" in out
