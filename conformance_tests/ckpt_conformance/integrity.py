"""Integrity conformance: a damaged file of a committed checkpoint is never read as data.

Each kind of file a save writes (an array chunk, an array's ``zarr.json``, a pack file of
small leaves, ``_TREE.json``,
``_CHECKPOINT_METADATA`` and the manifest itself) is deleted, truncated, extended or has one
byte flipped, out of band (plain fsspec, not the backend under test); then a restore must
raise :class:`ckpt.CorruptCheckpointError` (always for a changed size, and with
``verify_checksums`` for every change), and ``ckpt verify`` must exit non-zero naming the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ckpt

KINDS = ("chunk", "zarr.json", "pack", "_TREE.json", "_CHECKPOINT_METADATA", "manifest")
DAMAGES = ("delete", "truncate", "extend", "flip")


def _tree() -> dict[str, Any]:
    return {
        "w": np.arange(64, dtype=np.float32).reshape(8, 8),
        "b": np.full((3,), 7, np.int64),
        "step": 12,
    }


def _pick(files: list[str], kind: str) -> str:
    """The content-relative path of one file of ``kind`` among the manifest's ``files``."""
    if kind == "chunk":
        return next(f for f in files if "/c/" in f and f.startswith("arrays/"))
    if kind == "zarr.json":
        return next(f for f in files if f.endswith("/zarr.json"))
    if kind == "pack":
        return next(f for f in files if f.startswith("packed/"))
    if kind == "manifest":
        return ckpt.MANIFEST_FILE
    return kind


def _ckpt_verify(final: str, strategy: str) -> tuple[int, str]:
    """``ckpt verify`` (the real command, run in-process): exit code and output."""
    from typer.testing import CliRunner

    from ckpt.cli import app

    args = ["verify", final, "--atomicity", strategy]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    return result.exit_code, result.output


class IntegrityConformance:
    """Mixed into :class:`ckpt_conformance.BackendConformance` (its fixtures apply)."""

    @pytest.fixture(autouse=True)
    def _small_pack_threshold(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Leaves over 100 bytes get their own zarr array, smaller ones are packed: one
        small tree then holds every kind of file."""
        from ckpt import tree_format

        monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", 100)

    @pytest.fixture
    def default_strategy(self, root: str) -> str:
        """The backend's own strategy for ``root``: the damage matrix runs once per
        backend (every strategy's content layout is covered by
        ``test_manifest_records_every_file``)."""
        return ckpt.registry.resolve(root).name

    @staticmethod
    def _saved(root: str, strategy: str) -> tuple[str, str, list[str]]:
        """Save a tree; return (checkpoint URL, content URL, files in its manifest)."""
        from ckpt import _sync
        from ckpt.committed import content_path
        from ckpt.manifest import read_manifest

        final = f"{root}/7"
        ckpt.Checkpointer(strategy).save(final, _tree())
        backend = ckpt.get_backend(final)
        path = ckpt.registry.to_path(final)
        content = _sync.run(content_path(backend, path, atomicity=strategy))
        manifest = _sync.run(read_manifest(backend, content))
        assert manifest is not None, "every save records a manifest"
        return final, str(content), sorted(manifest.files)

    @staticmethod
    def _damage(raw: Any, url: str, damage: str) -> None:
        data = raw.cat(url)
        path = raw._p(url)
        if damage == "delete":
            raw.fs.rm_file(path)
        elif damage == "truncate":
            raw.fs.pipe_file(path, data[: len(data) // 2])
        elif damage == "extend":
            raw.fs.pipe_file(path, data + b"\x00garbage")
        else:
            pos = len(data) // 2
            raw.fs.pipe_file(path, data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1 :])
        raw.fs.invalidate_cache()

    def test_manifest_records_every_file(self, strategy: str, root: str, raw: Any) -> None:
        from ckpt import _sync
        from ckpt.manifest import crc32c, read_manifest

        _, content, files = self._saved(root, strategy)
        kinds = {_pick(files, k) for k in KINDS if k != "manifest"}
        assert kinds <= set(files)
        backend = ckpt.get_backend(content)
        manifest = _sync.run(read_manifest(backend, ckpt.registry.to_path(content)))
        assert manifest is not None
        for rel, record in manifest.files.items():
            data = raw.cat(f"{content}/{rel}")  # out of band: the bytes really stored
            assert (len(data), crc32c(data)) == (record.size, record.crc32c), rel

    @pytest.mark.parametrize("damage", DAMAGES)
    @pytest.mark.parametrize("kind", KINDS)
    def test_damaged_file_is_never_read_as_data(
        self, default_strategy: str, root: str, raw: Any, kind: str, damage: str
    ) -> None:
        strategy = default_strategy
        final, content, files = self._saved(root, strategy)
        rel = _pick(files, kind)
        self._damage(raw, f"{content}/{rel}", damage)
        # With checksums, every damage is caught, whatever the file.
        with pytest.raises(ckpt.CorruptCheckpointError) as info:
            ckpt.Checkpointer(strategy, verify_checksums=True).restore(final)
        assert final in str(info.value)
        if kind != "manifest":
            assert rel in str(info.value)
        if kind in ("chunk", "zarr.json"):
            assert info.value.leaf == "w"
        # Without checksums: a changed size or a missing file is always caught; the tree
        # document is always checked; a same-size flipped byte elsewhere is not (documented).
        plain = ckpt.Checkpointer(strategy, verify_checksums=False)
        if damage != "flip" or kind == "_TREE.json":
            with pytest.raises(ckpt.CorruptCheckpointError):
                plain.restore(final)
        elif kind in ("chunk", "pack"):
            restored = plain.restore(final)
            changed = [k for k in ("w", "b") if not np.array_equal(restored[k], _tree()[k])]
            assert len(changed) == 1
        code, out = _ckpt_verify(final, strategy)
        assert code == 1, out
        assert "CORRUPT" in out
        if kind != "manifest":  # a damaged manifest may name the entry it garbled instead
            assert rel in out

    def test_verify_passes_an_intact_checkpoint(self, default_strategy: str, root: str) -> None:
        strategy = default_strategy
        final, _, _ = self._saved(root, strategy)
        code, out = _ckpt_verify(final, strategy)
        assert code == 0, out
        assert out.startswith("OK")
        restored = ckpt.Checkpointer(strategy, verify_checksums=True).restore(final)
        assert np.array_equal(restored["w"], _tree()["w"]) and restored["step"] == 12
