"""The backend primitives on a flat and an HNS bucket, checked out of band (raw gcsfs)."""

from __future__ import annotations

import pytest
from upath import UPath

from ckpt.backend import Entry
from ckpt_backend_gcs import GCSBackend, GCSBucketBackend, Layout, split_path


def _key(path: UPath) -> str:
    bucket, key = split_path(path)
    return f"{bucket}/{key}"


def test_split_path() -> None:
    assert split_path(UPath("gs://b/a/c")) == ("b", "a/c")
    assert split_path(UPath("gs://b/")) == ("b", "")
    assert split_path(UPath("gcs://b/a/c/")) == ("b", "a/c")
    assert split_path("gs://b/x") == ("b", "x")
    with pytest.raises(ValueError):
        split_path("gs:///x")


def test_views_per_bucket(gcs_backend: GCSBackend, flat, hns) -> None:
    assert flat.layout is Layout.FLAT and hns.layout is Layout.HNS
    assert gcs_backend.bind("gs://ckpt-flat/a/b") is flat  # cached per bucket
    assert flat.bind("gs://ckpt-hns/x") is hns  # a view hands other buckets to the root
    assert isinstance(flat, GCSBackend)
    assert flat.capabilities.names() == ["conditional_put", "snapshot"]  # snapshot: rewrite
    assert hns.capabilities.names() == [
        "atomic_dir_rename",
        "conditional_put",
        "snapshot",
        "folders",
    ]
    assert (flat.default_strategy, hns.default_strategy) == ("commit_file", "rename")
    assert not flat.names_decide_commit and not hns.names_decide_commit
    for view in (flat, hns):
        caps = view.capabilities
        assert not (caps.symlinks or caps.durable_fsync or caps.permissions)
    with pytest.raises(ValueError, match="serves gs://ckpt-flat only"):
        flat._key(UPath("gs://ckpt-hns/x"))


def test_write_read_exists(bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run) -> None:
    b = bucket_backend
    f = root / "d" / "f.bin"
    assert not run(b.exists(f)) and not run(b.exists(root))
    run(b.write_bytes(f, b"\x00data"))
    assert raw_fs.cat_file(_key(f)) == b"\x00data"
    assert run(b.read_bytes(f)) == b"\x00data"
    run(b.write_bytes(f, b"replaced"))
    assert raw_fs.cat_file(_key(f)) == b"replaced"
    assert run(b.exists(f)) and run(b.exists(root / "d")) and run(b.exists(root))
    assert run(b.is_dir(root / "d")) and not run(b.is_dir(f))
    assert not run(b.is_link(f))
    assert run(b.file_size(f)) == 8
    assert run(b.exists_many([f, root / "d", root / "nope"])) == [True, True, False]
    with pytest.raises(FileNotFoundError):
        run(b.read_bytes(root / "nope"))
    with pytest.raises(FileNotFoundError):
        run(b.file_size(root / "nope"))


def test_bucket_root(bucket_backend: GCSBucketBackend, run) -> None:
    b = bucket_backend
    top = UPath(f"gs://{b.bucket}/")
    assert run(b.exists(top)) and run(b.is_dir(top))
    missing = GCSBackend(b.options).bind("gs://no-such-bucket/x")
    assert not run(missing.exists(UPath("gs://no-such-bucket/")))
    assert run(missing.list_dir(UPath("gs://no-such-bucket/x"))) == []
    with pytest.raises(ValueError, match="whole bucket"):
        run(b.remove_tree(top))


def test_list_dir_one_level(bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run) -> None:
    b = bucket_backend
    for name in ("a.txt", "sub/x", "sub/deeper/y", "z/w"):
        raw_fs.pipe_file(_key(root / name), b"1")
    raw_fs.pipe_file(_key(root) + "/", b"")  # a directory marker object is not a child
    assert run(b.list_dir(root)) == [
        Entry("sub", True),
        Entry("z", True),
        Entry("a.txt", False),
    ]
    assert run(b.list_dir(root / "sub")) == [Entry("deeper", True), Entry("x", False)]
    assert run(b.list_dir(root / "missing")) == []
    assert run(b.tree_size(root)) == 4


def test_list_dir_reads_every_page(
    bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run, monkeypatch
) -> None:
    b = bucket_backend
    names = [f"f{i:02d}" for i in range(7)] + [f"d{i}/x" for i in range(5)]
    raw_fs.pipe({_key(root / n): b"x" for n in names})
    fs = run(b._fs())
    original = fs._sequential_list_objects_helper
    pages = []

    async def small_pages(*args, **kwargs):
        kwargs["items_per_call"] = 3
        pages.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fs, "_sequential_list_objects_helper", small_pages)
    entries = run(b.list_dir(root))
    assert sorted(e.name for e in entries if not e.is_dir) == names[:7]
    assert sorted(e.name for e in entries if e.is_dir) == [f"d{i}" for i in range(5)]
    assert pages  # went through the paged helper


