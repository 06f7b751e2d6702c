"""S3Backend: registration, configuration, and every primitive against real S3 servers
(moto and SeaweedFS), checked out of band with boto3."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from upath import UPath

import ckpt
import ckpt.plugins
from ckpt import _sync
from ckpt_backend_s3 import S3Backend, resolve_settings

# -- registration and configuration (no server) -------------------------------------------


def test_registered_for_s3_and_s3a() -> None:
    backends = ckpt.list_backends()
    assert backends["s3"] is S3Backend
    assert backends["s3a"] is S3Backend


def test_capabilities_and_defaults() -> None:
    caps = S3Backend.capabilities
    assert caps.names() == ["conditional_put", "snapshot"]  # snapshot: CopyObject
    assert S3Backend.default_strategy == "commit_file"
    assert S3Backend.names_decide_commit is True
    assert S3Backend.package == "ckpt-backend-s3"
    assert S3Backend.scheme == "s3"


def test_auto_resolves_to_commit_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPT_CONFIG", raising=False)
    ckpt.plugins.manager.reset_instances()
    assert ckpt.strategy_for("s3://bucket/x") is ckpt.get_strategy("commit_file")
    assert ckpt.strategy_for("s3a://bucket/x") is ckpt.get_strategy("commit_file")


def test_rename_is_refused_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKPT_CONFIG", raising=False)
    ckpt.plugins.manager.reset_instances()
    with pytest.raises(ckpt.UnsupportedStrategyError) as info:
        ckpt.strategy_for("s3://b/x", atomicity="rename")
    message = str(info.value)
    assert "atomic_dir_rename" in message
    assert "commit_file" in message
    assert "s3://b/x" in message


def test_settings_sources() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:2/",
        "AWS_REGION": "eu-west-3",
        "AWS_PROFILE": "ignored-by-ckpt",
    }
    s = resolve_settings({}, env)
    assert s.endpoint_url == "http://127.0.0.1:2"
    assert s.endpoint_source == "$AWS_ENDPOINT_URL_S3"
    assert s.region == "eu-west-3"
    assert s.profile is None  # AWS_PROFILE is botocore's business
    s = resolve_settings({"endpoint_url": "https://s3.example:9000", "region": "r1"}, env)
    assert (s.endpoint_url, s.region) == ("https://s3.example:9000", "r1")
    assert resolve_settings({}, {"AWS_ENDPOINT_URL": "http://h:1"}).endpoint_url == "http://h:1"
    assert resolve_settings({}, {"AWS_DEFAULT_REGION": "r2"}).region == "r2"
    ignored = {"AWS_ENDPOINT_URL": "http://h:1", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert resolve_settings({}, ignored).endpoint_url is None
    assert resolve_settings({"anon": True}, {}).anon is True
    s = resolve_settings({}, {})
    assert (s.connect_timeout_s, s.read_timeout_s) == (5.0, 15.0)
    s = resolve_settings({"connect_timeout_s": 1, "read_timeout_s": 2.5}, {})
    assert (s.connect_timeout_s, s.read_timeout_s) == (1.0, 2.5)
    for bad in (0, -1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="read_timeout_s"):
            resolve_settings({"read_timeout_s": bad}, {})


def test_settings_errors_never_echo_secrets() -> None:
    with pytest.raises(ValueError, match="Unknown") as info:
        resolve_settings({"secret_access_key": "TOPSECRET-VALUE"}, {})
    assert "TOPSECRET-VALUE" not in str(info.value)
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value)
    with pytest.raises(ValueError, match="http"):
        resolve_settings({"endpoint_url": "127.0.0.1:9000"}, {})
    with pytest.raises(ValueError, match="anon"):
        resolve_settings({"anon": "yes"}, {})


def test_repr_and_spec_hold_no_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-VISIBLE-ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    backend = S3Backend({"endpoint_url": "http://127.0.0.1:9", "region": "r1"})
    spec = backend.kvstore_spec(UPath("s3://bkt/a/b"))
    text = repr(backend) + str(spec) + str(vars(backend.settings)) + str(backend.options)
    for secret in ("AKIA-VISIBLE-ID", "very-secret-value", "session-token-value"):
        assert secret not in text
    assert spec == {
        "driver": "s3",
        "bucket": "bkt",
        "path": "a/b/",
        "endpoint": "http://127.0.0.1:9",
        "aws_region": "r1",
        "aws_credentials": {"type": "environment"},
    }
    assert "127.0.0.1:9" in repr(backend)


def test_kvstore_credentials_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    path = UPath("s3://bkt")
    assert S3Backend({"anon": True}).kvstore_spec(path)["aws_credentials"] == {"type": "anonymous"}
    assert S3Backend({"profile": "p1"}).kvstore_spec(path)["aws_credentials"] == {
        "type": "profile",
        "profile": "p1",
    }
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    spec = S3Backend({}).kvstore_spec(path)
    assert spec["aws_credentials"] == {"type": "default"}
    assert "endpoint" not in spec and "path" not in spec
    # A custom endpoint without a region still signs with one.
    assert S3Backend({"endpoint_url": "http://h:1"}).kvstore_spec(path)["aws_region"] == "us-east-1"


def test_kvstore_spec_is_valid_for_tensorstore() -> None:
    ts = pytest.importorskip("tensorstore")
    for options in ({"endpoint_url": "http://127.0.0.1:9"}, {"anon": True}, {"profile": "p"}):
        ts.KvStore.Spec(S3Backend(options).kvstore_spec(UPath("s3://bkt/a")))


def test_path_without_bucket_is_refused() -> None:
    backend = S3Backend({})
    with pytest.raises(ValueError, match="bucket"):
        _sync.run(backend.mkdir(UPath("s3:///x")))


# -- primitives on the servers ------------------------------------------------------------


def run(coro: Any) -> Any:
    return _sync.run(coro)


def test_write_read_roundtrip(backend: S3Backend, s3_root: str, s3_server: Any) -> None:
    root = backend.path(s3_root)
    run(backend.write_bytes(root / "a" / "b.bin", b"hello"))
    assert run(backend.read_bytes(root / "a" / "b.bin")) == b"hello"
    key = s3_server.key_of(s3_root) + "/a/b.bin"
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert body == b"hello"
    run(backend.write_bytes(root / "a" / "b.bin", b"replaced"))
    assert run(backend.read_bytes(root / "a" / "b.bin")) == b"replaced"
    assert run(backend.file_size(root / "a" / "b.bin")) == 8


def test_read_missing(backend: S3Backend, s3_root: str) -> None:
    root = backend.path(s3_root)
    with pytest.raises(FileNotFoundError, match="nope"):
        run(backend.read_bytes(root / "nope"))
    with pytest.raises(FileNotFoundError):
        run(backend.file_size(root / "nope"))


def test_exists_and_is_dir(backend: S3Backend, s3_root: str, s3_server: Any) -> None:
    root = backend.path(s3_root)
    client, bucket, key = s3_server.client(), s3_server.bucket, s3_server.key_of(s3_root)
    for name in ("d/f", "d.ckpt-writer-1/x", "d-1/y", "dd/z", "file"):
        client.put_object(Bucket=bucket, Key=f"{key}/{name}", Body=b"1")
    assert run(backend.exists(root / "d"))
    assert run(backend.is_dir(root / "d"))
    assert run(backend.exists(root / "d" / "f"))
    assert not run(backend.is_dir(root / "d" / "f"))
    assert run(backend.exists(root / "file"))
    assert not run(backend.is_dir(root / "file"))
    assert not run(backend.exists(root / "missing"))
    assert not run(backend.is_dir(root / "missing"))
    assert not run(backend.exists(root / "d" / "f2"))
    # Names that share a prefix with an existing one do not exist.
    assert not run(backend.exists(root / "d."))
    assert not run(backend.exists(root / "fil"))
    assert run(backend.exists(root))
    assert run(backend.is_dir(root))
    assert run(backend.is_dir(backend.path(f"s3://{bucket}")))
    assert run(backend.exists_many([root / "d", root / "missing", root / "file"])) == [
        True,
        False,
        True,
    ]
    assert run(backend.is_link(root / "d")) is False


def test_exists_many_concurrent(backend: S3Backend, s3_root: str) -> None:
    root = backend.path(s3_root)
    for i in range(0, 40, 2):
        run(backend.write_bytes(root / str(i) / "m", b""))
    result = run(backend.exists_many([root / str(i) for i in range(40)]))
    assert result == [i % 2 == 0 for i in range(40)]


def test_list_dir_one_level(backend: S3Backend, s3_root: str, s3_server: Any) -> None:
    root = backend.path(s3_root)
    client, bucket, key = s3_server.client(), s3_server.bucket, s3_server.key_of(s3_root)
    for name in ("a/x", "a/y/z", "b.ckpt-writer-1/m", "c", "d/e/f"):
        client.put_object(Bucket=bucket, Key=f"{key}/{name}", Body=b"1")
    entries = sorted(run(backend.list_dir(root)))
    assert entries == [
        ckpt.Entry("a", True, False),
        ckpt.Entry("b.ckpt-writer-1", True, False),
        ckpt.Entry("c", False, False),
        ckpt.Entry("d", True, False),
    ]
    assert sorted(run(backend.list_dir(root / "a"))) == [
        ckpt.Entry("x", False, False),
        ckpt.Entry("y", True, False),
    ]
    assert run(backend.list_dir(root / "missing")) == []
    assert run(backend.list_dir(root / "c")) == []


def test_mkdir_is_a_noop(backend: S3Backend, s3_root: str, s3_server: Any) -> None:
    root = backend.path(s3_root)
    run(backend.mkdir(root / "x", parents=True, exist_ok=False, mode=0o700))
    assert s3_server.keys(s3_server.key_of(s3_root)) == []
    assert not run(backend.exists(root / "x"))


def test_create_exclusive(backend: S3Backend, s3_root: str, s3_server: Any) -> None:
    root = backend.path(s3_root)
    target = root / "step" / "commit_success.txt"
    run(backend.create_exclusive(target, b"first"))
    with pytest.raises(FileExistsError) as info:
        run(backend.create_exclusive(target, b"second"))
    assert not isinstance(info.value, ckpt.CommitConflictError)
    assert "commit_success.txt" in str(info.value)
    assert run(backend.read_bytes(target)) == b"first"


def test_create_exclusive_retry_after_lost_answer(
    backend: S3Backend, s3_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PUT succeeded but its answer was lost; the client's retry meets 412 caused by
    our own object: that is a success, not a conflict (the writer would otherwise delete
    the files its own marker names)."""
    root = backend.path(s3_root)
    original = backend.fs._pipe_file

    async def put_then_retry(*args: Any, **kwargs: Any) -> Any:
        await original(*args, **kwargs)
        return await original(*args, **kwargs)  # the "retry" of a lost answer

    monkeypatch.setattr(backend.fs, "_pipe_file", put_then_retry)
    run(backend.create_exclusive(root / "m", b"mine"))
    assert run(backend.read_bytes(root / "m")) == b"mine"
    # Another writer's object is still a conflict.
    with pytest.raises(FileExistsError):
        run(backend.create_exclusive(root / "m", b"other"))
    assert run(backend.read_bytes(root / "m")) == b"mine"


