"""Google Cloud Storage: flat buckets and hierarchical-namespace (HNS) buckets.

What a GCS bucket can do depends on the bucket: a flat bucket has no directories and no
directory rename, an HNS bucket has real folders and an atomic ``RenameFolder``. The layout
is detected once per bucket (Storage Control ``GetStorageLayout``) and cached.

:class:`GCSBackend` is what ckpt's registry instantiates (one per configuration). Its
:meth:`GCSBackend.bind` returns the :class:`GCSBucketBackend` *view* of one bucket, whose
``capabilities`` and ``default_strategy`` reflect that bucket's layout:

- flat: ``conditional_put`` (``ifGenerationMatch=0`` on a multipart upload) and
  ``commit_file`` by default;
- HNS: ``atomic_dir_rename`` (``RenameFolder``), ``folders`` and ``conditional_put``, and
  ``rename`` by default.

Object I/O goes through gcsfs's async API (JSON API); folder operations go through the
Storage Control gRPC API (``google-cloud-storage-control``), called directly: gcsfs's own
experimental HNS code path is never used. Array data goes through tensorstore's ``gcs``
kvstore driver (:meth:`GCSBackend.kvstore_spec`).
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import errno
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from upath import UPath

from ckpt import _sync
from ckpt.backend import Backend, Capabilities, Entry
from ckpt_backend_gcs._options import GCSOptions

__all__ = [
    "FLAT_CAPABILITIES",
    "HNS_CAPABILITIES",
    "GCSBackend",
    "GCSBucketBackend",
    "Layout",
    "split_path",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A flat bucket: objects only; create-if-absent through ``ifGenerationMatch=0``.
FLAT_CAPABILITIES = Capabilities(conditional_put=True, snapshot=True)
#: A hierarchical-namespace bucket: real folders and an atomic folder rename.
HNS_CAPABILITIES = Capabilities(
    atomic_dir_rename=True, conditional_put=True, snapshot=True, folders=True
)

#: Custom metadata key holding a per-call id on conditionally created objects: if a retried
#: upload meets its own earlier (successful) attempt, the id tells it that it won.
CREATE_ID_KEY = "ckpt-create-id"
#: How many requests one primitive has in flight at most.
_CONCURRENCY = 32


class Layout(enum.StrEnum):
    """A bucket's namespace layout."""

    FLAT = "flat"
    HNS = "hns"


def split_path(path: Any) -> tuple[str, str]:
    """``(bucket, key)`` of ``gs://bucket/key`` (key without leading/trailing slashes)."""
    if isinstance(path, UPath):
        text = path.path
    else:
        text = os.fspath(path)
        if "://" in text:
            text = text.split("://", 1)[1]
    bucket, _, key = text.partition("/")
    if not bucket:
        raise ValueError(f"A GCS path needs a bucket: {path!s}")
    return bucket, key.strip("/")


def _folder_name(bucket: str, key: str) -> str:
    return f"projects/_/buckets/{bucket}/folders/{key}/"


def _status_name(exc: BaseException) -> str | None:
    """The gRPC status name of a google-api-core error (also a failed long-running
    operation, which carries the status only in ``errors``)."""
    code = getattr(exc, "grpc_status_code", None)
    if code is not None:
        return str(code.name)
    from google.rpc import code_pb2

    for error in getattr(exc, "errors", None) or ():
        value = getattr(error, "code", None)
        if isinstance(value, int) and value in code_pb2.Code.values():
            return str(code_pb2.Code.Name(value))
    return None


class _LoopClients:
    """The clients bound to one event loop (aiohttp session, gRPC channel)."""

    def __init__(self) -> None:
        self.fs: Any = None
        self.control: Any = None
        self.control_made = False
        self.lock = asyncio.Lock()


