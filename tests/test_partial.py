"""ckpt.partial: pieces committed by the strategy, merged and committed by finalize, and
every error case (collisions, existing or missing paths, failing commits)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckpt
from ckpt import _sync
from ckpt.partial import PIECE_PREFIX
from ckpt.partial import partial_save_path as _partial_save_path
from ckpt_backend_local import LocalBackend
from ckpt_conformance.instrumented import InstrumentedBackend

STRATEGIES = ["rename", "commit_file"]


@pytest.fixture(params=STRATEGIES)
def atomicity(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def partial_save_path(path: Path) -> Path:
    return Path(str(_partial_save_path(path)))


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def pieces(path: Path) -> list[str]:
    names = os.listdir(partial_save_path(path))
    return sorted(n for n in names if n.startswith(PIECE_PREFIX) and "." not in n)


def test_save_and_finalize(tmp_path: Path, atomicity: str) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(
        path, {"layer1": {"w": np.ones((2, 3))}, "step": 1}, atomicity=atomicity,
        custom_metadata={"a": 1, "shared": "first"},
    )  # fmt: skip
    handle = ckpt.partial.save_async(
        path, {"layer2": {"w": np.arange(4)}, "layer1": {"b": np.float32(2)}},
        atomicity=atomicity, custom_metadata={"b": 2, "shared": "second"},
    )  # fmt: skip
    handle.result()
    assert handle.done() and str(handle.piece).startswith(str(partial_save_path(path)))
    assert not path.exists()
    ckpt.partial.finalize(path, atomicity=atomicity)
    assert not partial_save_path(path).exists()
    ckptr = ckpt.Checkpointer(atomicity)
    restored = ckptr.restore(path)
    assert restored["step"] == 1
    np.testing.assert_array_equal(restored["layer1"]["w"], np.ones((2, 3)))
    assert restored["layer1"]["b"] == np.float32(2)
    np.testing.assert_array_equal(restored["layer2"]["w"], np.arange(4))
    meta = ckptr.metadata(path)
    assert meta.custom_metadata == {"a": 1, "b": 2, "shared": "second"}
    assert meta.init_timestamp_nsecs is not None
    assert meta.init_timestamp_nsecs <= (meta.commit_timestamp_nsecs or 0)
    assert ckpt.all_temporary_paths(tmp_path) == []


def test_finalize_accepts_partial_save_path(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": 1})
    ckpt.partial.finalize(partial_save_path(path))
    assert ckpt.Checkpointer().restore(path) == {"a": 1}


def test_rename_finalize_copies_no_data(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": np.ones(3)}, atomicity="rename")
    (piece,) = pieces(path)
    ckpt.partial.finalize(path, atomicity="rename")
    assert piece in os.listdir(path)  # the session directory became the checkpoint


def test_piece_is_a_committed_checkpoint(tmp_path: Path, atomicity: str) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": np.zeros(2)}, atomicity=atomicity)
    (piece,) = pieces(path)
    assert ckpt.is_path_finalized(partial_save_path(path) / piece, atomicity=atomicity)


# -- collisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "key"),
    [
        ({"a": {"w": 1}}, {"a": {"w": 2}}, "a/w"),
        ({"a": np.ones(2)}, {"a": {"w": 1}}, "a"),
        ({"a": {"w": 1}}, {"a": [1, 2]}, "a"),
    ],
)
def test_collision(
    tmp_path: Path, atomicity: str, first: dict[str, Any], second: dict[str, Any], key: str
) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, first, atomicity=atomicity)
    ckpt.partial.save(path, second, atomicity=atomicity)
    before = snapshot(partial_save_path(path))
    with pytest.raises(FileExistsError, match=f"File collision on '{key}' during finalize"):
        ckpt.partial.finalize(path, atomicity=atomicity)
    assert not path.exists()
    assert snapshot(partial_save_path(path)) == before


def test_collision_says_how_to_start_over_and_discard_does(
    tmp_path: Path, atomicity: str
) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": 1}, atomicity=atomicity)
    ckpt.partial.save(path, {"a": 2}, atomicity=atomicity)
    with pytest.raises(FileExistsError) as info:
        ckpt.partial.finalize(path, atomicity=atomicity)
    message = str(info.value)
    assert f"ckpt.partial.discard({str(path)!r})" in message
    assert str(partial_save_path(path)) in message
    assert ckpt.partial.discard(path) is True
    assert not partial_save_path(path).exists()
    assert ckpt.partial.discard(path) is False  # nothing left
    ckpt.partial.save(path, {"a": 3}, atomicity=atomicity)  # a fresh session works
    ckpt.partial.finalize(path, atomicity=atomicity)
    assert ckpt.Checkpointer(atomicity).restore(path) == {"a": 3}


def test_discard_never_removes_a_committed_checkpoint(tmp_path: Path, atomicity: str) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": np.ones(2)}, atomicity=atomicity)
    ckpt.partial.finalize(path, atomicity=atomicity)
    assert ckpt.partial.discard(path) is False
    assert ckpt.partial.discard(partial_save_path(path)) is False
    assert ckpt.path_state(path, atomicity=atomicity) is ckpt.PathState.FINALIZED
    assert ckpt.Checkpointer(atomicity).restore(path)["a"].tolist() == [1.0, 1.0]
    # A checkpoint someone saved under a session's name is not a session: left alone.
    other = tmp_path / "x.partial_save"
    ckpt.Checkpointer(atomicity).save(other, {"b": 1})
    with pytest.raises(ValueError, match="holds no partial save"):
        ckpt.partial.discard(tmp_path / "x")
    assert ckpt.Checkpointer(atomicity).restore(other) == {"b": 1}


# -- error cases -----------------------------------------------------------------------------


def test_finalize_when_path_exists(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": 1})
    ckpt.Checkpointer().save(path, {"other": 1})
    with pytest.raises(FileExistsError, match="already exists"):
        ckpt.partial.finalize(path)
    assert pieces(path)


def test_finalize_without_partial_save(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.partial.finalize(tmp_path / "ck")


def test_save_after_finalize(tmp_path: Path, atomicity: str) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": 1}, atomicity=atomicity)
    ckpt.partial.finalize(path, atomicity=atomicity)
    with pytest.raises(FileExistsError, match="already exists"):
        ckpt.partial.save(path, {"b": 1}, atomicity=atomicity)
    with pytest.raises(FileExistsError, match="already exists"):
        ckpt.partial.finalize(path, atomicity=atomicity)


def test_save_takes_a_dict(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="takes a dict"):
        ckpt.partial.save(tmp_path / "ck", [1, 2])  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_failing_commit_leaves_partial_dir_intact(tmp_path: Path, atomicity: str) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": np.ones(2)}, atomicity=atomicity)
    ckpt.partial.save(path, {"b": 2}, atomicity=atomicity)
    before = snapshot(partial_save_path(path))
    op = "rename_dir:ck" if atomicity == "rename" else "create_exclusive:commit_success.txt"
    backend = InstrumentedBackend(LocalBackend())
    backend.fail_on[op] = OSError("injected commit failure")
    with pytest.raises(OSError, match="injected commit failure"):
        ckpt.partial.finalize(path, atomicity=atomicity, backend=backend)
    assert snapshot(partial_save_path(path)) == before
    assert not ckpt.is_path_finalized(path, atomicity=atomicity)
    assert not path.exists() or os.listdir(path) == []  # commit_file: mkdir before the marker
    # at most that empty final directory is left, and it is recognised as a leftover
    assert [t.get().name for t in ckpt.all_temporary_paths(tmp_path)] in ([], ["ck"])
    ckpt.partial.finalize(path, atomicity=atomicity)  # a retry succeeds
    assert ckpt.Checkpointer(atomicity).restore(path)["b"] == 2


def test_interrupted_piece_is_ignored(tmp_path: Path, atomicity: str) -> None:
    path = tmp_path / "ck"
    ckpt.partial.save(path, {"a": 1}, atomicity=atomicity)
    crashed = ckpt.get_strategy(atomicity).from_final(
        partial_save_path(path) / f"{PIECE_PREFIX}9999999999999999999-1-abc"
    )
    _sync.run(crashed.create())  # a save that died before its commit
    ckpt.partial.finalize(path, atomicity=atomicity)
    assert ckpt.Checkpointer(atomicity).restore(path) == {"a": 1}
    assert not os.path.exists(crashed.get().path)


def test_no_committed_piece(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    partial_save_path(path).mkdir()
    with pytest.raises(FileNotFoundError, match="no committed partial save"):
        ckpt.partial.finalize(path)
