"""Array data on S3: tensorstore through S3Backend.kvstore_spec (the endpoint is passed
explicitly: tensorstore's s3 driver ignores AWS_ENDPOINT_URL)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import ckpt
from ckpt import _sync, tree_read, tree_snapshot, tree_write

ts = pytest.importorskip("tensorstore")


def test_zarr3_round_trip(s3_root: str, s3_server: Any) -> None:
    backend = ckpt.get_backend(s3_root)
    spec = {"driver": "zarr3", "kvstore": backend.kvstore_spec(backend.path(s3_root) / "arr")}
    assert spec["kvstore"]["endpoint"] == s3_server.endpoint
    data = np.arange(20, dtype=np.float32).reshape(4, 5)
    store = ts.open(spec, create=True, dtype=ts.float32, shape=[4, 5]).result()
    store.write(data).result()
    again = ts.open(spec).result()
    np.testing.assert_array_equal(again.read().result(), data)
    key = s3_server.key_of(s3_root)
    keys = s3_server.keys(key)
    assert f"{key}/arr/zarr.json" in keys
    assert any(k.startswith(f"{key}/arr/c") for k in keys)
    # The backend sees what tensorstore wrote.
    assert _sync.run(backend.tree_size(backend.path(s3_root) / "arr")) > data.nbytes


def test_tree_saved_through_commit_file(s3_root: str, s3_server: Any) -> None:
    tree: dict[str, Any] = {
        "params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4)},
        "step": 3,
        "name": "run-1",
    }
    tmp = ckpt.get_strategy("commit_file").from_final(f"{s3_root}/3")
    backend = tmp.backend
    _sync.run(tmp.create())
    prepared = tree_snapshot.prepare(tree)
    _sync.run(tree_write.write(backend, tmp.get() / "state", prepared))
    _sync.run(tmp.finalize())

    assert ckpt.checkpoint_steps(s3_root) == [3]
    content = _sync.run(ckpt.content_path(backend, backend.path(f"{s3_root}/3")))
    restored: Any = _sync.run(tree_read.read(backend, content / "state"))
    np.testing.assert_array_equal(restored["params"]["w"], tree["params"]["w"])
    np.testing.assert_array_equal(restored["params"]["b"], tree["params"]["b"])
    assert restored["step"] == 3 and restored["name"] == "run-1"
    # Every array object lives in the writer directory, none under the final name.
    key = s3_server.key_of(s3_root)
    under_final = [k for k in s3_server.keys(key) if k.startswith(f"{key}/3/")]
    assert under_final == [f"{key}/3/{ckpt.COMMIT_SUCCESS_FILE}"]
