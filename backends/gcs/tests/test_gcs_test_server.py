"""The Storage Control TEST SERVER itself, driven by the real google-cloud-storage-control
async client over an insecure channel (as the backend builds it).

These pin down the server behaviours the backend tests rely on; they say nothing about GCS.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud.storage_control_v2 import (
    CreateFolderRequest,
    ListFoldersRequest,
    RenameFolderRequest,
    StorageControlAsyncClient,
)
from google.cloud.storage_control_v2.services.storage_control.transports import (
    StorageControlGrpcAsyncIOTransport,
)

BUCKET = "projects/_/buckets/ckpt-hns"


def _call(storage_control: Any, run: Any, method: str, **kwargs: Any) -> Any:
    """Call ``method`` on a fresh client (made on ckpt's I/O loop) and close it."""

    async def go() -> Any:
        channel = grpc.aio.insecure_channel(storage_control.address)
        client = StorageControlAsyncClient(
            transport=StorageControlGrpcAsyncIOTransport(channel=channel)
        )
        try:
            result = await getattr(client, method)(**kwargs)
            if method == "rename_folder":
                return await result.result(timeout=10)
            if method == "list_folders":
                return [f.name async for f in result]
            return result
        finally:
            await channel.close()

    return run(go())


@pytest.fixture
def prefix() -> str:
    return f"ts-{uuid.uuid4().hex[:8]}/"


def test_storage_layout(storage_control, run) -> None:
    hns = _call(storage_control, run, "get_storage_layout", name=f"{BUCKET}/storageLayout")
    assert hns.hierarchical_namespace.enabled
    flat = _call(
        storage_control,
        run,
        "get_storage_layout",
        name="projects/_/buckets/ckpt-flat/storageLayout",
    )
    assert not flat.hierarchical_namespace.enabled
    with pytest.raises(gexc.NotFound):
        _call(
            storage_control, run, "get_storage_layout", name="projects/_/buckets/nope/storageLayout"
        )


def test_folder_rpcs(storage_control, run, prefix: str) -> None:
    def create(folder_id: str, recursive: bool = False) -> Any:
        request = CreateFolderRequest(parent=BUCKET, folder_id=folder_id, recursive=recursive)
        return _call(storage_control, run, "create_folder", request=request)

    with pytest.raises(gexc.FailedPrecondition):
        create(prefix + "a/b/")  # parent missing, not recursive
    folder = create(prefix + "a/b/", recursive=True)
    assert folder.name == f"{BUCKET}/folders/{prefix}a/b/"
    with pytest.raises(gexc.AlreadyExists):
        create(prefix + "a/")
    create(prefix + "c/")
    got = _call(storage_control, run, "get_folder", name=f"{BUCKET}/folders/{prefix}a/")
    assert got.name == f"{BUCKET}/folders/{prefix}a/"
    listed = _call(
        storage_control,
        run,
        "list_folders",
        request=ListFoldersRequest(parent=BUCKET, prefix=prefix, delimiter="/"),
    )
    # with the delimiter: the prefix folder itself and the folders one level below it
    assert listed == [f"{BUCKET}/folders/{prefix}{f}" for f in ("", "a/", "c/")]
    with pytest.raises(gexc.FailedPrecondition):  # not empty
        _call(storage_control, run, "delete_folder", name=f"{BUCKET}/folders/{prefix}a/")
    with pytest.raises(gexc.AlreadyExists):
        _call(
            storage_control,
            run,
            "rename_folder",
            request=RenameFolderRequest(
                name=f"{BUCKET}/folders/{prefix}a/", destination_folder_id=prefix + "c/"
            ),
        )
    renamed = _call(
        storage_control,
        run,
        "rename_folder",
        request=RenameFolderRequest(
            name=f"{BUCKET}/folders/{prefix}a/", destination_folder_id=prefix + "d/"
        ),
    )
    assert renamed.name == f"{BUCKET}/folders/{prefix}d/"
    assert storage_control.folder_ids("ckpt-hns", prefix) == [
        prefix + f for f in ("", "c/", "d/", "d/b/")
    ]
    _call(storage_control, run, "delete_folder", name=f"{BUCKET}/folders/{prefix}d/b/")
    with pytest.raises(gexc.NotFound):
        _call(storage_control, run, "get_folder", name=f"{BUCKET}/folders/{prefix}d/b/")


def test_flat_bucket_has_no_folders(storage_control, run) -> None:
    request = CreateFolderRequest(parent="projects/_/buckets/ckpt-flat", folder_id="x/")
    with pytest.raises(gexc.FailedPrecondition):
        _call(storage_control, run, "create_folder", request=request)


def test_rename_moves_objects(storage_control, raw_fs, run, prefix: str) -> None:
    raw_fs.pipe({f"ckpt-hns/{prefix}src/a": b"1", f"ckpt-hns/{prefix}src/s/b": b"2"})
    request = RenameFolderRequest(
        name=f"{BUCKET}/folders/{prefix}src/", destination_folder_id=prefix + "dst/"
    )
    _call(storage_control, run, "rename_folder", request=request)
    assert sorted(raw_fs.find(f"ckpt-hns/{prefix}")) == [
        f"ckpt-hns/{prefix}dst/a",
        f"ckpt-hns/{prefix}dst/s/b",
    ]
    assert storage_control.folder_ids("ckpt-hns", prefix) == [
        prefix + f for f in ("", "dst/", "dst/s/")
    ]
