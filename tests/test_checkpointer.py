"""ckpt.Checkpointer on the real local filesystem: round trips, force, refusal of missing
and incomplete checkpoints, step metadata, commit conflicts, failures, timings."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from upath import UPath

import ckpt
from ckpt import _sync
from ckpt.checkpointer import ITEM_HANDLERS
from ckpt_backend_local import LocalBackend
from ckpt_conformance.instrumented import InstrumentedBackend

STRATEGIES = ["rename", "commit_file"]


def tree() -> dict[str, Any]:
    return {
        "params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": jnp.ones(4)},
        "opt": [np.int64(7), (np.zeros(2, np.int8), None)],
        "step": 10,
        "lr": 0.5,
        "name": "run-1",
    }


def assert_tree_equal(actual: Any, expected: Any) -> None:
    assert str(jax.tree.structure(actual)) == str(jax.tree.structure(expected))
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        if isinstance(e, (np.ndarray, jax.Array, np.generic)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
            assert np.asarray(a).dtype == np.asarray(e).dtype
        else:
            assert a == e and type(a) is type(e)


def listing(path: Path) -> list[str]:
    """Names under ``path``; commit_file's writers directory only when it holds something."""
    names = sorted(os.listdir(path))
    writers = path / ".ckpt-writers"
    if writers.is_dir() and not os.listdir(writers):
        names.remove(".ckpt-writers")
    return names


def no_temporaries(root: Path) -> bool:
    return not ckpt.all_temporary_paths(root)


@pytest.fixture(params=STRATEGIES)
def atomicity(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def events() -> Iterator[list[str]]:
    seen: list[str] = []

    def listener(event: str, duration_secs: float, **kwargs: str | int) -> None:
        seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


# -- round trips ---------------------------------------------------------------------------


def test_round_trip(tmp_path: Path, atomicity: str) -> None:
    with ckpt.Checkpointer(atomicity) as ckptr:
        ckptr.save(tmp_path / "1", tree())
        assert_tree_equal(ckptr.restore(tmp_path / "1"), tree())
    assert ckpt.is_path_finalized(tmp_path / "1", atomicity=atomicity)
    assert ckpt.path_state(tmp_path / "1", atomicity=atomicity) == ckpt.PathState.FINALIZED
    if atomicity == "commit_file":
        assert listing(tmp_path / "1") == [ckpt.COMMIT_SUCCESS_FILE]
        assert len(os.listdir(tmp_path)) == 2  # the final name and the writers directory
    else:
        assert listing(tmp_path) == ["1"]
        assert {ckpt.METADATA_FILE, ckpt.COMMIT_SUCCESS_FILE, "_TREE.json"} <= set(
            os.listdir(tmp_path / "1")
        )


def test_restore_with_jax_target(tmp_path: Path) -> None:
    ckptr = ckpt.Checkpointer()
    ckptr.save(tmp_path / "c", {"w": jnp.arange(4.0), "n": np.ones(2)})
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "n": np.zeros(2)}
    restored = ckptr.restore(tmp_path / "c", target)
    assert isinstance(restored["w"], jax.Array)
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    with pytest.raises(ValueError, match="shape mismatch"):
        ckptr.restore(tmp_path / "c", {"w": jax.ShapeDtypeStruct((5,), jnp.float32), "n": 0})


def test_url_and_str_paths(tmp_path: Path) -> None:
    ckptr = ckpt.Checkpointer()
    ckptr.save(f"file://{tmp_path}/u", {"x": 1})
    assert ckptr.restore(str(tmp_path / "u")) == {"x": 1}


def test_unsupported_leaf_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bad"):
        ckpt.Checkpointer().save(tmp_path / "1", {"bad": object()})
    assert listing(tmp_path) == []


# -- existing destinations and force ---------------------------------------------------------


def test_existing_destination_refused(tmp_path: Path, atomicity: str) -> None:
    ckptr = ckpt.Checkpointer(atomicity)
    ckptr.save(tmp_path / "1", {"v": 1})
    with pytest.raises(ValueError, match=f"{tmp_path / '1'}.*already exists"):
        ckptr.save(tmp_path / "1", {"v": 2})
    assert ckptr.restore(tmp_path / "1") == {"v": 1}
    assert no_temporaries(tmp_path)


def test_force_replaces(tmp_path: Path, atomicity: str) -> None:
    ckptr = ckpt.Checkpointer(atomicity)
    ckptr.save(tmp_path / "1", {"v": np.ones(3)})
    ckptr.save(tmp_path / "1", {"v": np.zeros(2), "new": 1}, force=True)
    restored = ckptr.restore(tmp_path / "1")
    np.testing.assert_array_equal(restored["v"], np.zeros(2))
    assert restored["new"] == 1
    assert no_temporaries(tmp_path)
    assert len(os.listdir(tmp_path)) == (2 if atomicity == "commit_file" else 1)


