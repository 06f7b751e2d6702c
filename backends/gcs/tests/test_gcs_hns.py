"""HNS bucket: folders through Storage Control, and the rename strategy over RenameFolder.

The folders live in the project's Storage Control TEST SERVER; the objects on fake-gcs-server.
"""

from __future__ import annotations

import asyncio

import pytest
from upath import UPath

import ckpt
from ckpt import COMMIT_SUCCESS_FILE, TMP_DIR_SUFFIX
from ckpt.backend import Entry
from ckpt_backend_gcs import GCSBackend, GCSBucketBackend, split_path
from ckpt_backend_gcs.testing import StorageControlTestServer


def _key(path: UPath) -> str:
    bucket, key = split_path(path)
    return f"{bucket}/{key}"


def _folder(path: UPath) -> str:
    return split_path(path)[1] + "/"


def test_rename_cycle(hns: GCSBucketBackend, hns_root: UPath, raw_fs, storage_control, run):
    strategy = ckpt.get_strategy("rename")
    final = hns_root / "step_1"
    tmp = strategy.from_final(final, backend=hns)
    assert TMP_DIR_SUFFIX in tmp.get().name
    run(tmp.create())
    assert _folder(tmp.get()) in storage_control.folder_ids("ckpt-hns")  # a real folder
    run(hns.write_bytes(tmp.get() / "data.bin", b"payload"))
    run(hns.write_bytes(tmp.get() / "sub" / "x.bin", b"x"))
    run(strategy.validate(tmp.get(), backend=hns))
    assert run(hns.list_dir(hns_root)) == [Entry(tmp.get().name, True)]
    run(tmp.finalize())
    # everything moved: objects and folders
    assert raw_fs.cat_file(_key(final / "data.bin")) == b"payload"
    assert raw_fs.cat_file(_key(final / "sub" / "x.bin")) == b"x"
    assert raw_fs.exists(_key(final / COMMIT_SUCCESS_FILE))
    assert not raw_fs.find(_key(tmp.get()))
    folders = storage_control.folder_ids("ckpt-hns", _folder(hns_root))
    assert _folder(final) in folders and _folder(final / "sub") in folders
    assert not any(TMP_DIR_SUFFIX in f for f in folders)
    run(strategy.validate_final(final, backend=hns))
    assert run(strategy.is_finalized(hns, final))
    entries = run(hns.list_dir(hns_root))
    assert entries == [Entry("step_1", True)]
    assert run(strategy.finalized_names(hns, hns_root, entries)) == ["step_1"]


def test_rename_refuses_existing_destination(hns: GCSBucketBackend, hns_root: UPath, run):
    run(hns.write_bytes(hns_root / "src" / "f", b"1"))
    run(hns.mkdir(hns_root / "dst"))  # an empty folder counts
    with pytest.raises(FileExistsError):
        run(hns.rename_dir(hns_root / "src", hns_root / "dst"))
    run(hns.write_bytes(hns_root / "dst2" / "g", b"2"))  # a folder implied by objects too
    with pytest.raises(FileExistsError):
        run(hns.rename_dir(hns_root / "src", hns_root / "dst2"))
    assert run(hns.read_bytes(hns_root / "src" / "f")) == b"1"
    with pytest.raises(FileNotFoundError):
        run(hns.rename_dir(hns_root / "missing", hns_root / "new"))


def test_rename_folder_refusal_is_relied_on(
    hns: GCSBucketBackend, hns_root: UPath, storage_control, run, monkeypatch
):
    """Without the client-side check (a racing writer can pass it), RenameFolder itself
    refuses an existing destination and the backend reports FileExistsError."""
    run(hns.write_bytes(hns_root / "src" / "f", b"1"))
    run(hns.write_bytes(hns_root / "dst" / "g", b"2"))

    async def never_exists(path):
        return False

    monkeypatch.setattr(hns, "exists", never_exists)
    before = storage_control.calls.count("RenameFolder")
    with pytest.raises(FileExistsError, match="destination exists"):
        run(hns.rename_dir(hns_root / "src", hns_root / "dst"))
    assert storage_control.calls.count("RenameFolder") == before + 1


def test_rename_conflict_between_writers(hns: GCSBucketBackend, hns_root: UPath, raw_fs, run):
    strategy = ckpt.get_strategy("rename")
    final = hns_root / "step_9"
    writers = [strategy.from_final(final, backend=hns) for _ in range(4)]
    for i, writer in enumerate(writers):
        run(writer.create())
        run(hns.write_bytes(writer.get() / "data.bin", str(i).encode()))

    async def race():
        return await asyncio.gather(*(w.finalize() for w in writers), return_exceptions=True)

    results = run(race())
    won = [i for i, r in enumerate(results) if r is None]
    assert len(won) == 1, results
    assert all(isinstance(r, ckpt.CommitConflictError) for r in results if r is not None)
    assert raw_fs.cat_file(_key(final / "data.bin")) == str(won[0]).encode()
    assert [e.name for e in run(hns.list_dir(hns_root))] == ["step_9"]  # losers cleaned up


