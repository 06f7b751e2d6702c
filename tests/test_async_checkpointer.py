"""ckpt.AsyncCheckpointer: the blocking part, background write and commit, errors raised
exactly once by the next call, timeouts, ordering of saves, restores and callbacks."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from upath import UPath

import ckpt
from ckpt_backend_local import LocalBackend
from ckpt_conformance.instrumented import InstrumentedBackend


def wait_for(event: threading.Event, what: str) -> None:
    assert event.wait(10), f"timed out waiting for {what}"


def temporaries(root: Path) -> list[str]:
    return [n for n in os.listdir(root) if ".orbax-checkpoint-tmp" in n]


def run_in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn(*args))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


# -- the blocking part ---------------------------------------------------------------------------


def test_save_returns_before_write_and_commit(tmp_path: Path, backend: InstrumentedBackend) -> None:
    gate = backend.gate("write_bytes:_TREE.json")
    with ckpt.AsyncCheckpointer(backend=backend) as ckptr:
        ckptr.save(tmp_path / "1", {"w": np.arange(4)})
        wait_for(backend.entered["write_bytes:_TREE.json"], "the tree write")
        assert not (tmp_path / "1").exists()
        assert len(temporaries(tmp_path)) == 1
        gate.set()
        ckptr.wait_until_finished()
        assert (tmp_path / "1").exists() and temporaries(tmp_path) == []
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "1")["w"], np.arange(4))


def test_directory_created_in_background(tmp_path: Path, backend: InstrumentedBackend) -> None:
    gate = backend.gate("mkdir")
    ckptr = ckpt.AsyncCheckpointer(backend=backend)
    start = time.monotonic()
    ckptr.save(tmp_path / "1", {"v": 1})  # returns although creating the directory hangs
    assert time.monotonic() - start < 5
    wait_for(backend.entered["mkdir"], "the directory creation")
    assert os.listdir(tmp_path) == []
    gate.set()
    ckptr.close()
    assert ckpt.Checkpointer().restore(tmp_path / "1") == {"v": 1}


def test_caller_may_mutate_arrays_after_save(tmp_path: Path, backend: InstrumentedBackend) -> None:
    gate = backend.gate("write_bytes:_TREE.json")
    array = np.zeros(8)
    ckptr = ckpt.AsyncCheckpointer(backend=backend)
    ckptr.save(tmp_path / "1", {"a": array})
    array[:] = 5
    gate.set()
    np.testing.assert_array_equal(ckptr.restore(tmp_path / "1")["a"], np.zeros(8))
    ckptr.close()


def test_validation_errors_raised_by_save(tmp_path: Path) -> None:
    ckptr = ckpt.AsyncCheckpointer()
    ckptr.save(tmp_path / "1", {"v": 1})
    ckptr.wait_until_finished()
    with pytest.raises(ValueError, match="already exists"):
        ckptr.save(tmp_path / "1", {"v": 2})
    with pytest.raises(TypeError, match="unsupported"):
        ckptr.save(tmp_path / "2", {"v": object()})
    ckptr.close()


# -- errors: raised once, by the next call --------------------------------------------------------


def _failing(tmp_path: Path) -> tuple[ckpt.AsyncCheckpointer, InstrumentedBackend]:
    backend = InstrumentedBackend(LocalBackend())
    backend.fail_on["write_bytes:_TREE.json"] = OSError("injected storage error")
    ckptr = ckpt.AsyncCheckpointer(backend=backend)
    ckptr.save(tmp_path / "1", {"v": np.ones(2)})  # the error happens in the background
    return ckptr, backend


def test_error_raised_once_by_wait(tmp_path: Path) -> None:
    ckptr, _ = _failing(tmp_path)
    with pytest.raises(OSError, match="injected storage error"):
        ckptr.wait_until_finished()
    ckptr.wait_until_finished()  # raised once only
    ckptr.check_for_errors()
    assert os.listdir(tmp_path) == []  # its temporary was discarded
    ckptr.close()


def test_collected_error_is_logged_once_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller gets the error with its traceback; the log only says it happened."""
    with caplog.at_level("DEBUG", logger="ckpt"):
        ckptr, _ = _failing(tmp_path)
        with pytest.raises(OSError, match="injected storage error"):
            ckptr.wait_until_finished()
        ckptr.close()
    failures = [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    (record,) = failures
    assert record.exc_info is None
    message = record.getMessage()
    assert "\n" not in message and "injected storage error" in message
    assert "raised by the next call" in message


def test_error_raised_once_by_check_for_errors(tmp_path: Path) -> None:
    ckptr, _ = _failing(tmp_path)
    deadline = time.monotonic() + 10
    with pytest.raises(OSError, match="injected"):
        while time.monotonic() < deadline:
            ckptr.check_for_errors()  # never blocks; raises once the save has failed
            time.sleep(0.01)
    ckptr.check_for_errors()
    ckptr.close()


def test_error_raised_by_next_save_which_does_not_start(tmp_path: Path) -> None:
    ckptr, backend = _failing(tmp_path)
    with pytest.raises(OSError, match="injected"):
        ckptr.save(tmp_path / "2", {"v": 2})
    backend.fail_on.clear()
    ckptr.wait_until_finished()
    assert os.listdir(tmp_path) == []
    ckptr.save(tmp_path / "2", {"v": 2})
    ckptr.close()
    assert ckpt.Checkpointer().restore(tmp_path / "2") == {"v": 2}


def test_error_raised_by_restore_and_close(tmp_path: Path) -> None:
    ckptr, _ = _failing(tmp_path)
    with pytest.raises(OSError, match="injected"):
        ckptr.restore(tmp_path / "1")
    ckptr.close()
    ckptr2, _ = _failing(tmp_path)
    with pytest.raises(OSError, match="injected"):
        ckptr2.close()


# -- timeout ---------------------------------------------------------------------------------------


def test_timeout_error_with_hints(tmp_path: Path, backend: InstrumentedBackend) -> None:
    backend.gate("write_bytes:_TREE.json")  # the store never answers
    ckptr = ckpt.AsyncCheckpointer(backend=backend, timeout_secs=0.3)
    ckptr.save(tmp_path / "1", {"v": np.ones(3)})
    with pytest.raises(TimeoutError) as info:
        ckptr.wait_until_finished()
    message = str(info.value)
    assert str(tmp_path / "1") in message and "timeout_secs=0.3" in message
    for hint in ("reachable", "throughput", "barrier", "phase; nothing was committed"):
        assert hint in message
    assert os.listdir(tmp_path) == []  # the temporary was discarded
    ckptr.close()


def test_storage_timeout_not_mistaken_for_ours(
    tmp_path: Path, backend: InstrumentedBackend
) -> None:
    backend.fail_on["write_bytes:_TREE.json"] = TimeoutError("socket timed out")
    ckptr = ckpt.AsyncCheckpointer(backend=backend, timeout_secs=60)
    ckptr.save(tmp_path / "1", {"v": 1})
    with pytest.raises(TimeoutError, match=r"^socket timed out$"):
        ckptr.wait_until_finished()
    ckptr.close()


class LoopBlockingBackend(LocalBackend):
    """A store whose call blocks the I/O event loop itself (a hung synchronous call)."""

    HANG_SECS = 3.0

    def __init__(self) -> None:
        super().__init__()
        self.blocked = False
        self.returned = threading.Event()

    async def write_bytes(self, path: UPath, data: bytes) -> None:
        if path.name == "_TREE.json" and not self.blocked:
            self.blocked = True
            time.sleep(self.HANG_SECS)
            self.returned.set()
        await super().write_bytes(path, data)


def test_hung_worker_abandoned_after_grace(tmp_path: Path) -> None:
    backend = LoopBlockingBackend()
    ckptr = ckpt.AsyncCheckpointer(backend=backend, timeout_secs=0.1)
    ckptr._HANG_GRACE_SECS = 0.1
    ckptr.save(tmp_path / "1", {"v": 1})
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timeout_secs=0\.1") as info:
        ckptr.wait_until_finished()
    assert not backend.returned.is_set()  # gave up before the hung call came back
    assert time.monotonic() - start < backend.HANG_SECS
    assert any("abandoned" in note for note in info.value.__notes__)
    assert backend.returned.wait(10)  # let the hung call return
    ckptr._timeout_secs = 60  # no flakes on a busy machine
    ckptr.save(tmp_path / "2", {"v": 2})  # on a new worker
    ckptr.close()
    assert ckpt.Checkpointer().restore(tmp_path / "2") == {"v": 2}


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ckpt.AsyncCheckpointer(timeout_secs=0)


# -- ordering --------------------------------------------------------------------------------------


def test_second_save_waits_for_first(tmp_path: Path, backend: InstrumentedBackend) -> None:
    gate = backend.gate("write_bytes:_TREE.json")
    ckptr = ckpt.AsyncCheckpointer(backend=backend)
    ckptr.save(tmp_path / "1", {"v": 1})
    wait_for(backend.entered["write_bytes:_TREE.json"], "the first save")
    thread, out = run_in_thread(ckptr.save, tmp_path / "2", {"v": 2})
    thread.join(0.3)
    assert thread.is_alive()  # blocked behind the first save
    gate.set()
    thread.join(10)
    assert out == [None]
    ckptr.close()
    assert ckpt.Checkpointer().restore(tmp_path / "1") == {"v": 1}
    assert ckpt.Checkpointer().restore(tmp_path / "2") == {"v": 2}


def test_restore_waits_for_pending_save(tmp_path: Path, backend: InstrumentedBackend) -> None:
    gate = backend.gate("rename_dir")
    ckptr = ckpt.AsyncCheckpointer(backend=backend)
    ckptr.save(tmp_path / "1", {"v": 1})
    thread, out = run_in_thread(ckptr.restore, tmp_path / "1")
    thread.join(0.3)
    assert thread.is_alive()
    gate.set()
    thread.join(10)
    assert out == [{"v": 1}]
    ckptr.close()


def test_post_finalization_callback_runs_after_commit(
    tmp_path: Path, backend: InstrumentedBackend
) -> None:
    order: list[str] = []

    def callback() -> None:
        assert (tmp_path / "1").exists(), "the commit must be visible"
        assert threading.current_thread() is not threading.main_thread()
        order.append("callback")

    ckptr = ckpt.AsyncCheckpointer(backend=backend, post_finalization_callback=callback)
    ckptr.save(tmp_path / "1", {"v": 1})
    ckptr.wait_until_finished()
    order.append("waited")
    assert order == ["callback", "waited"]
    assert ("rename_dir", "1") in backend.log
    ckptr.save(tmp_path / "2", {"v": 2})
    ckptr.close()
    assert order == ["callback", "waited", "callback"]


def test_post_finalization_callback_error_reported(tmp_path: Path) -> None:
    def callback() -> None:
        raise RuntimeError("callback broke")

    ckptr = ckpt.AsyncCheckpointer(post_finalization_callback=callback)
    ckptr.save(tmp_path / "1", {"v": 1})
    with pytest.raises(RuntimeError, match="callback broke") as info:
        ckptr.wait_until_finished()
    assert any("was committed" in note for note in info.value.__notes__)
    assert ckptr.restore(tmp_path / "1") == {"v": 1}
    ckptr.close()


def test_commit_file_in_background(tmp_path: Path) -> None:
    with ckpt.AsyncCheckpointer("commit_file") as ckptr:
        ckptr.save(tmp_path / "1", {"v": np.arange(3)}, custom_metadata={"k": "v"})
        assert ckptr.metadata(tmp_path / "1").custom_metadata == {"k": "v"}
        np.testing.assert_array_equal(ckptr.restore(tmp_path / "1")["v"], np.arange(3))
