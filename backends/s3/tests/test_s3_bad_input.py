"""Bad input on S3 (moto and SeaweedFS): dot segments in a root URL, a bucket that does not
exist, missing credentials, an upper-case scheme. Each is a clear error within seconds,
and nothing is written or deleted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import ckpt
import ckpt.plugins
from ckpt import _sync
from ckpt_backend_s3 import S3Backend

TREE = {"w": np.arange(4, dtype=np.float32), "step": 1}
#: A failure must be reported well within this (the bug it guards against was a hang).
LIMIT_S = 60.0


def _within(fn: Callable[[], Any], limit: float = LIMIT_S) -> BaseException | None:
    """Run ``fn`` in a daemon thread; return what it raised. Fails the test if it is still
    running after ``limit`` seconds (instead of hanging the suite)."""
    out: dict[str, BaseException | None] = {"exc": None}

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            out["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still running after {limit} s (a hang)"
    print(f"finished in {time.monotonic() - start:.1f} s")
    return out["exc"]


def test_dot_segments_in_the_root_are_refused(s3_root: str, s3_server: Any) -> None:
    for url in (f"{s3_root}/a/../b", f"{s3_root}/./b", f"{s3_root}/a//b"):
        with pytest.raises(ckpt.InvalidPathError, match="segment"):
            ckpt.Checkpointer().save(url, TREE)
        with pytest.raises(ckpt.InvalidPathError):
            ckpt.CheckpointManager(url)
    # The backend refuses such keys too, even when handed a path directly.
    backend = ckpt.get_backend(s3_root)
    from upath import UPath

    with pytest.raises(ckpt.InvalidPathError):
        _sync.run(backend.write_bytes(UPath(f"{s3_root}/a/../b/f"), b"1"))
    with pytest.raises(ckpt.InvalidPathError):
        backend.kvstore_spec(UPath(f"{s3_root}/x/./y"))
    assert s3_server.keys(s3_server.key_of(s3_root)) == []


def test_normalised_root_keeps_one_prefix(
    s3_root: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixed URL saves everything (ckpt's objects and tensorstore's) under one prefix,
    and a delete leaves nothing behind."""
    from ckpt import tree_format

    monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", -1)  # tensorstore writes "w"
    with ckpt.CheckpointManager(f"{s3_root}/b", async_save=False, max_to_keep=1) as mngr:
        mngr.save(1, TREE)
        mngr.save(2, TREE)
    prefix = s3_server.key_of(s3_root)
    keys = s3_server.keys(prefix)
    assert keys and all(k.startswith(f"{prefix}/b/") for k in keys), keys
    assert any(k.endswith("arrays/0/zarr.json") for k in keys)  # tensorstore's, same prefix
    assert not [k for k in keys if "/1/" in k or "/1.ckpt-writer-" in k], keys  # step 1 gone


def test_upper_case_scheme_works(s3_root: str) -> None:
    upper = "S3" + s3_root[2:]
    ckpt.Checkpointer().save(f"{upper}/1", TREE)
    out = ckpt.Checkpointer().restore(f"{s3_root}/1")
    np.testing.assert_array_equal(out["w"], TREE["w"])


def test_missing_bucket_is_a_clear_error_not_a_hang(s3_root: str, s3_server: Any) -> None:
    url = "s3://ckpt-no-such-bucket-7f3a/run"
    exc = _within(lambda: ckpt.Checkpointer().save(f"{url}/1", TREE))
    assert isinstance(exc, FileNotFoundError), repr(exc)
    assert "ckpt-no-such-bucket-7f3a" in str(exc) and "does not exist" in str(exc)
    assert "create it first" in str(exc) and s3_server.endpoint in str(exc)

    def manager() -> None:
        with ckpt.CheckpointManager(url, async_save=False) as mngr:
            mngr.save(1, TREE)

    exc = _within(manager)
    assert isinstance(exc, FileNotFoundError) and "ckpt-no-such-bucket-7f3a" in str(exc)
    exc = _within(lambda: ckpt.checkpoint_steps(url))
    assert isinstance(exc, FileNotFoundError) and "ckpt-no-such-bucket-7f3a" in str(exc)
    exc = _within(lambda: ckpt.Checkpointer().restore(f"{url}/1"))
    assert isinstance(exc, FileNotFoundError)


def test_async_save_to_a_missing_bucket(s3_root: str) -> None:
    def save() -> None:
        with ckpt.AsyncCheckpointer(timeout_secs=120) as ckptr:
            ckptr.save("s3://ckpt-no-such-bucket-7f3a/run/1", TREE)
            ckptr.wait_until_finished()

    exc = _within(save)
    assert exc is not None and "ckpt-no-such-bucket-7f3a" in str(exc), repr(exc)


def test_missing_credentials(s3_root: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.Checkpointer().save(f"{s3_root}/1", TREE)
    before = s3_server.keys(s3_server.key_of(s3_root))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    ckpt.plugins.manager.reset_instances()
    for call in (
        lambda: ckpt.Checkpointer().save(f"{s3_root}/2", TREE),
        lambda: ckpt.Checkpointer().restore(f"{s3_root}/1"),
        lambda: ckpt.checkpoint_steps(s3_root),
        lambda: ckpt.cleanup_temporary_paths(s3_root),
    ):
        exc = _within(call)
        assert isinstance(exc, PermissionError), repr(exc)
        message = str(exc)
        assert "No AWS credentials" in message and "AWS_ACCESS_KEY_ID" in message
        assert s3_root in message
    assert s3_server.keys(s3_server.key_of(s3_root)) == before  # nothing written or deleted


def test_unknown_and_odd_options(s3_server: Any) -> None:
    with pytest.raises(ckpt.ConfigError, match=r"Unknown .backends.s3. option.*endpoint"):
        S3Backend({"endpoint": s3_server.endpoint})
    with pytest.raises(ckpt.ConfigError, match=r"anon.*true or false"):
        S3Backend({"anon": "yes"})
    with pytest.raises(ckpt.ConfigError, match="http"):
        S3Backend({"endpoint_url": "127.0.0.1:9000"})
    with pytest.raises(ckpt.ConfigError, match="non-empty string"):
        S3Backend({"region": ""})