def test_empty_folders_are_listed(hns: GCSBucketBackend, hns_root: UPath, run):
    run(hns.mkdir(hns_root / "empty" / "nested", parents=True))
    run(hns.write_bytes(hns_root / "file", b"1"))
    assert run(hns.list_dir(hns_root)) == [Entry("empty", True), Entry("file", False)]
    assert run(hns.list_dir(hns_root / "empty")) == [Entry("nested", True)]
    assert run(hns.list_dir(hns_root / "empty" / "nested")) == []
    assert run(hns.is_dir(hns_root / "empty" / "nested"))


def test_list_folders_every_page(fake_gcs, hns_root: UPath, run, monkeypatch) -> None:
    with StorageControlTestServer(fake_gcs.url, hns_buckets=["ckpt-hns"]) as server:
        monkeypatch.setattr(server, "list_page_size", 2)
        backend = GCSBackend(
            {"endpoint_url": fake_gcs.url, "storage_control_endpoint": server.endpoint}
        )
        try:
            view = backend.bind(hns_root)
            for i in range(5):
                run(view.mkdir(hns_root / f"d{i}", parents=True))
            assert [e.name for e in run(view.list_dir(hns_root))] == [f"d{i}" for i in range(5)]
            assert server.calls.count("ListFolders") >= 3
        finally:
            backend.close()


def test_remove_tree_deletes_folders_leaf_first(
    hns: GCSBucketBackend, hns_root: UPath, raw_fs, storage_control, run, monkeypatch
):
    run(hns.mkdir(hns_root / "t" / "a" / "b" / "c", parents=True))
    run(hns.mkdir(hns_root / "t" / "empty", parents=True))
    run(hns.write_bytes(hns_root / "t" / "a" / "f", b"1"))
    run(hns.write_bytes(hns_root / "t" / "a" / "b" / "g", b"2"))
    run(hns.mkdir(hns_root / "keep"))
    deleted: list[str] = []
    original = storage_control._delete_folder

    def record(request):
        deleted.append(request.name.split("/folders/", 1)[1])
        return original(request)

    monkeypatch.setattr(storage_control, "_delete_folder", record)
    run(hns.remove_tree(hns_root / "t"))
    base = _folder(hns_root)
    assert sorted(deleted) == sorted(
        base + f for f in ("t/", "t/a/", "t/a/b/", "t/a/b/c/", "t/empty/")
    )
    # every folder is deleted after all the folders under it
    for i, name in enumerate(deleted):
        assert not any(other.startswith(name) and other != name for other in deleted[i:])
    assert storage_control.folder_ids("ckpt-hns", base) == [base, base + "keep/"]
    assert raw_fs.find(_key(hns_root)) == []
    assert run(hns.list_dir(hns_root)) == [Entry("keep", True)]
    assert not run(hns.exists(hns_root / "t"))


def test_rename_waits_for_the_operation(fake_gcs, hns_root: UPath, run):
    """A pending RenameFolder operation is polled (GetOperation) until done."""
    with StorageControlTestServer(
        fake_gcs.url, hns_buckets=["ckpt-hns"], rename_delay_s=0.3
    ) as server:
        backend = GCSBackend(
            {"endpoint_url": fake_gcs.url, "storage_control_endpoint": server.endpoint}
        )
        try:
            view = backend.bind(hns_root)
            run(view.write_bytes(hns_root / "a" / "f", b"1"))
            run(view.rename_dir(hns_root / "a", hns_root / "b"))
            assert run(view.read_bytes(hns_root / "b" / "f")) == b"1"
            assert "GetOperation" in server.calls
        finally:
            backend.close()


def test_rename_timeout_names_everything(fake_gcs, hns_root: UPath, run):
    with StorageControlTestServer(
        fake_gcs.url, hns_buckets=["ckpt-hns"], rename_delay_s=1.5
    ) as server:
        backend = GCSBackend(
            {
                "endpoint_url": fake_gcs.url,
                "storage_control_endpoint": server.endpoint,
                "rename_timeout_s": 0.2,
            }
        )
        try:
            view = backend.bind(hns_root)
            run(view.write_bytes(hns_root / "a" / "f", b"1"))
            with pytest.raises(TimeoutError) as info:
                run(view.rename_dir(hns_root / "a", hns_root / "b"))
            # fsspec's sync() (under ckpt._sync.run) replaces any TimeoutError by a bare
            # FSTimeoutError whose __cause__ is the original: read the whole chain.
            message = ""
            exc_or_cause: BaseException | None = info.value
            while exc_or_cause is not None:
                message += f" {exc_or_cause}"
                exc_or_cause = exc_or_cause.__cause__
            for part in (str(hns_root / "a"), str(hns_root / "b"), "bucket ckpt-hns", "0.2 s"):
                assert part in message
            assert "may still complete" in message
        finally:
            backend.close()


def test_mkdir_folder_semantics(hns: GCSBucketBackend, hns_root: UPath, storage_control, run):
    run(hns.mkdir(hns_root / "p", parents=True))
    run(hns.mkdir(hns_root / "p" / "q", parents=False, exist_ok=False))
    assert _folder(hns_root / "p" / "q") in storage_control.folder_ids("ckpt-hns")
    with pytest.raises(FileExistsError):
        run(hns.mkdir(hns_root / "p" / "q", parents=False, exist_ok=False))
    with pytest.raises(FileNotFoundError):
        run(hns.mkdir(hns_root / "nope" / "q", parents=False))