def test_create_exclusive_races(backend: S3Backend, s3_root: str) -> None:
    root = backend.path(s3_root)
    target = root / "race" / "marker"

    async def racer(i: int) -> bool:
        try:
            await backend.create_exclusive(target, f"writer {i}".encode())
            return True
        except FileExistsError:
            return False

    async def all_racers() -> list[bool]:
        return list(await asyncio.gather(*(racer(i) for i in range(16))))

    results = run(all_racers())
    assert results.count(True) == 1
    winner = results.index(True)
    assert run(backend.read_bytes(target)) == f"writer {winner}".encode()


def test_create_exclusive_other_errors_propagate(s3_root: str, s3_server: Any) -> None:
    backend = S3Backend({"endpoint_url": s3_server.endpoint})
    missing = backend.path("s3://ckpt-no-such-bucket-x1/a/marker")
    with pytest.raises(FileNotFoundError, match="ckpt-no-such-bucket-x1") as info:
        run(backend.create_exclusive(missing, b"x"))
    assert not isinstance(info.value, FileExistsError)


def test_remove_file(backend: S3Backend, s3_root: str, s3_server: Any) -> None:
    root = backend.path(s3_root)
    run(backend.write_bytes(root / "s" / "keep", b"1"))
    run(backend.write_bytes(root / "gone" / "f", b"1"))
    run(backend.remove_file(root / "gone" / "f"))
    run(backend.remove_file(root / "gone" / "f"))  # missing: fine
    run(backend.remove_file(root / "s" / "missing"))
    key = s3_server.key_of(s3_root)
    assert s3_server.keys(key) == [f"{key}/s/keep"]
    # The emptied parent does not linger in listings (SeaweedFS keeps directories).
    assert s3_server.children(key + "/") == {"s"}
    assert [e.name for e in run(backend.list_dir(root))] == ["s"]
    assert not run(backend.exists(root / "gone"))