class GCSBackend(Backend):
    """``gs://`` and ``gcs://``: Google Cloud Storage (see the module docstring).

    The class-level capabilities are those every bucket has (flat); use :meth:`bind` for the
    backend of one bucket. The primitives of this object work on any bucket: each call is
    handed to the view of the path's bucket.
    """

    scheme = "gs"
    package = "ckpt-backend-gcs"
    capabilities = FLAT_CAPABILITIES
    default_strategy = "commit_file"
    names_decide_commit = False
    #: What a bucket's view declares, by layout (for listings such as ``ckpt backends``).
    capability_variants: dict[str, tuple[Capabilities, str]] = {
        "flat bucket": (FLAT_CAPABILITIES, "commit_file"),
        "HNS bucket": (HNS_CAPABILITIES, "rename"),
    }

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._opts = GCSOptions.from_mapping(self.options)
        self._root: GCSBackend = self
        self._views: dict[str, GCSBucketBackend] = {}
        self._layouts: dict[str, Layout] = {}
        self._state_lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = (
            weakref.WeakKeyDictionary()
        )
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self._opts.endpoint_url or 'google'!r})"

    def describe(self) -> str:
        return "gcs"

    # -- per-bucket views -----------------------------------------------------------------
    def bind(self, path: Any) -> GCSBucketBackend:
        """The backend of the bucket of ``path``: capabilities and default strategy follow
        the bucket's layout, detected on first use and cached (one call per bucket)."""
        bucket, _ = split_path(self.path(path))
        view = self._root._views.get(bucket)
        if view is not None:
            return view
        return self._root._view_for(bucket, self._root._detect_blocking(bucket))

    async def bind_async(self, path: Any) -> GCSBucketBackend:
        """:meth:`bind` for coroutines (detects the layout without blocking the loop)."""
        bucket, _ = split_path(self.path(path))
        root = self._root
        view = root._views.get(bucket)
        if view is not None:
            return view
        return root._view_for(bucket, await root._detect(bucket))

    def layout_of(self, bucket: str) -> Layout | None:
        """The cached layout of ``bucket`` (None until it was detected)."""
        return self._root._layouts.get(bucket)

    def _view_for(self, bucket: str, layout: Layout | None) -> GCSBucketBackend:
        with self._state_lock:
            view = self._views.get(bucket)
            if view is None:
                view = GCSBucketBackend(self, bucket, layout or Layout.FLAT)
                if layout is not None:  # a missing bucket is looked at again next time
                    self._layouts[bucket] = layout
                    self._views[bucket] = view
            return view

    def _detect_blocking(self, bucket: str) -> Layout | None:
        forced = self._forced_layout()
        if forced is not None:
            return forced
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _sync.run(self._detect(bucket))
        # Called from a coroutine (the loop cannot be blocked on itself): detect once on a
        # private loop in a helper thread, with clients made for that loop and closed after.
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt-gcs-layout") as pool:
            return pool.submit(asyncio.run, self._detect_private(bucket)).result()

    async def _detect_private(self, bucket: str) -> Layout | None:
        try:
            return await self._detect(bucket)
        finally:
            await self._close_loop_clients()

    def _forced_layout(self) -> Layout | None:
        layout = self._opts.layout
        return None if layout == "auto" else Layout(layout)

    async def _detect(self, bucket: str) -> Layout | None:
        """Ask Storage Control for the layout of ``bucket``; None if the bucket is missing."""
        forced = self._forced_layout()
        if forced is not None:
            return forced
        control = await self._control()
        if control is None:
            self._warn_once(
                "no-control",
                logging.INFO,
                "GCS emulator at %s without a storage_control_endpoint: treating every bucket "
                "as flat (commit_file).",
                self._opts.endpoint_url,
            )
            return Layout.FLAT
        from google.api_core import exceptions as gexc

        name = f"projects/_/buckets/{bucket}/storageLayout"
        try:
            response = await control.get_storage_layout(name=name, timeout=self._opts.rpc_timeout_s)
        except gexc.NotFound:
            return None
        except (gexc.PermissionDenied, gexc.Unauthenticated, gexc.Forbidden) as exc:
            self._warn_once(
                f"layout-{bucket}",
                logging.WARNING,
                "Cannot read the storage layout of gs://%s (%s); treating it as a flat bucket "
                "(commit_file). Allow GetStorageLayout on the bucket, or set layout = 'flat' "
                "or 'hns' in [backends.gs] to skip detection.",
                bucket,
                exc,
            )
            return Layout.FLAT
        except gexc.GoogleAPICallError as exc:
            raise OSError(
                f"Could not detect the layout of bucket gs://{bucket} (Storage Control "
                f"GetStorageLayout failed: {exc}). Set layout = 'flat' or 'hns' in "
                "[backends.gs] to skip detection."
            ) from exc
        hns = response.hierarchical_namespace
        layout = Layout.HNS if hns is not None and hns.enabled else Layout.FLAT
        logger.debug("gs://%s has a %s layout", bucket, layout)
        return layout

    def _warn_once(self, key: str, level: int, message: str, *args: Any) -> None:
        if key not in self._root._warned:
            self._root._warned.add(key)
            logger.log(level, message, *args)

    # -- clients, one set per event loop ----------------------------------------------------
    def _loop_clients(self) -> _LoopClients:
        root = self._root
        loop = asyncio.get_running_loop()
        with root._state_lock:
            clients = root._loops.get(loop)
            if clients is None:
                clients = root._loops[loop] = _LoopClients()
            return clients

    async def _fs(self) -> Any:
        """The gcsfs filesystem (async mode) bound to the running loop."""
        clients = self._loop_clients()
        if clients.fs is None:
            import aiohttp
            from gcsfs.core import DEFAULT_PROJECT, GCSFileSystem  # never gcsfs's HNS path

            opts = self._opts
            clients.fs = GCSFileSystem(
                # gcsfs's default is aiohttp's: 300 s for a whole request, then a plain
                # TimeoutError that gcsfs does not retry, so a hanging request stalled a save
                # for 5 minutes and then failed it (and capped any transfer at 5 minutes). A
                # silent socket is given up after read_timeout_s instead, and gcsfs retries
                # it; a slow but moving transfer is never cut.
                requests_timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=opts.connect_timeout_s,
                    sock_read=opts.read_timeout_s,
                ),
                project=opts.project if opts.project is not None else DEFAULT_PROJECT,
                token=opts.token,
                endpoint_url=opts.endpoint_url,
                asynchronous=True,
                loop=asyncio.get_running_loop(),
                skip_instance_cache=True,
                use_listings_cache=False,
            )
        return clients.fs

    async def _control(self) -> Any:
        """The Storage Control client bound to the running loop (None with an emulator and
        no ``storage_control_endpoint``)."""
        clients = self._loop_clients()
        if not clients.control_made:
            async with clients.lock:
                if not clients.control_made:
                    clients.control = await self._make_control()
                    clients.control_made = True
        return clients.control

    async def _make_control(self) -> Any:
        opts = self._opts
        endpoint = opts.storage_control_endpoint
        if endpoint is None and opts.emulator:
            return None
        import grpc
        from google.cloud.storage_control_v2 import StorageControlAsyncClient
        from google.cloud.storage_control_v2.services.storage_control.transports import (
            StorageControlGrpcAsyncIOTransport,
        )

        if endpoint is not None and endpoint.startswith(("http://", "grpc://")):
            # A plaintext endpoint (a test server): no TLS, no credentials.
            target = endpoint.split("://", 1)[1].rstrip("/")
            channel = grpc.aio.insecure_channel(target)
            return StorageControlAsyncClient(
                transport=StorageControlGrpcAsyncIOTransport(channel=channel)
            )
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        fs = await self._fs()
        credentials = getattr(fs.credentials, "credentials", None)
        if credentials is None and opts.token == "anon":
            credentials = AnonymousCredentials()
        client_options = None
        if endpoint is not None:
            host = endpoint.split("://", 1)[-1].rstrip("/")
            client_options = ClientOptions(api_endpoint=host)
        return StorageControlAsyncClient(credentials=credentials, client_options=client_options)

    async def _require_control(self) -> Any:
        control = await self._control()
        if control is None:
            raise RuntimeError(
                "This GCS backend has no Storage Control client: with an emulator endpoint, "
                "folder operations need storage_control_endpoint in [backends.gs]."
            )
        return control

    async def _close_loop_clients(self) -> None:
        root = self._root
        loop = asyncio.get_running_loop()
        with root._state_lock:
            clients = root._loops.pop(loop, None)
        if clients is None:
            return
        if clients.control is not None:
            try:
                await clients.control.transport.close()
            except Exception as exc:  # closing is best effort
                logger.debug("closing the Storage Control client failed: %r", exc)
        session = getattr(clients.fs, "_session", None)
        if session is not None and not session.closed:
            await session.close()

    def close(self) -> None:
        """Close the clients made for ckpt's I/O loop (the backend stays usable)."""
        _sync.run(self._close_loop_clients())

    # -- primitives: handed to the bucket's view -------------------------------------------
    async def _view(self, path: UPath) -> GCSBucketBackend:
        return await self.bind_async(path)

    async def exists(self, path: UPath) -> bool:
        return await (await self._view(path)).exists(path)

    async def is_dir(self, path: UPath) -> bool:
        return await (await self._view(path)).is_dir(path)

    async def mkdir(
        self, path: UPath, *, parents: bool = True, exist_ok: bool = True, mode: int | None = None
    ) -> None:
        view = await self._view(path)
        await view.mkdir(path, parents=parents, exist_ok=exist_ok, mode=mode)

    async def list_dir(self, path: UPath) -> list[Entry]:
        return await (await self._view(path)).list_dir(path)

    async def read_bytes(self, path: UPath) -> bytes:
        return await (await self._view(path)).read_bytes(path)

    async def write_bytes(self, path: UPath, data: bytes) -> None:
        await (await self._view(path)).write_bytes(path, data)

    async def create_exclusive(self, path: UPath, data: bytes) -> None:
        await (await self._view(path)).create_exclusive(path, data)

    async def remove_file(self, path: UPath) -> None:
        await (await self._view(path)).remove_file(path)

    async def remove_tree(self, path: UPath) -> None:
        await (await self._view(path)).remove_tree(path)

    async def rename_dir(self, src: UPath, dst: UPath) -> None:
        await (await self._view(src)).rename_dir(src, dst)

    async def exists_many(self, paths: Sequence[UPath]) -> list[bool]:
        return await _gather_limited([self.exists(p) for p in paths])

    async def exists_in_children(
        self, base: UPath, names: Sequence[str], filename: str
    ) -> list[bool]:
        view = await self._view(base)
        return await view.exists_in_children(base, names, filename)

    async def file_size(self, path: UPath) -> int:
        return await (await self._view(path)).file_size(path)

    async def tree_size(self, path: UPath) -> int:
        return await (await self._view(path)).tree_size(path)

    async def file_sizes(self, path: UPath) -> dict[str, int]:
        return await (await self._view(path)).file_sizes(path)

    async def modified_ns(self, path: UPath) -> int | None:
        return await (await self._view(path)).modified_ns(path)

    def copy_methods(self) -> list[str]:
        return ["server_side", "read_write"]

    async def copy_tree(self, src: UPath, dst: UPath, *, method: str | None = None) -> str:
        return await (await self._view(src)).copy_tree(src, dst, method=method)

    # -- array data -----------------------------------------------------------------------
    def kvstore_spec(self, path: UPath) -> dict[str, Any]:
        """tensorstore's ``gcs`` driver. It has no endpoint member: against an emulator,
        tensorstore needs ``TENSORSTORE_GCS_HTTP_URL`` (and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``)
        in the environment."""
        bucket, key = split_path(self.path(path))
        if self._opts.emulator:
            configured = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "").rstrip("/")
            if configured != (self._opts.endpoint_url or ""):
                self._warn_once(
                    "tensorstore-url",
                    logging.WARNING,
                    "The GCS backend uses the emulator %s but TENSORSTORE_GCS_HTTP_URL is %r: "
                    "tensorstore (array data) will not reach the emulator. Set "
                    "TENSORSTORE_GCS_HTTP_URL=%s (and GOOGLE_AUTH_TOKEN_FOR_TESTING).",
                    self._opts.endpoint_url,
                    configured or None,
                    self._opts.endpoint_url,
                )
        return {"driver": "gcs", "bucket": bucket, "path": f"{key}/" if key else ""}


