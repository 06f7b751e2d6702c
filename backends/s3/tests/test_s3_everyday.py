"""Everyday correctness on S3 (moto and SeaweedFS): saves pending at interpreter exit,
discovery that never hands out a step without its commit marker, storage errors users can
catch."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
from upath import UPath

import ckpt
from ckpt import COMMIT_SUCCESS_FILE


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),  # CKPT_CONFIG and the test credentials
    )


def test_manager_save_without_close_commits_at_exit(s3_root: str) -> None:
    proc = run_script(
        f"""
        import numpy as np, ckpt
        m = ckpt.CheckpointManager({s3_root!r}, max_to_keep=1)
        m.save(0, {{"w": np.ones((512, 1024))}})
        m.save(1, {{"w": np.full((512, 1024), 2.0)}})
        c = ckpt.AsyncCheckpointer()
        c.save({s3_root + "/other/0"!r}, {{"w": np.ones(3)}})
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert ckpt.checkpoint_steps(s3_root) == [1]
    restored = ckpt.Checkpointer().restore(s3_root + "/1")
    assert float(restored["w"][0, 0]) == 2.0
    assert ckpt.Checkpointer().restore(s3_root + "/other/0")["w"].tolist() == [1.0] * 3


def _copy_without_marker(s3_server: Any, root: str, src: str, dst: str) -> None:
    """Copy the files of committed step ``src`` to ``dst``, leaving out the commit marker
    (what a prefix copy that was cut short, or a foreign writer in progress, looks like)."""
    from ckpt import _sync
    from ckpt.committed import content_path

    content = _sync.run(content_path(ckpt.get_backend(root), UPath(root) / src))
    client = s3_server.client()
    src_prefix = s3_server.key_of(str(content)) + "/"
    keys = s3_server.keys(src_prefix)
    assert keys
    for key in keys:
        if key.endswith(COMMIT_SUCCESS_FILE):
            continue
        new = f"{s3_server.key_of(root)}/{dst}/" + key[len(src_prefix) :]
        client.copy_object(
            Bucket=s3_server.bucket, Key=new, CopySource={"Bucket": s3_server.bucket, "Key": key}
        )


def test_discovery_never_hands_out_a_step_without_its_marker(s3_server: Any, s3_root: str) -> None:
    with ckpt.CheckpointManager(s3_root, async_save=False) as mngr:
        mngr.save(0, {"w": np.zeros(2)})
        mngr.save(1, {"w": np.ones(2)})
    _copy_without_marker(s3_server, s3_root, "1", "5")
    _copy_without_marker(s3_server, s3_root, "1", "7")
    assert s3_server.keys(s3_server.key_of(s3_root) + "/7/")  # the copy is there

    latest = ckpt.latest_step_metadata(s3_root)
    assert latest is not None and latest.step == 1
    with ckpt.CheckpointManager(s3_root, cleanup_tmp_directories=False) as mngr:
        assert mngr.latest_step() == 1
        assert mngr.restore()["w"].tolist() == [1.0, 1.0]
        assert mngr.metadata().commit_timestamp_nsecs is not None
        with pytest.raises(FileNotFoundError, match="No committed checkpoint for step 7"):
            mngr.restore(7)


def test_retention_never_deletes_a_step_without_its_marker(s3_server: Any, s3_root: str) -> None:
    with ckpt.CheckpointManager(s3_root, async_save=False) as mngr:
        mngr.save(0, {"w": np.zeros(2)})
    # Step 0 is now a foreign writer's save in progress (its marker not yet written).
    _copy_without_marker(s3_server, s3_root, "0", "1")
    with ckpt.CheckpointManager(s3_root, async_save=False) as mngr:
        mngr.delete(0)
    prefix = s3_server.key_of(s3_root)
    foreign = sorted(s3_server.keys(f"{prefix}/1/"))
    assert foreign and not any(k.endswith(COMMIT_SUCCESS_FILE) for k in foreign)

    with ckpt.CheckpointManager(s3_root, max_to_keep=1, cleanup_tmp_directories=False) as mngr:
        mngr.save(2, {"w": np.full(2, 2.0)})
        mngr.save(3, {"w": np.full(2, 3.0)})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [3]
    assert sorted(s3_server.keys(f"{prefix}/1/")) == foreign  # untouched
    assert not s3_server.keys(f"{prefix}/2/")
    assert ckpt.latest_step_metadata(s3_root).step == 3  # type: ignore[union-attr]


def test_missing_array_object_on_restore_is_filenotfounderror(
    s3_server: Any, s3_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt import tree_format

    monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", -1)  # zarr arrays only
    from ckpt import _sync
    from ckpt.committed import content_path

    ckptr = ckpt.Checkpointer()
    ckptr.save(s3_root + "/0", {"w": np.ones(3)})
    content = _sync.run(content_path(ckpt.get_backend(s3_root), UPath(s3_root) / "0"))
    client, key = s3_server.client(), s3_server.key_of(str(content))
    client.delete_object(Bucket=s3_server.bucket, Key=key + "/arrays/0/zarr.json")
    # Recorded in the manifest: the checkpoint is corrupt.
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"zarr\.json: missing"):
        ckptr.restore(s3_root + "/0")
    # As saved before manifests: tensorstore's error, translated.
    tree = client.get_object(Bucket=s3_server.bucket, Key=key + "/_TREE.json")["Body"].read()
    doc = json.loads(tree)
    del doc["manifest"]
    client.put_object(Bucket=s3_server.bucket, Key=key + "/_TREE.json", Body=json.dumps(doc))
    client.delete_object(Bucket=s3_server.bucket, Key=key + "/" + ckpt.MANIFEST_FILE)
    with pytest.raises(FileNotFoundError) as info:
        ckptr.restore(s3_root + "/0")
    assert info.value.errno == errno.ENOENT
    assert "s3" in str(info.value) and s3_root in str(info.value)
