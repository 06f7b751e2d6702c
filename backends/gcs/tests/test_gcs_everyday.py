"""Everyday correctness on GCS (flat and hierarchical-namespace buckets of the test
servers): saves pending at interpreter exit, storage errors users can catch."""

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


def run_script(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),  # CKPT_CONFIG and tensorstore's test endpoint
    )


def test_manager_save_without_close_commits_at_exit(ckpt_config: str, root: UPath) -> None:
    url = str(root)
    proc = run_script(
        f"""
        import numpy as np, ckpt
        m = ckpt.CheckpointManager({url!r}, max_to_keep=1)
        m.save(0, {{"w": np.ones((512, 1024))}})
        m.save(1, {{"w": np.full((512, 1024), 2.0)}})
        """
    )
    assert proc.returncode == 0, proc.stderr
    with ckpt.CheckpointManager(url) as mngr:
        assert mngr.all_steps() == [1]
        assert float(mngr.restore()["w"][0, 0]) == 2.0


def test_missing_array_object_on_restore_is_filenotfounderror(
    ckpt_config: str, root: UPath, raw_fs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckpt import tree_format

    monkeypatch.setattr(tree_format, "PACK_MAX_LEAF_BYTES", -1)  # zarr arrays only
    from ckpt import _sync
    from ckpt.committed import content_path

    ckptr = ckpt.Checkpointer()
    ckptr.save(root / "0", {"w": np.ones(3)})
    content = _sync.run(content_path(ckpt.get_backend(str(root)), root / "0"))
    base = str(content).split("://", 1)[1]
    raw_fs.rm(base + "/arrays/0/zarr.json")
    # Recorded in the manifest: the checkpoint is corrupt.
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"zarr\.json: missing"):
        ckptr.restore(root / "0")
    # As saved before manifests: tensorstore's error, translated.
    doc = json.loads(raw_fs.cat_file(base + "/_TREE.json"))
    del doc["manifest"]
    raw_fs.pipe_file(base + "/_TREE.json", json.dumps(doc).encode())
    raw_fs.rm(base + "/" + ckpt.MANIFEST_FILE)
    raw_fs.invalidate_cache()
    with pytest.raises(FileNotFoundError) as info:
        ckptr.restore(root / "0")
    assert info.value.errno == errno.ENOENT
    assert str(root / "0") in str(info.value)


def test_gc_older_than_judges_by_modification_time(
    ckpt_config: str, root: UPath, raw_fs: Any
) -> None:
    """`ckpt gc --older-than S` spares a temporary written S seconds ago or less, even one
    whose name carries no time (Orbax's), by the objects' ``updated`` times."""
    import time

    from typer.testing import CliRunner

    from ckpt.cli import app

    base = str(root).split("://", 1)[1]
    raw_fs.pipe_file(f"{base}/5.orbax-checkpoint-tmp/data", b"being written")
    raw_fs.invalidate_cache()
    backend = ckpt.get_backend(str(root))
    stamp = ckpt._sync.run(backend.modified_ns(root / "5.orbax-checkpoint-tmp"))
    assert stamp is not None and abs(stamp - time.time_ns()) < 600 * 10**9
    spared = CliRunner().invoke(app, ["gc", str(root), "--older-than", "600"])
    assert spared.exit_code == 0, spared.output
    assert "sparing 1" in spared.output and "removing" not in spared.output
    removed = CliRunner().invoke(app, ["gc", str(root)])
    assert removed.exit_code == 0 and "removed 1" in removed.output, removed.output