class GCSBucketBackend(GCSBackend):
    """The backend of one bucket; made by :meth:`GCSBackend.bind`, never directly.

    Attributes:
        bucket: the bucket's name.
        layout: :class:`Layout` of the bucket.
    """

    def __init__(self, root: GCSBackend, bucket: str, layout: Layout) -> None:
        Backend.__init__(self, root.options)
        self._root = root
        self._opts = root._opts
        self.bucket = bucket
        self.layout = layout
        hns = layout is Layout.HNS
        self.capabilities = HNS_CAPABILITIES if hns else FLAT_CAPABILITIES
        self.default_strategy = "rename" if hns else "commit_file"

    def __repr__(self) -> str:
        return f"GCSBucketBackend(bucket={self.bucket!r}, layout={self.layout.value!r})"

    def describe(self) -> str:
        kind = "HNS" if self.layout is Layout.HNS else "flat"
        return f"gcs ({kind} bucket {self.bucket!r})"

    @property
    def hns(self) -> bool:
        return self.layout is Layout.HNS

    # -- helpers ----------------------------------------------------------------------------
    async def _view(self, path: UPath) -> GCSBucketBackend:
        self._key(path)
        return self

    def _key(self, path: Any) -> str:
        bucket, key = split_path(path)
        if bucket != self.bucket:
            raise ValueError(
                f"{self!r} serves gs://{self.bucket} only, got {path!s}: get the backend of "
                "that path with GCSBackend.bind(path)."
            )
        return key

    def _obj(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    async def _object(self, key: str) -> dict[str, Any] | None:
        """The object resource of ``key``, or None."""
        fs = await self._fs()
        try:
            return await fs._call("GET", "b/{}/o/{}", self.bucket, key, json_out=True)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    async def _has_children(self, key: str) -> bool:
        fs = await self._fs()
        try:
            items, prefixes = await fs._do_list_objects(self._obj(key), max_results=1)
        except FileNotFoundError:
            return False
        return bool(items or prefixes)

    async def _bucket_exists(self) -> bool:
        fs = await self._fs()
        try:
            await fs._call("GET", "b/{}", self.bucket, json_out=True)
        except FileNotFoundError:
            return False
        except OSError as exc:  # no storage.buckets.get: a listing still answers
            if not str(exc).startswith("Forbidden"):
                raise
            try:
                await fs._do_list_objects(self.bucket, max_results=1)
            except FileNotFoundError:
                return False
        return True

    async def _get_folder(self, key: str) -> bool:
        from google.api_core import exceptions as gexc

        control = await self._require_control()
        try:
            await control.get_folder(
                name=_folder_name(self.bucket, key), timeout=self._opts.rpc_timeout_s
            )
        except gexc.NotFound:
            return False
        return True

    async def _list_folders(self, prefix: str, *, delimiter: str) -> list[str]:
        """Folder ids (``a/b/``) under ``prefix`` (itself included), all pages."""
        from google.api_core import exceptions as gexc
        from google.cloud.storage_control_v2 import ListFoldersRequest

        control = await self._require_control()
        request = ListFoldersRequest(
            parent=f"projects/_/buckets/{self.bucket}", prefix=prefix, delimiter=delimiter
        )
        marker = f"projects/_/buckets/{self.bucket}/folders/"
        out: list[str] = []
        try:
            pager = await control.list_folders(request=request, timeout=self._opts.rpc_timeout_s)
            async for folder in pager:
                name = folder.name
                if name.startswith(marker):
                    out.append(name[len(marker) :].rstrip("/") + "/")
        except gexc.NotFound:
            return []
        return out

    # -- primitives -------------------------------------------------------------------------
    async def exists(self, path: UPath) -> bool:
        key = self._key(path)
        if not key:
            return await self._bucket_exists()
        if await self._object(key) is not None:
            return True
        return await self._is_dir_key(key)

    async def is_dir(self, path: UPath) -> bool:
        key = self._key(path)
        if not key:
            return await self._bucket_exists()
        return await self._is_dir_key(key)

    async def _is_dir_key(self, key: str) -> bool:
        if self.hns and await self._get_folder(key):
            return True
        return await self._has_children(key)

    async def mkdir(
        self, path: UPath, *, parents: bool = True, exist_ok: bool = True, mode: int | None = None
    ) -> None:
        """HNS: create the folder (``CreateFolder``, recursive with ``parents``). Flat: a
        directory exists only through the objects under it, so nothing is written; with
        ``exist_ok=False`` an existing name still raises. ``mode`` is ignored (GCS has no
        permission bits)."""
        key = self._key(path)
        if not key:
            return
        if not self.hns:
            if not exist_ok and await self.exists(path):
                raise FileExistsError(errno.EEXIST, "Already exists", str(path))
            return
        from google.api_core import exceptions as gexc
        from google.cloud.storage_control_v2 import CreateFolderRequest

        control = await self._require_control()
        request = CreateFolderRequest(
            parent=f"projects/_/buckets/{self.bucket}",
            folder_id=f"{key}/",
            recursive=parents,
            request_id=str(uuid.uuid4()),
        )
        try:
            await control.create_folder(request=request, timeout=self._opts.rpc_timeout_s)
        except gexc.Conflict:  # AlreadyExists
            if not exist_ok:
                raise FileExistsError(errno.EEXIST, "Folder already exists", str(path)) from None
        except gexc.FailedPrecondition as exc:
            raise FileNotFoundError(
                errno.ENOENT, f"Parent folder does not exist ({exc.message})", str(path)
            ) from None

    async def list_dir(self, path: UPath) -> list[Entry]:
        key = self._key(path)
        base = f"{key}/" if key else ""
        if self.hns:
            (files, dirs), folders = await asyncio.gather(
                self._list_objects(key), self._list_folders(base, delimiter="/")
            )
            dirs |= {f[len(base) :].rstrip("/") for f in folders if f != base}
        else:
            files, dirs = await self._list_objects(key)
        return [Entry(name, True) for name in sorted(dirs)] + [
            Entry(name, False) for name in sorted(files) if name
        ]

    async def _list_objects(self, key: str) -> tuple[set[str], set[str]]:
        """One level under ``key``: (file names, directory names), every page."""
        fs = await self._fs()
        base = f"{key}/" if key else ""
        try:
            items, prefixes = await fs._do_list_objects(self._obj(key) if key else self.bucket)
        except FileNotFoundError:
            return set(), set()
        strip = len(self.bucket) + 1 + len(base)
        files = {item["name"][strip:] for item in items}
        files.discard("")  # the directory marker object "key/" itself
        dirs = {p[len(base) :].rstrip("/") for p in prefixes}
        dirs.discard("")
        return files, dirs

    async def read_bytes(self, path: UPath) -> bytes:
        key = self._key(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "A bucket is not a file", str(path))
        fs = await self._fs()
        try:
            return bytes(await fs._cat_file(self._obj(key)))
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "No such object", str(path)) from None

    async def write_bytes(self, path: UPath, data: bytes) -> None:
        key = self._file_key(path)
        fs = await self._fs()
        await fs._pipe_file(self._obj(key), bytes(data))

    async def create_exclusive(self, path: UPath, data: bytes) -> None:
        """``ifGenerationMatch=0`` on a multipart upload: GCS creates the object only if it
        does not exist, so exactly one of several racing creators succeeds.

        gcsfs retries failed requests; a retry whose first attempt did succeed meets a 412
        of its own making. Each call tags its object with a unique id, so such a retry is
        recognized (and succeeds) instead of being taken for another writer's object."""
        key = self._file_key(path)
        fs = await self._fs()
        create_id = uuid.uuid4().hex
        try:
            await fs._pipe_file(
                self._obj(key), bytes(data), mode="create", metadata={CREATE_ID_KEY: create_id}
            )
        except FileExistsError:
            existing = await self._object(key)
            if (
                existing is not None
                and (existing.get("metadata") or {}).get(CREATE_ID_KEY) == create_id
            ):
                return
            raise FileExistsError(
                errno.EEXIST, "Object already exists (ifGenerationMatch=0 failed)", str(path)
            ) from None

    def _file_key(self, path: UPath) -> str:
        key = self._key(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "A bucket is not a file", str(path))
        return key

    async def remove_file(self, path: UPath) -> None:
        key = self._file_key(path)
        fs = await self._fs()
        try:
            await fs._rm_file(self._obj(key))
        except FileNotFoundError:
            pass

    async def remove_tree(self, path: UPath) -> None:
        """Delete every object under ``path`` (and the object ``path`` if it is a file);
        on HNS buckets then the folders, deepest first."""
        key = self._key(path)
        if not key:
            raise ValueError(f"Refusing to remove a whole bucket: {path!s}")
        fs = await self._fs()
        try:
            items, _ = await fs._do_list_objects(self._obj(key), delimiter=None)
        except FileNotFoundError:
            items = []
        names = [item["name"] for item in items]
        if names:
            await self._delete_objects(names)
        else:
            try:
                await fs._rm_file(self._obj(key))
            except FileNotFoundError:
                pass
        if self.hns:
            await self._delete_folders(key)

    async def _delete_objects(self, names: list[str]) -> None:
        fs = await self._fs()
        if fs.on_google:  # batch requests of 100
            results = await fs._delete_files(names, 100)
        else:  # emulators have no batch endpoint
            results = await _gather_limited(
                [fs._rm_file(name) for name in names], return_exceptions=True
            )
        errors = [
            r
            for r in results
            if isinstance(r, Exception)
            and not isinstance(r, FileNotFoundError)
            and "No such object" not in str(r)
        ]
        if errors:
            raise errors[0]

    async def _delete_folders(self, key: str) -> None:
        """Delete folder ``key/`` and the folders under it, leaf first."""
        from google.api_core import exceptions as gexc

        control = await self._require_control()
        folders = await self._list_folders(f"{key}/", delimiter="")
        by_depth: dict[int, list[str]] = {}
        for folder in folders:
            by_depth.setdefault(folder.count("/"), []).append(folder)

        async def delete(folder: str) -> None:
            try:
                await control.delete_folder(
                    name=_folder_name(self.bucket, folder.rstrip("/")),
                    timeout=self._opts.rpc_timeout_s,
                )
            except gexc.NotFound:
                pass
            except gexc.FailedPrecondition as exc:
                raise OSError(
                    errno.ENOTEMPTY,
                    f"Folder is not empty (written to while it was removed?): {exc.message}",
                    f"gs://{self.bucket}/{folder}",
                ) from None

        for depth in sorted(by_depth, reverse=True):
            await _gather_limited([delete(f) for f in by_depth[depth]])

    async def rename_dir(self, src: UPath, dst: UPath) -> None:
        """HNS: ``RenameFolder`` (atomic on GCS), awaited up to ``rename_timeout_s``.
        ``FileExistsError`` if ``dst`` exists: checked first, and GCS refuses a rename onto
        an existing folder, so of two racing renames to one name only one succeeds."""
        if not self.hns:
            raise NotImplementedError(
                f"{self.describe()} cannot rename directories atomically (a flat bucket has "
                "no folders): use the commit_file strategy, or a hierarchical-namespace bucket."
            )
        skey, dkey = self._key(src), self._key(dst)
        if not skey or not dkey:
            raise ValueError(f"Cannot rename a bucket: {src!s} -> {dst!s}")
        if await self.exists(dst):
            raise FileExistsError(errno.EEXIST, "Destination exists", str(dst))
        from google.api_core import exceptions as gexc
        from google.cloud.storage_control_v2 import RenameFolderRequest

        control = await self._require_control()
        request = RenameFolderRequest(
            name=_folder_name(self.bucket, skey),
            destination_folder_id=f"{dkey}/",
            request_id=str(uuid.uuid4()),
        )
        what = f"RenameFolder of {src!s} to {dst!s} (bucket {self.bucket})"
        timeout = self._opts.rename_timeout_s
        operation = None
        try:
            operation = await control.rename_folder(
                request=request, timeout=self._opts.rpc_timeout_s
            )
            await operation.result(timeout=timeout)
        except (TimeoutError, gexc.DeadlineExceeded) as exc:
            op_name = getattr(getattr(operation, "operation", None), "name", None)
            raise TimeoutError(
                f"{what} did not finish within {timeout:g} s"
                + (f" (operation {op_name})" if op_name else "")
                + f"; it may still complete: check whether {dst!s} exists before retrying. "
                "Raise rename_timeout_s in [backends.gs] for very large folders."
            ) from exc
        except gexc.GoogleAPICallError as exc:
            status = _status_name(exc)
            if status == "ALREADY_EXISTS":
                raise FileExistsError(
                    errno.EEXIST, f"{what}: destination exists", str(dst)
                ) from exc
            if status == "NOT_FOUND":
                raise FileNotFoundError(
                    errno.ENOENT, f"{what}: source not found", str(src)
                ) from exc
            raise OSError(f"{what} failed ({status or 'error'}): {exc}") from exc

    async def exists_many(self, paths: Sequence[UPath]) -> list[bool]:
        return await _gather_limited([self.exists(p) for p in paths])

    async def exists_in_children(
        self, base: UPath, names: Sequence[str], filename: str
    ) -> list[bool]:
        """Discovery's batched marker check: one object GET per child, concurrently (the
        marker is an object, so a miss needs no folder or prefix lookup)."""
        key = self._key(base)
        prefix = f"{key}/" if key else ""

        async def present(name: str) -> bool:
            return await self._object(f"{prefix}{name}/{filename}") is not None

        return await _gather_limited([present(n) for n in names])

    async def file_size(self, path: UPath) -> int:
        key = self._file_key(path)
        resource = await self._object(key)
        if resource is None:
            raise FileNotFoundError(errno.ENOENT, "No such object", str(path))
        return int(resource.get("size", 0))

    async def _objects_under(self, path: UPath) -> list[dict[str, Any]] | None:
        """Every object under ``path`` (one recursive listing), None if there is none."""
        key = self._key(path)
        fs = await self._fs()
        try:
            items, _ = await fs._do_list_objects(
                self._obj(key) if key else self.bucket, delimiter=None
            )
        except FileNotFoundError:
            return None
        return list(items)

    async def tree_size(self, path: UPath) -> int:
        items = await self._objects_under(path)
        return sum(int(item.get("size", 0)) for item in items or [])

    async def file_sizes(self, path: UPath) -> dict[str, int]:
        """One recursive object listing of everything under ``path``."""
        items = await self._objects_under(path)
        if items is None:
            return {}
        key = self._key(path)
        prefix = f"{key}/" if key else ""
        out: dict[str, int] = {}
        for item in items:
            name = str(item.get("name", ""))
            # gcsfs names are "bucket/key"; folder placeholders end with "/".
            name = name.split("/", 1)[1] if "/" in name else name
            if name.startswith(prefix) and not name.endswith("/"):
                out[name[len(prefix) :]] = int(item.get("size", 0))
        return out

    async def modified_ns(self, path: UPath) -> int | None:
        """The newest ``updated`` time of the objects under ``path`` (one listing)."""
        items = await self._objects_under(path)
        if items is None:
            return None
        newest: int | None = None
        for item in items:
            stamp = item.get("updated")
            if not isinstance(stamp, str):
                continue
            when = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            ns = int(when.timestamp() * 1e9)
            newest = ns if newest is None else max(newest, ns)
        return newest

    def copy_methods(self) -> list[str]:
        return ["server_side", "read_write"]

    async def copy_tree(self, src: UPath, dst: UPath, *, method: str | None = None) -> str:
        """``server_side`` (default): one recursive listing of ``src``, then an object
        rewrite (``rewriteTo``) per object, done by GCS: no byte passes through the client."""
        if method == "read_write":
            return await Backend.copy_tree(self, src, dst, method=method)
        if method not in (None, "server_side"):
            raise ValueError(
                f"Unknown copy method {method!r} on {self.describe()}; "
                f"available: {', '.join(self.copy_methods())}."
            )
        await self.mkdir(dst, parents=True, exist_ok=True)
        names = list(await self.file_sizes(src))
        src_key, dst_key = self._key(src), self._key(dst)
        fs = await self._fs()
        semaphore = asyncio.Semaphore(_CONCURRENCY)

        async def one(rel: str) -> None:
            async with semaphore:
                await fs._cp_file(self._obj(f"{src_key}/{rel}"), self._obj(f"{dst_key}/{rel}"))

        await asyncio.gather(*(one(rel) for rel in names))
        return "server_side"


async def _gather_limited(
    coros: Sequence[Awaitable[T]], *, return_exceptions: bool = False
) -> list[Any]:
    """``asyncio.gather`` with at most :data:`_CONCURRENCY` awaitables running at once."""
    semaphore = asyncio.Semaphore(_CONCURRENCY)

    async def run(coro: Awaitable[T]) -> T:
        async with semaphore:
            return await coro

    return list(await asyncio.gather(*(run(c) for c in coros), return_exceptions=return_exceptions))
