"""Array data through tensorstore's ``gcs`` kvstore driver on fake-gcs-server.

tensorstore has no endpoint member for GCS: the ``fake_gcs`` fixture sets
``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorstore as ts
from upath import UPath

import ckpt
from ckpt import tree_read, tree_snapshot, tree_write
from ckpt_backend_gcs import GCSBucketBackend, split_path


def _key(path: UPath) -> str:
    bucket, key = split_path(path)
    return f"{bucket}/{key}"


def test_zarr3_round_trip(bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run) -> None:
    spec = {"driver": "zarr3", "kvstore": bucket_backend.kvstore_spec(root / "arr")}
    data = np.arange(48, dtype=np.float32).reshape(6, 8)

    async def write_then_read() -> np.ndarray:
        store = await ts.open(
            spec,
            create=True,
            dtype=ts.float32,
            shape=list(data.shape),
            chunk_layout=ts.ChunkLayout(write_chunk_shape=[3, 4]),
        )
        await store.write(data)
        reopened = await ts.open(spec)
        return np.asarray(await reopened.read())

    np.testing.assert_array_equal(run(write_then_read()), data)
    # out of band: the zarr objects are on the emulator, under the prefix
    names = raw_fs.find(_key(root / "arr"))
    assert _key(root / "arr" / "zarr.json") in names
    assert len(names) > 1
    assert run(bucket_backend.is_dir(root / "arr"))


@pytest.mark.parametrize("strategy", ["commit_file", "rename"])
def test_save_arrays_and_commit(
    gcs_backend, flat_root: UPath, hns_root: UPath, strategy: str, run
) -> None:
    """A whole save: tree_format writes zarr3 arrays into the temporary path, the strategy
    commits (on HNS, RenameFolder moves the arrays), and the checkpoint reads back."""
    roots = [flat_root, hns_root] if strategy == "commit_file" else [hns_root]
    tree: dict[str, Any] = {
        "w": np.arange(12, dtype=np.int32).reshape(3, 4),
        "b": {"x": np.ones(5)},
    }
    for root in roots:
        backend = gcs_backend.bind(root)
        tmp = ckpt.get_strategy(strategy).from_final(root / "step_1", backend=backend)
        run(tmp.create())
        run(tree_write.write(backend, tmp.get(), tree_snapshot.prepare(tree)))
        run(tmp.finalize())
        where = run(ckpt.content_path(backend, tmp.get_final()))
        restored: Any = run(tree_read.read(backend, where))
        np.testing.assert_array_equal(restored["w"], tree["w"])
        np.testing.assert_array_equal(restored["b"]["x"], tree["b"]["x"])