def test_create_exclusive(bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run) -> None:
    b = bucket_backend
    marker = root / "commit_success.txt"
    run(b.create_exclusive(marker, b"first"))
    with pytest.raises(FileExistsError):
        run(b.create_exclusive(marker, b"second"))
    with pytest.raises(FileExistsError):
        run(b.create_exclusive(marker, b"first"))  # same bytes, another call: still refused
    assert raw_fs.cat_file(_key(marker)) == b"first"


def test_create_exclusive_recognizes_its_own_retry(
    bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run, monkeypatch
) -> None:
    """A request that succeeded but whose answer was lost is retried by gcsfs and gets 412:
    that must not count as another writer's object (the commit would be discarded)."""
    b = bucket_backend
    fs = run(b._fs())
    original = fs._pipe_file

    async def lost_answer(*args, **kwargs):
        await original(*args, **kwargs)
        raise FileExistsError("412 on the retry")

    monkeypatch.setattr(fs, "_pipe_file", lost_answer)
    marker = root / "m"
    run(b.create_exclusive(marker, b"mine"))  # no error: the object is this call's
    with pytest.raises(FileExistsError):
        run(b.create_exclusive(marker, b"other"))  # a real conflict still is one
    assert raw_fs.cat_file(_key(marker)) == b"mine"


def test_remove_file_and_tree(bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run) -> None:
    b = bucket_backend
    for name in ("keep/k", "t/a", "t/b/c", "t/b/d/e", "tx"):
        raw_fs.pipe_file(_key(root / name), b"1")
    run(b.remove_file(root / "keep" / "missing"))  # missing: fine
    run(b.remove_file(root / "keep" / "k"))
    assert not raw_fs.exists(_key(root / "keep" / "k"))
    run(b.remove_tree(root / "t"))
    assert raw_fs.find(_key(root)) == [_key(root / "tx")]  # the sibling "tx" stays
    run(b.remove_tree(root / "t"))  # missing: fine
    run(b.remove_tree(root / "tx"))  # a file
    assert raw_fs.find(_key(root)) == []
    assert not run(b.exists(root / "t"))


def test_mkdir(bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run) -> None:
    b = bucket_backend
    run(b.mkdir(root / "a" / "b", parents=True, mode=0o700))  # mode is ignored
    if b.hns:  # a real, empty folder
        assert run(b.is_dir(root / "a" / "b"))
        assert run(b.list_dir(root / "a")) == [Entry("b", True)]
        with pytest.raises(FileExistsError):
            run(b.mkdir(root / "a" / "b", exist_ok=False))
        with pytest.raises(FileNotFoundError):
            run(b.mkdir(root / "x" / "y", parents=False))
    else:  # flat: nothing is written, a directory exists through its objects only
        assert raw_fs.find(_key(root)) == []
        assert not run(b.exists(root / "a"))
    run(b.mkdir(root / "a" / "b", exist_ok=True))
    raw_fs.pipe_file(_key(root / "c" / "f"), b"1")
    with pytest.raises(FileExistsError):
        run(b.mkdir(root / "c", exist_ok=False))


def test_root_backend_hands_calls_to_views(
    gcs_backend: GCSBackend, flat_root: UPath, hns_root: UPath, raw_fs, run
) -> None:
    """The unbound backend (what ckpt's registry holds) works on any bucket."""
    for root in (flat_root, hns_root):
        run(gcs_backend.write_bytes(root / "f", b"1"))
        assert run(gcs_backend.list_dir(root)) == [Entry("f", False)]
        assert run(gcs_backend.exists_many([root / "f", root / "g"])) == [True, False]
        run(gcs_backend.remove_tree(root))
        assert raw_fs.find(_key(root)) == []
    assert gcs_backend.layout_of("ckpt-hns") is Layout.HNS


def test_kvstore_spec(gcs_backend: GCSBackend, flat) -> None:
    spec = flat.kvstore_spec(UPath("gs://ckpt-flat/a/b"))
    assert spec == {"driver": "gcs", "bucket": "ckpt-flat", "path": "a/b/"}
    assert gcs_backend.kvstore_spec(UPath("gs://x/")) == {
        "driver": "gcs",
        "bucket": "x",
        "path": "",
    }


def test_exists_in_children(bucket_backend: GCSBucketBackend, root: UPath, raw_fs, run) -> None:
    b = bucket_backend
    raw_fs.pipe({_key(root / n / "commit_success.txt"): b"ok" for n in ("1", "3")})
    raw_fs.pipe_file(_key(root / "2" / "data"), b"x")
    names = ["1", "2", "3", "4"]
    assert run(b.exists_in_children(root, names, "commit_success.txt")) == [
        True,
        False,
        True,
        False,
    ]
    assert run(b._root.exists_in_children(root, names[:1], "commit_success.txt")) == [True]