def test_remove_tree(backend: S3Backend, s3_root: str, s3_server: Any) -> None:
    root = backend.path(s3_root)
    client, bucket, key = s3_server.client(), s3_server.bucket, s3_server.key_of(s3_root)
    names = ["t/a", "t/b/c", "t/b/d/e", "t.ckpt-writer-1/k", "t-2/k", "tt/k", "t"]
    for name in names:
        client.put_object(Bucket=bucket, Key=f"{key}/{name}", Body=b"12345")
    assert run(backend.tree_size(root / "t")) == 15
    run(backend.remove_tree(root / "t"))
    remaining = sorted(k[len(key) + 1 :] for k in s3_server.keys(key))
    assert remaining == ["t-2/k", "t.ckpt-writer-1/k", "tt/k"]
    assert s3_server.children(key + "/") == {"t-2", "t.ckpt-writer-1", "tt"}
    assert not run(backend.exists(root / "t"))
    assert run(backend.tree_size(root / "t")) == 0
    run(backend.remove_tree(root / "t"))  # missing: fine
    run(backend.remove_tree(root / "never"))


def test_remove_tree_aborts_multipart_uploads(
    backend: S3Backend, s3_root: str, s3_server: Any
) -> None:
    client, bucket, key = s3_server.client(), s3_server.bucket, s3_server.key_of(s3_root)
    inside = client.create_multipart_upload(Bucket=bucket, Key=f"{key}/w/arrays/0/c/0")
    client.upload_part(
        Bucket=bucket,
        Key=f"{key}/w/arrays/0/c/0",
        UploadId=inside["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    outside = client.create_multipart_upload(Bucket=bucket, Key=f"{key}/w2/big")
    client.put_object(Bucket=bucket, Key=f"{key}/w/_CHECKPOINT_METADATA", Body=b"{}")

    def uploads() -> set[str]:
        page = client.list_multipart_uploads(Bucket=bucket, Prefix=key + "/")
        return {u["UploadId"] for u in page.get("Uploads", [])}

    assert uploads() == {inside["UploadId"], outside["UploadId"]}
    run(backend.remove_tree(backend.path(s3_root) / "w"))
    assert uploads() == {outside["UploadId"]}
    assert s3_server.keys(key) == []
    client.abort_multipart_upload(Bucket=bucket, Key=f"{key}/w2/big", UploadId=outside["UploadId"])


def test_rename_dir_not_supported(backend: S3Backend, s3_root: str) -> None:
    root = backend.path(s3_root)
    with pytest.raises(NotImplementedError, match="commit_file"):
        run(backend.rename_dir(root / "a", root / "b"))
    run(backend.sync_tree(root))
    run(backend.sync_dir(root))


def test_missing_bucket_is_named(s3_root: str, s3_server: Any) -> None:
    backend = S3Backend({"endpoint_url": s3_server.endpoint})
    path = backend.path("s3://ckpt-no-such-bucket-x2/ckpts")
    with pytest.raises(FileNotFoundError, match="ckpt-no-such-bucket-x2") as info:
        run(backend.list_dir(path))
    assert "bucket" in str(info.value) and s3_server.endpoint in str(info.value)
    with pytest.raises(FileNotFoundError, match="ckpt-no-such-bucket-x2"):
        run(backend.write_bytes(path / "f", b"1"))
    with pytest.raises(FileNotFoundError, match="ckpt-no-such-bucket-x2"):
        run(backend.read_bytes(path / "f"))
    assert not run(backend.exists(path))
    assert not run(backend.is_dir(path))
    run(backend.remove_tree(path))


def test_endpoint_from_environment(
    s3_root: str, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CKPT_CONFIG", raising=False)
    monkeypatch.chdir(s3_server.config_path.parent.parent)  # no ckpt.toml there
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    ckpt.plugins.manager.reset_instances()
    backend = ckpt.get_backend(s3_root)
    assert backend.settings.endpoint_url == s3_server.endpoint
    assert backend.kvstore_spec(backend.path(s3_root))["endpoint"] == s3_server.endpoint
    run(backend.write_bytes(backend.path(s3_root) / "env", b"1"))
    assert s3_server.keys(s3_server.key_of(s3_root)) == [s3_server.key_of(s3_root) + "/env"]
    ckpt.plugins.manager.reset_instances()


def test_works_from_another_event_loop(backend: S3Backend, s3_root: str) -> None:
    """A caller on its own loop (asyncio.run in a thread) is served on fsspec's loop."""
    root = backend.path(s3_root)
    run(backend.write_bytes(root / "x" / "f", b"1"))
    result: dict[str, Any] = {}

    def worker() -> None:
        async def main() -> None:
            result["entries"] = await backend.list_dir(root)
            result["data"] = await backend.read_bytes(root / "x" / "f")

        asyncio.run(main())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert result == {"entries": [ckpt.Entry("x", True, False)], "data": b"1"}


def test_installed_through_the_entry_point_only() -> None:
    """The s3 scheme comes from the ckpt-backend-s3 distribution's entry point; without that
    plugin (as after `pip uninstall ckpt-backend-s3`) s3:// says what to install."""
    import importlib.metadata
    import os
    import subprocess
    import sys

    (entry,) = [e for e in importlib.metadata.entry_points(group="ckpt") if e.name == "s3"]
    assert entry.dist is not None and entry.dist.name == "ckpt-backend-s3"
    code = (
        "import ckpt\n"
        "assert 's3' not in ckpt.list_backends()\n"
        "try:\n"
        "    ckpt.get_backend('s3://bucket/run')\n"
        "except ckpt.BackendNotInstalledError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, CKPT_DISABLE_PLUGINS="s3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "pip install ckpt-backend-s3" in out.stdout
    listing = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ckpt"), "backends"],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="250"),
    )
    assert listing.returncode == 0 and "S3Backend" in listing.stdout
    assert "ckpt-backend-s3" in listing.stdout
