"""The S3 backend of ckpt (``s3://`` and ``s3a://``): Amazon S3 and S3-compatible stores.

S3 has no directories and no rename, but it has a conditional put (``If-None-Match: *``):
of several writers creating one object, exactly one succeeds. So checkpoints are committed
with the ``commit_file`` strategy: each writer writes into its own prefix
``.ckpt-writers/<step>.ckpt-writer-<token>/`` and commits by conditionally creating
``<step>/commit_success.txt``. Nothing is ever written under ``<step>/`` before that marker,
so a step name in a listing is itself the commit evidence (``names_decide_commit``):
discovery is one paginated LIST, with no request per step.

Every primitive is a coroutine over one :class:`s3fs.S3FileSystem`, run on fsspec's I/O
loop (the loop :mod:`ckpt._sync` uses); listings are never cached.

Configuration comes from ``[backends.s3]`` (``endpoint_url``, ``region``, ``profile``,
``anon``, ``connect_timeout_s``, ``read_timeout_s``) and the standard AWS sources
(``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``,
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``~/.aws``). Credentials are never taken from ckpt's configuration, never stored on the
backend, and never logged or shown in ``repr``; the tensorstore spec names a credentials
*source*, never a secret.

Stores that keep empty "directories" (SeaweedFS, or folder-marker objects made by consoles)
are handled: the marker object ``<prefix>/`` counts as an (empty) directory, and
:meth:`S3Backend.remove_tree` / :meth:`S3Backend.remove_file` delete the markers they leave
behind, so a removed checkpoint never lingers in a listing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import errno
import logging
import os
import random
import threading
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec.asyn
from upath import UPath

from ckpt import hookimpl
from ckpt.backend import Backend, Capabilities, Entry
from ckpt.config import positive_seconds
from ckpt.errors import ConfigError, InvalidPathError

__all__ = ["OPTION_KEYS", "S3Backend", "S3Settings", "resolve_settings"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Keys accepted in the ``[backends.s3]`` configuration table.
OPTION_KEYS = (
    "endpoint_url", "region", "profile", "anon", "connect_timeout_s", "read_timeout_s"
)  # fmt: skip
#: Keys that look like credentials: refused with a hint, their values never echoed.
_SECRET_LIKE = ("key", "secret", "token", "password", "credential", "username")

#: Objects per DeleteObjects request (the S3 maximum).
_DELETE_BATCH = 1000
#: Concurrent requests issued by one primitive (exists_many, batched deletes, aborts).
_CONCURRENCY = 32
#: Attempts of a conditional put that S3 answers with 409 ConditionalRequestConflict.
_CONFLICT_ATTEMPTS = 8
#: User-metadata key holding the id of the conditional put that created an object.
_CREATE_ID = "ckpt-create-id"
#: Signing region used with a custom endpoint when none is configured.
_DEFAULT_ENDPOINT_REGION = "us-east-1"
#: Seconds to open a connection, and to wait for the next byte of an answer, before botocore
#: gives up on the attempt and retries (s3fs's long-standing defaults).
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 15.0


# -- settings -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Resolved, secret-free connection settings of one backend instance.

    Attributes:
        endpoint_url: the S3 endpoint (``None``: AWS, chosen by botocore).
        endpoint_source: where ``endpoint_url`` came from (for messages).
        region: the region (``None``: botocore's / the bucket's).
        profile: the AWS profile named in ckpt's configuration (``AWS_PROFILE`` is left to
            botocore, which then still prefers credentials from the environment).
        anon: unsigned requests (public buckets).
        connect_timeout_s: seconds to open a connection before the attempt is given up.
        read_timeout_s: seconds without a byte of the answer before the attempt is given up
            (a hanging request); botocore and s3fs then retry it.
    """

    endpoint_url: str | None = None
    endpoint_source: str = "default"
    region: str | None = None
    profile: str | None = None
    anon: bool = False
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def _check_str(options: Mapping[str, Any], key: str) -> str | None:
    value = options.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"Invalid [backends.s3] option {key!r}: expected a non-empty string, "
            f"got a {type(value).__name__}."
        )
    return value.strip()


