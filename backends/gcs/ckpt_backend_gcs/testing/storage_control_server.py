"""A TEST SERVER for the GCS Storage Control API (hierarchical namespace), for tests only.

No emulator implements hierarchical-namespace (HNS) buckets, folders or the Storage Control
gRPC API. :class:`StorageControlTestServer` is this project's own stand-in, so that the real
``google-cloud-storage-control`` client code in :mod:`ckpt_backend_gcs` runs end to end in
tests. It serves, on 127.0.0.1 only:

- ``google.storage.control.v2.StorageControl``: ``GetStorageLayout``, ``GetFolder``,
  ``CreateFolder``, ``DeleteFolder``, ``ListFolders`` and ``RenameFolder`` (a long-running
  operation);
- ``google.longrunning.Operations``: ``GetOperation`` (the client polls a rename with it).

Objects stay on a fake-gcs-server (JSON API) given by its URL. Folders are kept per bucket in
memory; the buckets named in ``hns_buckets`` report a hierarchical namespace. Like real HNS
buckets, a folder exists once created, or once an object is written under it (the server
notices such objects when it lists the bucket, and keeps those folders from then on).

``RenameFolder`` moves the objects under the source folder on fake-gcs-server (copy, then
delete) and renames the folders, under one lock, and refuses an existing destination.

LIMITS: this is not GCS. The rename here is NOT atomic for readers and writers that talk to
fake-gcs-server directly (they can see a half-moved folder); only Storage Control calls are
serialized. The atomicity of ``RenameFolder`` that ckpt relies on in production is a
guarantee of Google Cloud Storage, not of this server. Folders implied by objects that are
deleted before the server ever listed them are not remembered. Managed folders, anywhere
caches, IAM, preconditions on metagenerations and ``DeleteFolderRecursive`` are not served.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from google.cloud.storage_control_v2.types import storage_control as sc
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.rpc import code_pb2, status_pb2

__all__ = ["StorageControlTestServer"]

_SERVICE = "google.storage.control.v2.StorageControl"
_OPERATIONS_SERVICE = "google.longrunning.Operations"
_BUCKET_PREFIX = "projects/_/buckets/"


class _Abort(Exception):
    """An RPC error: a gRPC status code and a message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _JsonApi:
    """The few JSON API calls the server makes to fake-gcs-server (plain urllib)."""

    def __init__(self, endpoint: str) -> None:
        self.base = endpoint.rstrip("/") + "/storage/v1"

    def _call(self, method: str, path: str, query: dict[str, str] | None = None) -> Any:
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(url) from None
            raise
        return json.loads(body) if body else None

    @staticmethod
    def _q(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self._call("GET", f"/b/{self._q(bucket)}")
        except FileNotFoundError:
            return False
        return True

    def object_names(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of all objects under ``prefix`` (every page, no delimiter)."""
        names: list[str] = []
        token: str | None = None
        while True:
            query = {"prefix": prefix, "maxResults": "1000"}
            if token:
                query["pageToken"] = token
            page = self._call("GET", f"/b/{self._q(bucket)}/o", query) or {}
            names.extend(item["name"] for item in page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return names

    def copy(self, bucket: str, src: str, dst: str) -> None:
        b = self._q(bucket)
        self._call("POST", f"/b/{b}/o/{self._q(src)}/copyTo/b/{b}/o/{self._q(dst)}")

    def delete(self, bucket: str, name: str) -> None:
        try:
            self._call("DELETE", f"/b/{self._q(bucket)}/o/{self._q(name)}")
        except FileNotFoundError:
            pass


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


def _ancestors(key: str) -> list[str]:
    """Folder ids (``a/``, ``a/b/``) that contain object or folder ``key``."""
    parts = key.split("/")[:-1] if not key.endswith("/") else key.rstrip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) + "/" for i in range(len(parts)) if parts[i]]


class StorageControlTestServer:
    """TEST SERVER: Storage Control (folders, layout, RenameFolder) over fake-gcs-server.

    Args:
        gcs_endpoint: URL of the fake-gcs-server holding the objects.
        hns_buckets: buckets that report a hierarchical namespace (more can be added later
            with :meth:`add_hns_bucket`).
        port: port on 127.0.0.1 (0 picks a free one).
        rename_delay_s: how long a ``RenameFolder`` operation stays pending before it runs;
            with 0 the operation is returned done. A delay makes the client poll
            ``GetOperation`` (and lets tests exercise a rename timeout).
    """

    def __init__(
        self,
        gcs_endpoint: str,
        *,
        hns_buckets: Iterable[str] = (),
        port: int = 0,
        rename_delay_s: float = 0.0,
        max_workers: int = 16,
    ) -> None:
        self._json = _JsonApi(gcs_endpoint)
        self._hns = set(hns_buckets)
        self._requested_port = port
        self.rename_delay_s = rename_delay_s
        #: Largest ListFolders page (GCS: 1000); tests lower it to exercise paging.
        self.list_page_size = 1000
        self._max_workers = max_workers
        self._lock = threading.RLock()
        self._folders: dict[str, dict[str, sc.Folder]] = {}
        self._reserved: dict[str, set[str]] = {}
        self._operations: dict[str, operations_pb2.Operation] = {}
        self._threads: list[threading.Thread] = []
        self._server: grpc.Server | None = None
        self.port = 0
        #: Names of the RPCs served, in order (for tests that check what the client did).
        self.calls: list[str] = []

    # -- life cycle -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the ``storage_control_endpoint`` option (plaintext)."""
        return f"http://{self.address}"

    def start(self) -> StorageControlTestServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers))
        server.add_generic_rpc_handlers(self._handlers())
        port = server.add_insecure_port(f"127.0.0.1:{self._requested_port}")
        if not port:
            raise RuntimeError(f"Could not bind 127.0.0.1:{self._requested_port}.")
        server.start()
        self._server, self.port = server, port
        return self

    def stop(self) -> None:
        for thread in list(self._threads):
            thread.join(timeout=10)
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> StorageControlTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers ---------------------------------------------------------------------
    def add_hns_bucket(self, bucket: str) -> None:
        with self._lock:
            self._hns.add(bucket)

    def folder_ids(self, bucket: str, prefix: str = "") -> list[str]:
        """The folders the server knows in ``bucket`` (after noticing implied ones)."""
        with self._lock:
            self._notice_implied(bucket, prefix)
            return sorted(f for f in self._folders.get(bucket, {}) if f.startswith(prefix))

    # -- gRPC wiring ----------------------------------------------------------------------
    def _handlers(self) -> list[grpc.GenericRpcHandler]:
        def unary(name: str, request_type: Any, serialize: Callable[[Any], bytes]) -> Any:
            method = "_" + "".join("_" + c.lower() if c.isupper() else c for c in name)[1:]

            def handler(request: Any, context: grpc.ServicerContext) -> Any:
                self.calls.append(name)
                try:
                    return getattr(self, method)(request)  # looked up per call: patchable
                except _Abort as exc:
                    context.abort(exc.code, exc.message)

            deserialize = getattr(request_type, "deserialize", None) or request_type.FromString
            return grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=deserialize, response_serializer=serialize
            )

        def pb2(message: Any) -> bytes:
            return bytes(message.SerializeToString())

        control = {
            "GetStorageLayout": unary(
                "GetStorageLayout", sc.GetStorageLayoutRequest, sc.StorageLayout.serialize
            ),
            "GetFolder": unary("GetFolder", sc.GetFolderRequest, sc.Folder.serialize),
            "CreateFolder": unary("CreateFolder", sc.CreateFolderRequest, sc.Folder.serialize),
            "DeleteFolder": unary("DeleteFolder", sc.DeleteFolderRequest, pb2),
            "ListFolders": unary(
                "ListFolders", sc.ListFoldersRequest, sc.ListFoldersResponse.serialize
            ),
            "RenameFolder": unary("RenameFolder", sc.RenameFolderRequest, pb2),
        }
        operations = {
            "GetOperation": unary("GetOperation", operations_pb2.GetOperationRequest, pb2),
        }
        return [
            grpc.method_handlers_generic_handler(_SERVICE, control),
            grpc.method_handlers_generic_handler(_OPERATIONS_SERVICE, operations),
        ]

    # -- names ----------------------------------------------------------------------------
    @staticmethod
    def _bucket_of(parent: str) -> str:
        if not parent.startswith(_BUCKET_PREFIX):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed bucket name {parent!r}.")
        return parent[len(_BUCKET_PREFIX) :].split("/", 1)[0]

    @classmethod
    def _folder_of(cls, name: str) -> tuple[str, str]:
        """``projects/_/buckets/B/folders/a/b/`` -> ``("B", "a/b/")``."""
        bucket = cls._bucket_of(name)
        rest = name[len(_BUCKET_PREFIX) + len(bucket) :]
        if not rest.startswith("/folders/") or len(rest) <= len("/folders/"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed folder name {name!r}.")
        return bucket, _folder_id(rest[len("/folders/") :])

    @staticmethod
    def _folder_name(bucket: str, folder_id: str) -> str:
        return f"{_BUCKET_PREFIX}{bucket}/folders/{folder_id}"

    # -- state (call with the lock held) ----------------------------------------------------
    def _require_hns(self, bucket: str) -> dict[str, sc.Folder]:
        if not self._json.bucket_exists(bucket):
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Bucket {bucket!r} not found.")
        if bucket not in self._hns:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Bucket {bucket!r} does not have a hierarchical namespace.",
            )
        return self._folders.setdefault(bucket, {})

    def _add(self, bucket: str, folder_id: str) -> sc.Folder:
        folders = self._folders.setdefault(bucket, {})
        folder = folders.get(folder_id)
        if folder is None:
            now = _now()
            folder = sc.Folder(
                name=self._folder_name(bucket, folder_id),
                metageneration=1,
                create_time=now,
                update_time=now,
            )
            folders[folder_id] = folder
        return folder

    def _notice_implied(self, bucket: str, prefix: str = "") -> None:
        """Remember the folders implied by objects under ``prefix`` (as HNS creates them)."""
        for name in self._json.object_names(bucket, prefix):
            implied = _ancestors(name) + ([name] if name.endswith("/") else [])
            for folder_id in implied:
                self._add(bucket, folder_id)

    # -- RPCs -----------------------------------------------------------------------------
    def _get_storage_layout(self, request: sc.GetStorageLayoutRequest) -> sc.StorageLayout:
        bucket = self._bucket_of(request.name)
        if not self._json.bucket_exists(bucket):
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Bucket {bucket!r} not found.")
        return sc.StorageLayout(
            name=f"{_BUCKET_PREFIX}{bucket}/storageLayout",
            location="US-CENTRAL1",
            location_type="region",
            hierarchical_namespace=sc.StorageLayout.HierarchicalNamespace(
                enabled=bucket in self._hns
            ),
        )

    def _get_folder(self, request: sc.GetFolderRequest) -> sc.Folder:
        bucket, folder_id = self._folder_of(request.name)
        with self._lock:
            folders = self._require_hns(bucket)
            self._notice_implied(bucket, folder_id)
            folder = folders.get(folder_id)
            if folder is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Folder {request.name!r} not found.")
            return folder

    def _create_folder(self, request: sc.CreateFolderRequest) -> sc.Folder:
        bucket = self._bucket_of(request.parent)
        folder_id = _folder_id(request.folder_id)
        with self._lock:
            folders = self._require_hns(bucket)
            self._notice_implied(bucket, folder_id)
            if folder_id in folders or folder_id in self._reserved.get(bucket, set()):
                raise _Abort(
                    grpc.StatusCode.ALREADY_EXISTS, f"Folder {folder_id!r} already exists."
                )
            missing = [a for a in _ancestors(folder_id) if a not in folders]
            if missing and not request.recursive:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Parent folder {missing[-1]!r} of {folder_id!r} does not exist.",
                )
            for ancestor in missing:
                self._add(bucket, ancestor)
            return self._add(bucket, folder_id)

    def _delete_folder(self, request: sc.DeleteFolderRequest) -> empty_pb2.Empty:
        bucket, folder_id = self._folder_of(request.name)
        with self._lock:
            folders = self._require_hns(bucket)
            self._notice_implied(bucket, folder_id)
            if folder_id not in folders:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Folder {request.name!r} not found.")
            children = [f for f in folders if f != folder_id and f.startswith(folder_id)]
            if children or self._json.object_names(bucket, folder_id):
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"Folder {folder_id!r} is not empty."
                )
            del folders[folder_id]
            return empty_pb2.Empty()

    def _list_folders(self, request: sc.ListFoldersRequest) -> sc.ListFoldersResponse:
        bucket = self._bucket_of(request.parent)
        prefix = request.prefix
        if prefix and not prefix.endswith("/"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "prefix must end with '/'.")
        if request.delimiter not in ("", "/"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "The only delimiter is '/'.")
        with self._lock:
            folders = self._require_hns(bucket)
            self._notice_implied(bucket, prefix)
            ids = sorted(f for f in folders if f.startswith(prefix))
            if request.delimiter:
                ids = [f for f in ids if "/" not in f[len(prefix) :].rstrip("/")]
            if request.lexicographic_start:
                ids = [f for f in ids if f >= request.lexicographic_start]
            if request.lexicographic_end:
                ids = [f for f in ids if f < request.lexicographic_end]
            if request.page_token:
                ids = [f for f in ids if f > request.page_token]
            size = min(request.page_size or self.list_page_size, self.list_page_size)
            page, more = ids[:size], len(ids) > size
            return sc.ListFoldersResponse(
                folders=[folders[f] for f in page],
                next_page_token=page[-1] if more else "",
            )

    def _rename_folder(self, request: sc.RenameFolderRequest) -> operations_pb2.Operation:
        bucket, src = self._folder_of(request.name)
        dst = _folder_id(request.destination_folder_id)
        with self._lock:
            folders = self._require_hns(bucket)
            self._notice_implied(bucket, src)
            self._notice_implied(bucket, dst)
            reserved = self._reserved.setdefault(bucket, set())
            if src not in folders:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Folder {request.name!r} not found.")
            if dst.startswith(src):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Cannot rename {src!r} into itself."
                )
            if dst in folders or dst in reserved or self._json.object_names(bucket, dst):
                raise _Abort(
                    grpc.StatusCode.ALREADY_EXISTS, f"Destination folder {dst!r} already exists."
                )
            missing = [a for a in _ancestors(dst) if a not in folders]
            if missing:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Parent folder {missing[-1]!r} of the destination does not exist.",
                )
            reserved.add(dst)
            operation = operations_pb2.Operation(
                name=f"{_BUCKET_PREFIX}{bucket}/operations/{uuid.uuid4().hex}", done=False
            )
            metadata = sc.RenameFolderMetadata(
                common_metadata=sc.CommonLongRunningOperationMetadata(
                    create_time=_now(), update_time=_now(), type_="rename-folder"
                ),
                source_folder_id=src,
                destination_folder_id=dst,
            )
            operation.metadata.Pack(sc.RenameFolderMetadata.pb(metadata))
            self._operations[operation.name] = operation

        def run() -> None:
            if self.rename_delay_s:
                time.sleep(self.rename_delay_s)
            with self._lock:
                try:
                    folder = self._move(bucket, src, dst)
                    response = any_pb2.Any()
                    response.Pack(sc.Folder.pb(folder))
                    operation.response.CopyFrom(response)
                except Exception as exc:
                    operation.error.CopyFrom(
                        status_pb2.Status(code=code_pb2.INTERNAL, message=f"Rename failed: {exc}")
                    )
                finally:
                    reserved.discard(dst)
                    operation.done = True

        if self.rename_delay_s:
            thread = threading.Thread(target=run, name="rename-folder", daemon=True)
            self._threads.append(thread)
            thread.start()
            with self._lock:
                return _copy(operation)
        run()
        return _copy(operation)

    def _move(self, bucket: str, src: str, dst: str) -> sc.Folder:
        """Move the objects and folders under ``src`` to ``dst`` (lock held)."""
        names = self._json.object_names(bucket, src)
        for name in names:
            self._json.copy(bucket, name, dst + name[len(src) :])
        for name in names:
            self._json.delete(bucket, name)
        folders = self._folders[bucket]
        for folder_id in sorted(f for f in folders if f.startswith(src)):
            del folders[folder_id]
            self._add(bucket, dst + folder_id[len(src) :])
        return self._add(bucket, dst)

    def _get_operation(self, request: operations_pb2.GetOperationRequest) -> Any:
        with self._lock:
            operation = self._operations.get(request.name)
            if operation is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Operation {request.name!r} not found.")
            return _copy(operation)


def _folder_id(text: str) -> str:
    folder_id = text.strip("/")
    if not folder_id or "//" in folder_id:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed folder id {text!r}.")
    return folder_id + "/"


def _copy(operation: operations_pb2.Operation) -> operations_pb2.Operation:
    out = operations_pb2.Operation()
    out.CopyFrom(operation)
    return out
