"""Progress reporting of saves and restores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckpt
from ckpt import _progress, _sync, tree_format, tree_read, tree_snapshot, tree_write


def test_tree_format_reports_every_array_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", 100)  # "a" an array, "b" packed
    tree = {"a": np.ones((100, 10), np.float32), "b": [np.arange(7, dtype=np.int64)], "s": 3}
    total_bytes = 100 * 10 * 4 + 7 * 8
    calls: list[tuple[int, int]] = []
    backend = ckpt.get_backend(tmp_path)
    path = ckpt.registry.to_path(tmp_path / "t")
    _sync.run(
        tree_write.write(
            backend, path, tree_snapshot.prepare(tree), progress=lambda d, t: calls.append((d, t))
        )
    )
    assert {t for _, t in calls} == {total_bytes}
    assert sum(d for d, _ in calls) == total_bytes and len(calls) == 3  # start, array, pack
    calls.clear()
    _sync.run(tree_read.read(backend, path, progress=lambda d, t: calls.append((d, t))))
    assert sum(d for d, _ in calls) == total_bytes and {t for _, t in calls} == {total_bytes}


def test_checkpointer_with_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpointer = ckpt.Checkpointer(progress=True)
    checkpointer.save(tmp_path / "1", {"w": np.arange(1000.0)})
    restored = checkpointer.restore(tmp_path / "1")
    assert np.array_equal(restored["w"], np.arange(1000.0))


def test_auto_progress_only_for_large_trees_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _progress.wanted(True, 1) and not _progress.wanted(False, 1 << 40)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert _progress.wanted(None, _progress.AUTO_MIN_BYTES)
    assert not _progress.wanted(None, 1024)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert not _progress.wanted(None, 1 << 40)