@pytest.mark.parametrize("strategy", ["rename", "commit_file"])
def test_force_keeps_old_checkpoint_when_write_fails(tmp_path: Path, strategy: str) -> None:
    ckpt.Checkpointer(strategy).save(tmp_path / "1", {"v": 1})
    backend = InstrumentedBackend(LocalBackend())
    backend.fail_on["write_bytes:_TREE.json"] = OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        ckpt.Checkpointer(strategy, backend=backend).save(tmp_path / "1", {"v": 2}, force=True)
    assert ckpt.Checkpointer(strategy).restore(tmp_path / "1") == {"v": 1}
    assert no_temporaries(tmp_path)


# -- refusing missing and incomplete checkpoints ----------------------------------------------


def test_restore_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ckpt.Checkpointer().restore(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ckpt.Checkpointer().metadata(tmp_path / "nope")


def test_restore_temporary_refused(tmp_path: Path, atomicity: str) -> None:
    tmp = ckpt.get_strategy(atomicity).from_final(tmp_path / "1")
    _sync.run(tmp.create())
    with pytest.raises(ValueError, match=f"{tmp.get()}.*temporary"):
        ckpt.Checkpointer(atomicity).restore(tmp.get())


def test_restore_unmarked_directory_refused_under_commit_file(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "_TREE.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{tmp_path / '1'}.*'unknown'"):
        ckpt.Checkpointer("commit_file").restore(tmp_path / "1")


def test_restore_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "weights.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"_TREE\.json is missing"):
        ckpt.Checkpointer("rename").restore(tmp_path / "1")


# -- metadata ----------------------------------------------------------------------------------


def test_custom_metadata_and_timestamps(tmp_path: Path, atomicity: str) -> None:
    ckptr = ckpt.Checkpointer(atomicity)
    ckptr.save(tmp_path / "1", {"v": 1}, custom_metadata={"epoch": 3, "tag": ["a", "b"]})
    meta = ckptr.metadata(tmp_path / "1")
    assert meta.custom_metadata == {"epoch": 3, "tag": ["a", "b"]}
    assert meta.item_handlers == ITEM_HANDLERS
    assert meta.init_timestamp_nsecs is not None and meta.commit_timestamp_nsecs is not None
    assert 0 < meta.init_timestamp_nsecs <= meta.commit_timestamp_nsecs
    assert meta.performance_metrics["checkpointer_blocking_duration_secs"] >= 0
    content = _sync.run(ckpt.content_path(LocalBackend(), UPath(tmp_path / "1")))
    raw = json.loads((Path(content.path) / ckpt.METADATA_FILE).read_text())
    assert raw["custom_metadata"] == {"epoch": 3, "tag": ["a", "b"]}
    assert raw["commit_timestamp_nsecs"] == meta.commit_timestamp_nsecs


def test_bad_custom_metadata_rejected_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON-serializable"):
        ckpt.Checkpointer().save(tmp_path / "1", {"v": 1}, custom_metadata={"x": object()})
    with pytest.raises(ValueError, match="must be a dict"):
        ckpt.Checkpointer().save(tmp_path / "1", {"v": 1}, custom_metadata=[1])  # type: ignore[arg-type]
    assert listing(tmp_path) == []


# -- failures and conflicts ---------------------------------------------------------------------


def test_write_failure_discards_own_temporary(tmp_path: Path, atomicity: str) -> None:
    backend = InstrumentedBackend(LocalBackend())
    backend.fail_on["write_bytes:_TREE.json"] = OSError("injected")
    with pytest.raises(OSError, match="injected"):
        ckpt.Checkpointer(atomicity, backend=backend).save(tmp_path / "1", tree())
    assert listing(tmp_path) == []


def test_commit_conflict_surfaced(tmp_path: Path, atomicity: str) -> None:
    backend = InstrumentedBackend(LocalBackend())
    final = tmp_path / "1"

    async def other_writer_commits_first(path: UPath) -> None:
        await asyncio.to_thread(ckpt.Checkpointer(atomicity).save, final, {"winner": "other"})

    backend.before["write_bytes:_TREE.json"] = other_writer_commits_first
    with pytest.raises(ckpt.CommitConflictError, match=str(final)):
        ckpt.Checkpointer(atomicity, backend=backend).save(final, {"winner": "me"})
    assert ckpt.Checkpointer(atomicity).restore(final) == {"winner": "other"}
    assert no_temporaries(tmp_path)


def test_empty_unmarked_final_directory_does_not_block_commit_file(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()  # left by a crash between mkdir(final) and the marker
    ckpt.Checkpointer("commit_file").save(tmp_path / "1", {"v": 1})
    assert ckpt.Checkpointer("commit_file").restore(tmp_path / "1") == {"v": 1}


def test_closed_checkpointer_refuses_saves(tmp_path: Path) -> None:
    with ckpt.Checkpointer() as ckptr:
        pass
    with pytest.raises(ValueError, match="closed"):
        ckptr.save(tmp_path / "1", {"v": 1})


# -- timings ------------------------------------------------------------------------------------


def test_durations_recorded(tmp_path: Path, events: list[str]) -> None:
    ckptr = ckpt.Checkpointer()
    ckptr.save(tmp_path / "1", {"v": np.ones(2)})
    for phase in ("blocking", "directory_creation", "write", "commit", "total"):
        assert f"/ckpt/write/{phase}_secs" in events
    ckptr.restore(tmp_path / "1")
    assert "/ckpt/read/total_secs" in events