def _check_seconds(options: Mapping[str, Any], key: str, default: float) -> float:
    return positive_seconds(options.get(key, default), f"[backends.s3] option {key!r}")


def resolve_settings(
    options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> S3Settings:
    """Settings from the ``[backends.s3]`` table, then the standard AWS variables.

    Raises ConfigError (a ValueError) for unknown keys (credential-like keys get a hint to use the
    environment or a profile; their values are never echoed)."""
    options = dict(options or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(k for k in options if k not in OPTION_KEYS)
    if unknown:
        secretish = [k for k in unknown if any(s in k.lower() for s in _SECRET_LIKE)]
        hint = (
            " Credentials are never read from ckpt's configuration: use the standard AWS "
            "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or an AWS "
            "profile (the 'profile' option)."
            if secretish
            else ""
        )
        close = [m for k in unknown for m in difflib.get_close_matches(k, OPTION_KEYS, n=1)]
        if close and not secretish:
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?"
        raise ConfigError(
            f"Unknown [backends.s3] option(s): {', '.join(unknown)}. "
            f"Known options: {', '.join(OPTION_KEYS)}.{hint}"
        )

    endpoint = _check_str(options, "endpoint_url")
    source = "[backends.s3] endpoint_url"
    ignore_env = (_env(environ, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() == "true"
    if endpoint is None and not ignore_env:
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            endpoint = _env(environ, var)
            if endpoint:
                source = f"${var}"
                break
    if endpoint is None:
        source = "default (AWS)"
    else:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"Invalid S3 endpoint from {source}: expected an http(s) URL such as "
                f"'http://127.0.0.1:9000', got {endpoint!r}."
            )
        endpoint = endpoint.rstrip("/")

    region = (
        _check_str(options, "region")
        or _env(environ, "AWS_REGION")
        or _env(environ, "AWS_DEFAULT_REGION")
    )
    profile = _check_str(options, "profile")
    anon = options.get("anon", False)
    if not isinstance(anon, bool):
        raise ConfigError(
            f"Invalid [backends.s3] option 'anon': expected true or false, got {anon!r}."
        )
    return S3Settings(
        endpoint_url=endpoint,
        endpoint_source=source,
        region=region,
        profile=profile,
        anon=anon,
        connect_timeout_s=_check_seconds(options, "connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S),
        read_timeout_s=_check_seconds(options, "read_timeout_s", DEFAULT_READ_TIMEOUT_S),
    )


# -- errors ---------------------------------------------------------------------------


def _s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """``(error code, HTTP status)`` of the botocore error behind ``exc``, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return (str(code) if code is not None else None), status
        current = current.__cause__ or current.__context__
    return None, None


def _is_precondition_failed(exc: BaseException) -> bool:
    """True for "the object already exists" answers to ``If-None-Match: *``.

    moto's 412 carries ``<Condition>If-None-Match</Condition>`` and s3fs raises
    FileExistsError; SeaweedFS's 412 lacks it and s3fs raises OSError(EINVAL)."""
    if isinstance(exc, FileExistsError):
        return True
    code, status = _s3_error(exc)
    return code == "PreconditionFailed" or status == 412


def _is_conditional_conflict(exc: BaseException) -> bool:
    """S3's 409 ConditionalRequestConflict (or OperationAborted): a concurrent conditional
    write is in flight; the request must be retried (it then succeeds or fails with 412)."""
    return _s3_error(exc)[0] in ("ConditionalRequestConflict", "OperationAborted")


def _is_no_such_bucket(exc: BaseException) -> bool:
    return _s3_error(exc)[0] == "NoSuchBucket"


def _is_no_such_upload(exc: BaseException) -> bool:
    code, status = _s3_error(exc)
    return code == "NoSuchUpload" or (status == 404 and code in (None, "404"))


# -- the backend ------------------------------------------------------------------------


class S3Backend(Backend):
    """Amazon S3 and S3-compatible object stores with conditional writes."""

    scheme = "s3"
    package = "ckpt-backend-s3"
    capabilities = Capabilities(
        atomic_dir_rename=False,
        conditional_put=True,
        snapshot=True,
        symlinks=False,
        durable_fsync=False,
        permissions=False,
        folders=False,
    )
    default_strategy = "commit_file"
    names_decide_commit = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.settings = resolve_settings(self.options)
        self._fs: Any = None
        self._fs_pid: int | None = None
        self._fs_lock = threading.Lock()
        #: Buckets seen to exist (checked once, before the first array write into each).
        self._buckets_seen: set[str] = set()

    def __repr__(self) -> str:
        s = self.settings
        parts = [f"scheme={self.scheme!r}", f"endpoint={s.endpoint_url or 'AWS'!r}"]
        if s.region:
            parts.append(f"region={s.region!r}")
        if s.profile:
            parts.append(f"profile={s.profile!r}")
        if s.anon:
            parts.append("anon=True")
        return f"{type(self).__name__}({', '.join(parts)})"

    def describe(self) -> str:
        return "s3"

    def _where(self) -> str:
        """The endpoint for error messages (never credentials)."""
        s = self.settings
        return f"endpoint {s.endpoint_url} (from {s.endpoint_source})" if s.endpoint_url else "AWS"

    # -- the filesystem and the loop ------------------------------------------------------
    @property
    def fs(self) -> Any:
        """The s3fs filesystem (made on first use, again after a fork)."""
        pid = os.getpid()
        if self._fs is None or self._fs_pid != pid:
            with self._fs_lock:
                if self._fs is None or self._fs_pid != pid:
                    self._fs = self._make_fs()
                    self._fs_pid = pid
        return self._fs

    def _make_fs(self) -> Any:
        import s3fs

        s = self.settings
        kwargs: dict[str, Any] = {
            "anon": s.anon,
            "skip_instance_cache": True,  # our own instance: never shared, never stale
            "use_listings_cache": False,
            # Bound to fsspec's I/O loop, the loop ckpt._sync runs every coroutine on.
            "asynchronous": False,
            # A hanging request is given up after read_timeout_s, then retried.
            "config_kwargs": {
                "connect_timeout": s.connect_timeout_s,
                "read_timeout": s.read_timeout_s,
            },
        }
        if s.endpoint_url:
            kwargs["endpoint_url"] = s.endpoint_url
        if s.region:
            kwargs["client_kwargs"] = {"region_name": s.region}
        if s.profile:
            kwargs["profile"] = s.profile
        return s3fs.S3FileSystem(**kwargs)

    async def _io(self, coro: Coroutine[Any, Any, T], path: Any = None) -> T:
        """Run ``coro`` on fsspec's I/O loop, where the s3fs session lives (a caller on
        another event loop waits for it there)."""
        loop = fsspec.asyn.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - always called from a coroutine
            running = None
        try:
            if running is loop:
                return await coro
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
        except Exception as exc:
            if type(exc).__name__ == "NoCredentialsError":  # botocore's, untranslated by s3fs
                raise self._no_credentials(exc, path) from exc
            raise

    def _no_credentials(self, exc: BaseException, path: Any) -> PermissionError:
        return PermissionError(
            errno.EACCES,
            f"No AWS credentials found for S3 ({self._where()}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, name a profile (AWS_PROFILE or [backends.s3] profile), "
            f"or set [backends.s3] anon = true for a public bucket ({exc})",
            str(path),
        )

    async def _call(self, method: str, **kwargs: Any) -> Any:
        return await self.fs._call_s3(method, **kwargs)

    # -- paths ------------------------------------------------------------------------------
    def _split(self, path: Any) -> tuple[str, str]:
        """``(bucket, key)`` of ``path``; the key has no leading or trailing ``/``."""
        text = path.path if isinstance(path, UPath) else os.fspath(path)
        for prefix in ("s3://", "s3a://"):
            if text.startswith(prefix):
                text = text[len(prefix) :]
                break
        bucket, _, key = text.partition("/")
        if not bucket:
            raise InvalidPathError(f"S3 path {path} names no bucket (expected s3://BUCKET/KEY).")
        key = key.strip("/")
        if key and any(s in (".", "..", "") for s in key.split("/")):
            # S3 keeps such keys literally, tensorstore normalises them: refuse, never split
            # one checkpoint over two prefixes.
            raise InvalidPathError(
                f"S3 path {path} holds '.', '..' or empty segments; write it without them."
            )
        return bucket, key

    def _missing_bucket(self, bucket: str, path: Any, exc: BaseException) -> FileNotFoundError:
        err = FileNotFoundError(
            errno.ENOENT,
            f"S3 bucket {bucket!r} does not exist ({self._where()}); create it first or fix "
            f"the path",
            str(path),
        )
        err.__cause__ = exc
        return err

    # -- listing helpers ----------------------------------------------------------------------
    async def _pages(self, bucket: str, prefix: str, *, delimiter: str | None, **extra: Any):
        """Every page of ``ListObjectsV2`` under ``prefix`` (an async generator)."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, **extra}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            page = await self._call("list_objects_v2", **kwargs)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    async def _all_keys(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        """``(key, size)`` of every object under ``prefix`` (recursive, all pages)."""
        out: list[tuple[str, int]] = []
        async for page in self._pages(bucket, prefix, delimiter=None):
            out.extend((o["Key"], int(o.get("Size", 0))) for o in page.get("Contents", []))
        return out

    # -- primitives --------------------------------------------------------------------------
    async def exists(self, path: UPath) -> bool:
        return await self._io(self._exists(path), path)

    async def _exists(self, path: UPath) -> bool:
        bucket, key = self._split(path)
        if not key:
            return await self._bucket_exists(bucket)
        # One LIST finds both the object `key` and the prefix `key/`: with the delimiter,
        # siblings such as `key.ckpt-writer-*/` collapse into one entry each, and the
        # results are sorted, so `key` comes first and `key/` right after `key<c>` names
        # with c < "/".
        want_dir = key + "/"
        try:
            async for page in self._pages(bucket, key, delimiter="/"):
                names = [o["Key"] for o in page.get("Contents", [])]
                names += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
                if key in names or want_dir in names:
                    return True
                if names and max(names) > want_dir:
                    return False
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                return False
            raise
        return False

    async def _bucket_exists(self, bucket: str) -> bool:
        try:
            await self._call("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except FileNotFoundError:
            return False
        return True

    async def is_dir(self, path: UPath) -> bool:
        return await self._io(self._is_dir(path), path)

    async def _is_dir(self, path: UPath) -> bool:
        bucket, key = self._split(path)
        if not key:
            return await self._bucket_exists(bucket)
        try:
            page = await self._call(
                "list_objects_v2", Bucket=bucket, Prefix=key + "/", Delimiter="/", MaxKeys=1
            )
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                return False
            raise
        return bool(page.get("Contents") or page.get("CommonPrefixes"))

    async def mkdir(
        self, path: UPath, *, parents: bool = True, exist_ok: bool = True, mode: int | None = None
    ) -> None:
        """Writes nothing: S3 has no directories (a prefix exists once an object is under
        it). The first call for a bucket checks that the bucket exists (one LIST), so a
        save into a missing bucket fails here, naming it, before tensorstore writes
        anything (tensorstore would retry its PUTs on 404 forever).

        ``exist_ok=False`` cannot be enforced; ckpt's writer directories are unique by
        name, and the commit itself is guarded by the conditional put. ``mode`` is ignored
        (no ``permissions`` capability)."""
        bucket, _ = self._split(path)  # still refuse a path without a bucket
        if bucket not in self._buckets_seen:
            # tensorstore retries a PUT into a missing bucket forever: check it once first.
            await self._io(self._require_bucket(bucket, path), path)

    async def _require_bucket(self, bucket: str, path: Any) -> None:
        try:
            await self._call("list_objects_v2", Bucket=bucket, MaxKeys=1)
        except FileNotFoundError as exc:
            raise self._missing_bucket(bucket, path, exc) from exc
        self._buckets_seen.add(bucket)

    async def list_dir(self, path: UPath) -> list[Entry]:
        return await self._io(self._list_dir(path), path)

    async def _list_dir(self, path: UPath) -> list[Entry]:
        bucket, key = self._split(path)
        prefix = key + "/" if key else ""
        entries: dict[str, Entry] = {}
        try:
            async for page in self._pages(bucket, prefix, delimiter="/"):
                for p in page.get("CommonPrefixes", []):
                    name = p["Prefix"][len(prefix) :].rstrip("/")
                    if name:
                        entries[name] = Entry(name, True, False)
                for o in page.get("Contents", []):
                    name = o["Key"][len(prefix) :]
                    # `prefix` itself is a directory marker (SeaweedFS, consoles): skip it.
                    if name and name not in entries:
                        entries[name] = Entry(name, False, False)
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                raise self._missing_bucket(bucket, path, exc) from exc
            raise
        return list(entries.values())

    async def read_bytes(self, path: UPath) -> bytes:
        return await self._io(self._read_bytes(path), path)

    async def _read_bytes(self, path: UPath) -> bytes:
        bucket, key = self._split(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "Is a bucket, not an object", str(path))
        try:
            # max_concurrency=1: one GET, no HEAD to size the object first.
            return await self.fs._cat_file(f"{bucket}/{key}", max_concurrency=1)
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                raise self._missing_bucket(bucket, path, exc) from exc
            raise FileNotFoundError(errno.ENOENT, "No such S3 object", str(path)) from exc

    async def write_bytes(self, path: UPath, data: bytes) -> None:
        await self._io(self._write_bytes(path, data), path)

    async def _write_bytes(self, path: UPath, data: bytes) -> None:
        bucket, key = self._split(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "Cannot write to a bucket", str(path))
        try:
            await self.fs._pipe_file(f"{bucket}/{key}", bytes(data))
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                raise self._missing_bucket(bucket, path, exc) from exc
            raise

    async def create_exclusive(self, path: UPath, data: bytes) -> None:
        await self._io(self._create_exclusive(path, data), path)

    async def _create_exclusive(self, path: UPath, data: bytes) -> None:
        bucket, key = self._split(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "Cannot write to a bucket", str(path))
        # A unique id in the object's metadata tells our own object from another writer's:
        # if the PUT succeeded but its answer was lost, the client's retry meets 412
        # caused by that very object, which must count as success, not as a conflict.
        create_id = uuid.uuid4().hex
        for attempt in range(_CONFLICT_ATTEMPTS):
            try:
                await self.fs._pipe_file(
                    f"{bucket}/{key}",
                    bytes(data),
                    mode="create",
                    Metadata={_CREATE_ID: create_id},
                )
                return
            except Exception as exc:
                if _is_precondition_failed(exc):
                    if await self._created_by(bucket, key, create_id):
                        logger.info("Conditional put of %s: retried after success", path)
                        return
                    raise FileExistsError(
                        errno.EEXIST,
                        "S3 object already exists (conditional put refused)",
                        str(path),
                    ) from exc
                if _is_no_such_bucket(exc):
                    raise self._missing_bucket(bucket, path, exc) from exc
                if _is_conditional_conflict(exc) and attempt + 1 < _CONFLICT_ATTEMPTS:
                    await asyncio.sleep(min(1.0, 0.02 * 2**attempt) * (0.5 + random.random()))
                    continue
                raise

    async def _created_by(self, bucket: str, key: str, create_id: str) -> bool:
        """True if the object at ``key`` carries ``create_id`` (it is our own)."""
        try:
            head = await self._call("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        return metadata.get(_CREATE_ID) == create_id

    async def remove_file(self, path: UPath) -> None:
        await self._io(self._remove_file(path), path)

    async def _remove_file(self, path: UPath) -> None:
        bucket, key = self._split(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "Not an object", str(path))
        keys = [key]
        parent = key.rpartition("/")[0]
        if parent:
            # A store that keeps directories (SeaweedFS) deletes the parent's marker only
            # if the parent is now empty; elsewhere no such object exists: a no-op.
            keys.append(parent + "/")
        await self._delete_keys(bucket, keys, path, ordered=True)

    async def _delete_keys(
        self, bucket: str, keys: Sequence[str], path: Any, *, ordered: bool = False
    ) -> None:
        """Delete ``keys`` with DeleteObjects (1,000 per request, concurrently unless
        ``ordered``); a missing key or bucket is not an error."""
        batches = [keys[i : i + _DELETE_BATCH] for i in range(0, len(keys), _DELETE_BATCH)]
        semaphore = asyncio.Semaphore(4)

        async def delete(batch: Sequence[str]) -> None:
            async with semaphore:
                try:
                    out = await self._call(
                        "delete_objects",
                        Bucket=bucket,
                        Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                    )
                except FileNotFoundError as exc:
                    if _is_no_such_bucket(exc):
                        return
                    raise
            errors = [e for e in out.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise OSError(
                    errno.EIO,
                    f"S3 refused to delete {len(errors)} object(s) under {path} "
                    f"({self._where()}); first: {first.get('Key')!r}: {first.get('Code')} "
                    f"{first.get('Message', '')}".rstrip(),
                )

        if ordered:
            for batch in batches:
                await delete(batch)
        else:
            await asyncio.gather(*(delete(b) for b in batches))

    async def remove_tree(self, path: UPath) -> None:
        await self._io(self._remove_tree(path), path)

    async def _remove_tree(self, path: UPath) -> None:
        bucket, key = self._split(path)
        prefix = key + "/" if key else ""
        try:
            # Abort incomplete multipart uploads first: an upload completing meanwhile
            # becomes an object that the listing below still finds and deletes.
            await self._abort_uploads(bucket, prefix)
            objects = await self._all_keys(bucket, prefix)
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                return
            raise
        files = [k for k, _ in objects if not k.endswith("/")]
        if key:
            files.append(key)  # an object at the path itself, as a file would be removed
        await self._delete_keys(bucket, files, path)
        # Directory markers (SeaweedFS keeps emptied directories; consoles make folder
        # objects), deepest first, so that no removed name lingers in a listing.
        dirs = {k for k, _ in objects if k.endswith("/")}
        if key:
            dirs.add(prefix)
        for k, _ in objects:
            parts = k[len(prefix) :].split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add(prefix + "/".join(parts[:i]) + "/")
        dirs.discard("")
        dirs.discard("/")
        ordered = sorted(dirs, key=lambda d: (-d.count("/"), d))
        if ordered:
            await self._delete_keys(bucket, ordered, path, ordered=True)

    async def _abort_uploads(self, bucket: str, prefix: str) -> int:
        """Abort every incomplete multipart upload under ``prefix``; return how many."""
        uploads: list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = await self._call("list_multipart_uploads", **kwargs)
            uploads.extend((u["Key"], u["UploadId"]) for u in page.get("Uploads", []))
            if not page.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
        semaphore = asyncio.Semaphore(_CONCURRENCY)

        async def abort(upload_key: str, upload_id: str) -> None:
            async with semaphore:
                try:
                    await self._call(
                        "abort_multipart_upload", Bucket=bucket, Key=upload_key, UploadId=upload_id
                    )
                except (FileNotFoundError, OSError) as exc:
                    if not _is_no_such_upload(exc):
                        raise
            logger.info("Aborted incomplete multipart upload of s3://%s/%s", bucket, upload_key)

        await asyncio.gather(*(abort(k, u) for k, u in uploads))
        return len(uploads)

    async def rename_dir(self, src: UPath, dst: UPath) -> None:
        raise NotImplementedError(
            f"S3 cannot rename directories ({src} -> {dst}): a prefix is moved object by "
            "object (copy + delete), never atomically. ckpt commits on S3 with the "
            "commit_file strategy instead."
        )

    async def sync_tree(self, path: UPath) -> None:
        """No-op: an S3 PUT is durable once it returns."""

    async def sync_dir(self, path: UPath) -> None:
        """No-op: S3 has no directory entries to flush."""

    async def exists_many(self, paths: Sequence[UPath]) -> list[bool]:
        return await self._io(self._exists_many(paths), paths[0] if paths else None)

    async def _exists_many(self, paths: Sequence[UPath]) -> list[bool]:
        semaphore = asyncio.Semaphore(_CONCURRENCY)

        async def one(p: UPath) -> bool:
            async with semaphore:
                return await self._exists(p)

        return list(await asyncio.gather(*(one(p) for p in paths)))

    async def tree_size(self, path: UPath) -> int:
        return await self._io(self._tree_size(path), path)

    async def _tree_size(self, path: UPath) -> int:
        bucket, key = self._split(path)
        try:
            objects = await self._all_keys(bucket, key + "/" if key else "")
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                return 0
            raise
        return sum(size for k, size in objects if not k.endswith("/"))

    async def file_sizes(self, path: UPath) -> dict[str, int]:
        return await self._io(self._file_sizes(path))

    def copy_methods(self) -> list[str]:
        return ["server_side", "read_write"]

    async def copy_tree(self, src: UPath, dst: UPath, *, method: str | None = None) -> str:
        """``server_side`` (default): one recursive LIST of ``src``, then a CopyObject per
        object (a multipart UploadPartCopy above 5 GB): no byte passes through the client."""
        if method == "read_write":
            return await super().copy_tree(src, dst, method=method)
        if method not in (None, "server_side"):
            raise ValueError(
                f"Unknown copy method {method!r} on {self.describe()}; "
                f"available: {', '.join(self.copy_methods())}."
            )
        await self._io(self._copy_tree(src, dst))
        return "server_side"

    async def _copy_tree(self, src: UPath, dst: UPath) -> None:
        bucket, key = self._split(src)
        dst_bucket, dst_key = self._split(dst)
        names = list(await self._file_sizes(src))
        semaphore = asyncio.Semaphore(32)

        async def one(rel: str) -> None:
            async with semaphore:
                await self.fs._cp_file(f"{bucket}/{key}/{rel}", f"{dst_bucket}/{dst_key}/{rel}")

        await asyncio.gather(*(one(rel) for rel in names))

    async def _file_sizes(self, path: UPath) -> dict[str, int]:
        """One recursive LIST (paginated) of everything under ``path``."""
        bucket, key = self._split(path)
        prefix = key + "/" if key else ""
        try:
            objects = await self._all_keys(bucket, prefix)
        except FileNotFoundError as exc:
            if _is_no_such_bucket(exc):
                return {}
            raise
        return {k[len(prefix) :]: size for k, size in objects if not k.endswith("/")}

    async def file_size(self, path: UPath) -> int:
        return await self._io(self._file_size(path), path)

    async def modified_ns(self, path: UPath) -> int | None:
        return await self._io(self._modified_ns(path))

    async def _modified_ns(self, path: UPath) -> int | None:
        """The newest ``LastModified`` of the objects under ``path`` (one LIST per 1,000)."""
        bucket, key = self._split(path)
        newest: int | None = None
        async for page in self._pages(bucket, key + "/" if key else "", delimiter=None):
            for obj in page.get("Contents", []):
                stamp = obj.get("LastModified")
                if stamp is not None:
                    ns = int(stamp.timestamp() * 1e9)
                    newest = ns if newest is None else max(newest, ns)
        return newest

    async def _file_size(self, path: UPath) -> int:
        bucket, key = self._split(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "Is a bucket, not an object", str(path))
        try:
            out = await self._call("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError as exc:
            raise FileNotFoundError(errno.ENOENT, "No such S3 object", str(path)) from exc
        return int(out["ContentLength"])

    # -- array data -----------------------------------------------------------------------------
    def kvstore_spec(self, path: UPath) -> dict[str, Any]:
        """tensorstore's ``s3`` kvstore for ``path``, on the endpoint this backend resolved
        (tensorstore ignores ``AWS_ENDPOINT_URL``), with a credentials *source* (never a
        secret): ``anonymous``, the configured ``profile``, ``environment`` when
        ``AWS_ACCESS_KEY_ID`` is set, else AWS's ``default`` chain."""
        bucket, key = self._split(path)
        s = self.settings
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket}
        if key:
            spec["path"] = key + "/"
        if s.endpoint_url:
            spec["endpoint"] = s.endpoint_url
        region = s.region or (_DEFAULT_ENDPOINT_REGION if s.endpoint_url else None)
        if region:
            spec["aws_region"] = region
        spec["aws_credentials"] = self._credentials_source()
        return spec

    def _credentials_source(self) -> dict[str, Any]:
        s = self.settings
        if s.anon:
            return {"type": "anonymous"}
        if s.profile:
            # As botocore: a profile named explicitly beats credentials in the environment.
            return {"type": "profile", "profile": s.profile}
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            return {"type": "environment"}
        return {"type": "default"}


@hookimpl
def register_backends(register: Any) -> None:
    register(S3Backend, schemes=("s3", "s3a"))
