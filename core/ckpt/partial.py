"""Partial saves: build one checkpoint from several saves, then commit it at once.

Use it when the whole state does not fit in memory at once (save it layer by layer) or is
produced by several steps of a program::

    ckpt.partial.save(path, {"layer1": w1, "step": 10})
    ckpt.partial.save(path, {"layer2": w2})
    ckpt.partial.finalize(path)          # now ckpt.Checkpointer().restore(path) has both

Until :func:`finalize`, nothing exists at ``path``. Each save only adds keys: two saves
that write the same leaf (or one a leaf and the other a subtree at the same key) make
:func:`finalize` fail with ``FileExistsError('File collision on <key> during finalize...')``;
nothing is committed, and :func:`discard` removes the session to start over.

Layout on storage (only backend primitives are used, so it works on every backend)::

    <path>.partial_save/                 the session directory
        piece-<time_ns>-<pid>-<hex>/     one committed piece per save: a complete ckpt
        ...                              checkpoint (_TREE.json, arrays/, metadata)

Each piece is written and committed by the configured strategy like any checkpoint
(``piece-...`` is its final name inside the session directory), so a save interrupted by
a crash leaves only a temporary that :func:`finalize` ignores and removes; the committed
pieces are untouched. Piece names sort in creation order, which is the merge order.

:func:`finalize` reads the pieces' tree metadata (small JSON files), merges them and checks
for collisions before writing anything, then commits ``<path>`` through the strategy:

- a strategy that can commit an existing directory in place
  (:meth:`ckpt.TemporaryPath.adopt`, e.g. ``rename``): the session directory itself
  becomes the checkpoint. The merged ``_TREE.json`` (whose array paths point into the
  pieces, e.g. ``piece-.../arrays/0``) is written at its top and the strategy commits it
  as ``<path>``. No array data is copied.
- any other strategy (e.g. ``commit_file``): a new checkpoint is written at ``<path>``'s
  temporary location, each piece's data copied into a ``piece-...`` subdirectory of it
  (one piece in memory at a time), then committed by the strategy; the session directory
  is removed after the commit.

A failing commit leaves the session directory and its pieces intact, so ``finalize`` can
be retried. Wait for every :func:`save_async` handle before calling :func:`finalize`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from upath import UPath

from ckpt import multihost, tree_format, tree_read, tree_snapshot, tree_write
from ckpt._sync import run as run_sync
from ckpt.backend import Backend
from ckpt.checkpointer import ITEM_HANDLERS, check_custom_metadata, occupied, write_and_commit
from ckpt.checkpointer import SaveRequest as _SaveRequest
from ckpt.cleanup import cleanup_temporary_paths_async
from ckpt.committed import owner
from ckpt.layout import PARTIAL_SAVE_SUFFIX, unique_token
from ckpt.manifest import MANIFEST_FILE, Manifest, read_manifest
from ckpt.paths import to_path
from ckpt.registry import Resolution, resolve
from ckpt.step_metadata import StepMetadata, read_step_metadata
from ckpt.strategy import TemporaryPath

__all__ = [
    "PARTIAL_SAVE_SUFFIX",
    "PIECE_PREFIX",
    "PartialSaveHandle",
    "discard",
    "finalize",
    "partial_save_path",
    "save",
    "save_async",
]

logger = logging.getLogger("ckpt")

#: Suffix of the session directory that holds the pieces (Orbax's name).
#: Prefix of the pieces' names inside the session directory.
PIECE_PREFIX = "piece-"
_PIECE_NAME = re.compile(rf"^{re.escape(PIECE_PREFIX)}\d+-\d+-[0-9a-f]+$")


def partial_save_path(path: Any) -> UPath:
    """The session directory of the partial save of ``path``: ``<path>.partial_save``."""
    final = to_path(path)
    return final.parent / f"{final.name}{PARTIAL_SAVE_SUFFIX}"


def _final_and_session(path: Any) -> tuple[UPath, UPath]:
    p = to_path(path)
    if p.name.endswith(PARTIAL_SAVE_SUFFIX) and len(p.name) > len(PARTIAL_SAVE_SUFFIX):
        return p.parent / p.name[: -len(PARTIAL_SAVE_SUFFIX)], p
    return p, partial_save_path(p)


class PartialSaveHandle:
    """The result of :func:`save_async`: wait for it with :meth:`result`."""

    def __init__(self, future: concurrent.futures.Future[None], piece: UPath) -> None:
        self._future = future
        #: The final path of the piece this save writes.
        self.piece = piece

    def result(self, timeout: float | None = None) -> None:
        """Block until the piece is committed; raise the save's error if it failed."""
        self._future.result(timeout=timeout)

    def done(self) -> bool:
        """True once the save has finished (committed or failed)."""
        return self._future.done()

    def __repr__(self) -> str:
        return f"PartialSaveHandle(piece={str(self.piece)!r}, done={self.done()})"


# -- saving ------------------------------------------------------------------------------


def save(
    path: Any,
    tree: dict[str, Any],
    *,
    custom_metadata: dict[str, Any] | None = None,
    atomicity: str | None = None,
    backend: Backend | None = None,
) -> None:
    """Add the keys of ``tree`` to the partial checkpoint of ``path`` (blocking).

    Args:
        path: the final checkpoint path (created by :func:`finalize`).
        tree: a dict; its leaves must not be saved again by another partial save.
        custom_metadata: a JSON-serializable dict; merged into the final checkpoint's
            custom metadata (later saves win on equal keys).
        atomicity: the strategy name or ``auto``; None follows the configuration. Use the
            same value for every save and for :func:`finalize`.
        backend: a backend instance to use instead of the registered one.

    Raises:
        FileExistsError: ``path`` already exists (finalized).
        TypeError: ``tree`` is not a dict, or holds an unsupported leaf.
    """
    save_async(
        path, tree, custom_metadata=custom_metadata, atomicity=atomicity, backend=backend
    ).result()


def save_async(
    path: Any,
    tree: dict[str, Any],
    *,
    custom_metadata: dict[str, Any] | None = None,
    atomicity: str | None = None,
    backend: Backend | None = None,
) -> PartialSaveHandle:
    """Like :func:`save`, but return after snapshotting ``tree``; the piece is written and
    committed on a background thread. Call ``.result()`` on the handle to wait for it
    (and get its error)."""
    start = time.perf_counter()
    final, session = _final_and_session(path)
    if not isinstance(tree, dict):
        raise TypeError(
            f"A partial save takes a dict (its keys are added to {final}), "
            f"got {type(tree).__qualname__}."
        )
    resolution = resolve(final, atomicity, backend=backend)
    custom = check_custom_metadata(custom_metadata)
    if run_sync(occupied(resolution, final)) is not None:
        raise FileExistsError(
            f"Finalized checkpoint already exists at {final}; delete it before starting a "
            "new partial save."
        )
    prepared = tree_snapshot.prepare(tree)
    coordinator = multihost.current()
    op = coordinator.operation("partial-save", final) if coordinator.multiprocess else None
    name = f"{PIECE_PREFIX}{unique_token()}"
    if op is not None:  # every process writes (its shards of) the primary's piece
        name = op.broadcast("piece", name.encode()).decode()
    piece = session / name
    tmp = resolution.strategy.from_final(piece, backend=resolution.backend)
    tmp.metadata.custom_metadata = custom
    tmp.metadata.item_handlers = dict(ITEM_HANDLERS)
    request = _SaveRequest(piece, resolution, tmp, prepared, False, start)
    request.operation = op
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="ckpt-partial-save"
    )
    try:
        future = executor.submit(run_sync, write_and_commit(request))
    finally:
        executor.shutdown(wait=False)
    future.add_done_callback(_log_failure)
    return PartialSaveHandle(future, piece)


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    exc = future.exception()
    if exc is not None:  # logged in case the handle is never waited for
        logger.error("Partial save failed: %r", exc)


# -- merging -----------------------------------------------------------------------------


@dataclass
class _Piece:
    name: str  # final name inside the session directory
    content: UPath  # where its files are (itself, or its commit_file writer directory)
    doc: dict[str, Any]  # its validated _TREE.json
    metadata: StepMetadata


def _collision(keypath: str, first: str, second: str) -> FileExistsError:
    return FileExistsError(
        f"File collision on {keypath!r} during finalize: both partial saves {first} and "
        f"{second} write it. Overwriting is not allowed; a partial save may only add keys."
    )


def _start_over(session: UPath, final: UPath) -> str:
    return (
        f" Nothing was committed. To start over, discard the session: "
        f"ckpt.partial.discard({str(final)!r}) (it removes {session}), then save again."
    )


def _merge_docs(pieces: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """Merge the ``_TREE.json`` documents of ``(piece name, data dir relative to the
    checkpoint, doc)`` in order; array paths are prefixed with the data dir.

    Raises FileExistsError on a key written by two pieces."""
    root: dict[str, Any] = {"type": "dict", "keys": [], "children": []}
    leaves: list[dict[str, Any]] = []
    owners: dict[str, str] = {}  # keypath of a non-dict node -> piece name

    def adopt(node: dict[str, Any], src_leaves: list[dict[str, Any]], rel: str) -> Any:
        if node["type"] == "leaf":
            meta = copy.deepcopy(src_leaves[node["index"]])
            if "path" in meta:
                meta["path"] = f"{rel}/{meta['path']}"
            leaves.append(meta)
            return {"type": "leaf", "index": len(leaves) - 1}
        out = {k: copy.deepcopy(v) for k, v in node.items() if k != "children"}
        out["children"] = [adopt(c, src_leaves, rel) for c in node["children"]]
        return out

    def merge(
        dst: dict[str, Any],
        src: dict[str, Any],
        doc: dict[str, Any],
        piece: str,
        rel: str,
        keypath: str,
    ) -> None:
        for key, child in zip(src["keys"], src["children"], strict=True):
            kp = f"{keypath}/{key}" if keypath else key
            if key in dst["keys"]:
                existing = dst["children"][dst["keys"].index(key)]
                if existing["type"] == "dict" and child["type"] == "dict":
                    owners.setdefault(kp, piece)
                    merge(existing, child, doc, piece, rel, kp)
                    continue
                raise _collision(kp, owners.get(kp, "?"), piece)
            dst["keys"].append(key)
            dst["children"].append(adopt(child, doc["leaves"], rel))
            owners[kp] = piece

    for piece, rel, doc in pieces:
        structure = doc["structure"]
        if structure["type"] != "dict":
            raise ValueError(f"Partial save {piece} does not hold a dict at its root.")
        merge(root, structure, doc, piece, rel, "")
    return {
        "format": tree_format.FORMAT_NAME,
        "version": tree_format.FORMAT_VERSION,
        "structure": root,
        "leaves": leaves,
    }


def _merge_metadata(pieces: list[_Piece]) -> StepMetadata:
    merged = StepMetadata(item_handlers=dict(ITEM_HANDLERS))
    inits = [p.metadata.init_timestamp_nsecs for p in pieces if p.metadata.init_timestamp_nsecs]
    merged.init_timestamp_nsecs = min(inits) if inits else None
    for piece in pieces:
        merged.custom_metadata.update(piece.metadata.custom_metadata or {})
    return merged


async def _committed_pieces(resolution: Resolution, session: UPath) -> list[_Piece]:
    backend = resolution.backend
    entries = await backend.list_dir(session)
    candidates = [e for e in entries if e.is_dir and not e.is_link and _PIECE_NAME.match(e.name)]
    names = sorted(await resolution.strategy.finalized_names(backend, session, candidates))

    async def load(name: str) -> _Piece:
        _, content = await owner(backend, session / name, resolution.strategy)
        doc = await tree_format.tree_metadata(backend, content)
        meta = await read_step_metadata(backend, content) or StepMetadata()
        return _Piece(name, content, doc, meta)

    return list(await asyncio.gather(*(load(n) for n in names)))


async def _merged_manifest(backend: Backend, contents: list[tuple[UPath, str]]) -> Manifest | None:
    """The pieces' manifests (``(content dir, prefix)``) merged, paths under their prefix;
    None if a piece has none (written before manifests: the merge cannot claim one)."""
    found = await asyncio.gather(*(read_manifest(backend, c) for c, _ in contents))
    if any(m is None for m in found):
        return None
    merged = Manifest()
    for (_, prefix), manifest in zip(contents, found, strict=True):
        assert manifest is not None
        merged.merge(manifest, prefix)
    return merged


async def _write_merged_tree(
    backend: Backend, directory: UPath, doc: dict[str, Any], manifest: Manifest | None
) -> Manifest | None:
    """Write the merged tree document; return the manifest to commit with it (the
    caller's strategy adds the step metadata and stores it at finalize)."""
    if manifest is not None:
        doc = dict(doc, manifest=MANIFEST_FILE)
    raw = _encode(doc)
    await backend.write_bytes(directory / tree_format.TREE_FILE, raw)
    if manifest is not None:
        manifest.add(tree_format.TREE_FILE, raw)
    return manifest


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, ensure_ascii=True, allow_nan=False).encode()


async def _commit_session_in_place(
    resolution: Resolution,
    final: UPath,
    session: UPath,
    pieces: list[_Piece],
    adopted: TemporaryPath,
) -> None:
    """The strategy commits the session directory itself as the checkpoint (no copy)."""
    backend = resolution.backend
    # Temporaries of interrupted piece saves would end up inside the checkpoint.
    await cleanup_temporary_paths_async(session, backend, strategy=resolution.strategy)
    doc = _merge_docs([(p.name, p.content.name, p.doc) for p in pieces])
    manifest = await _merged_manifest(backend, [(p.content, p.content.name) for p in pieces])

    class _SessionCommit(type(adopted)):  # type: ignore[misc]
        async def discard(self) -> None:
            """A failed commit must keep the session (and its pieces) for a retry."""

    adopted.__class__ = _SessionCommit
    adopted.metadata = _merge_metadata(pieces)
    adopted.metadata.init_timestamp_nsecs = adopted.metadata.init_timestamp_nsecs or time.time_ns()
    before = {e.name for e in await backend.list_dir(session) if not e.is_dir}
    adopted.manifest = await _write_merged_tree(backend, session, doc, manifest)
    try:
        await adopted.finalize()
    except BaseException:
        if await backend.exists(session):  # not committed: restore the session as it was
            for entry in await backend.list_dir(session):
                if entry.is_dir or entry.name in before:
                    continue
                try:
                    await backend.remove_file(session / entry.name)
                except Exception as exc:
                    logger.warning("Could not remove %s: %r", session / entry.name, exc)
        raise


async def _commit_copy(
    resolution: Resolution, final: UPath, session: UPath, pieces: list[_Piece]
) -> None:
    """Other strategies: copy each piece into a new checkpoint, commit it, drop the session."""
    backend = resolution.backend
    tmp = resolution.strategy.from_final(final, backend=backend)
    tmp.metadata = _merge_metadata(pieces)
    first_init = tmp.metadata.init_timestamp_nsecs
    await tmp.create()  # records the current time as init_timestamp_nsecs
    if first_init is not None:  # the checkpoint's life began with its first piece
        tmp.metadata.init_timestamp_nsecs = first_init
    try:
        copied = []
        manifest = Manifest()
        for piece in pieces:  # one piece in memory at a time
            tree = await tree_read.read(backend, piece.content)
            prepared = await asyncio.to_thread(tree_snapshot.prepare, tree)
            written = await tree_write.write(
                backend, tmp.get() / piece.name, prepared, store_manifest=False
            )
            manifest.merge(written, piece.name)
            del tree, prepared
            doc = await tree_format.tree_metadata(backend, tmp.get() / piece.name)
            copied.append((piece.name, piece.name, doc))
        tmp.manifest = await _write_merged_tree(backend, tmp.get(), _merge_docs(copied), manifest)
        await tmp.finalize()
    except BaseException:
        try:
            committed = (await owner(backend, final, resolution.strategy))[1] == tmp.get()
        except Exception:
            committed = True  # cannot tell: leave the temporary for cleanup
        if not committed:
            await tmp.discard()
        else:  # committed, not durable: the session is spent all the same
            try:
                await backend.remove_tree(session)
            except Exception as exc:
                logger.warning("Could not remove %s (cleanup will): %r", session, exc)
        raise
    await backend.remove_tree(session)


def finalize(path: Any, *, atomicity: str | None = None, backend: Backend | None = None) -> None:
    """Merge all partial saves of ``path`` and commit the checkpoint at ``path`` atomically.

    Args:
        path: the final path given to :func:`save` (or its ``.partial_save`` directory).
        atomicity: the strategy name or ``auto``; None follows the configuration.
        backend: a backend instance to use instead of the registered one.

    Raises:
        FileExistsError: ``path`` already exists, or two partial saves wrote the same key
            (``File collision on <key> during finalize...``); nothing is changed (start
            over with :func:`discard`).
        FileNotFoundError: there is no partial save of ``path``.
    """
    final, session = _final_and_session(path)
    resolution = resolve(final, atomicity, backend=backend)
    backend = resolution.backend
    coordinator = multihost.current()
    if coordinator.multiprocess:
        # The primary merges and commits (no array data moves between processes); the
        # others wait for its outcome.
        op = coordinator.operation("partial-finalize", final)
        error: BaseException | None = None
        if coordinator.is_primary:
            try:
                _finalize_here(final, session, resolution)
            except BaseException as exc:
                error = exc
            status = {"ok": error is None, "error": f"{type(error).__name__}: {error}"}
            op.publish("outcome", json.dumps(status).encode())
        op.barrier("finalized")
        if error is not None:
            raise error
        if not coordinator.is_primary:
            doc = json.loads(op.receive("outcome", 0))
            if not doc["ok"]:
                raise RuntimeError(f"Finalizing {final} failed in process 0: {doc['error']}")
        return
    _finalize_here(final, session, resolution)


def discard(path: Any, *, backend: Backend | None = None) -> bool:
    """Remove the partial save session of ``path`` (``<path>.partial_save`` and every
    piece in it), to start over, e.g. after a collision made :func:`finalize` fail.

    Only the session directory is removed, never ``path`` itself: a committed checkpoint
    is untouched. Wait for every :func:`save_async` handle of the session first; with
    several processes, call it in one.

    Args:
        path: the final path given to :func:`save` (or its ``.partial_save`` directory).
        backend: a backend instance to use instead of the registered one.

    Returns:
        True if a session was removed, False if there was none.

    Raises:
        ValueError: ``<path>.partial_save`` is a symbolic link, or a directory that is not
            a partial save session (it holds files but no ``piece-...`` directory); it is
            left alone.
    """
    final, session = _final_and_session(path)
    storage = backend or resolve(final).backend

    async def run() -> bool:
        if await storage.is_link(session):
            raise ValueError(f"{session} is a symbolic link, not a partial save session.")
        if not await storage.is_dir(session):
            return False
        entries = await storage.list_dir(session)
        if entries and not any(e.name.startswith(PIECE_PREFIX) for e in entries):
            raise ValueError(
                f"{session} holds no partial save (no {PIECE_PREFIX}... directory); "
                "refusing to remove it."
            )
        logger.info("Discarding the partial save session %s", session)
        await storage.remove_tree(session)
        return True

    return run_sync(run())


def _finalize_here(final: UPath, session: UPath, resolution: Resolution) -> None:
    """:func:`finalize` in this process."""
    backend = resolution.backend

    async def run() -> None:
        if await occupied(resolution, final) is not None:
            raise FileExistsError(f"Finalized checkpoint already exists at {final}.")
        if not await backend.is_dir(session):
            raise FileNotFoundError(
                f"Partial save path {session} does not exist: call ckpt.partial.save first."
            )
        pieces = await _committed_pieces(resolution, session)
        if not pieces:
            raise FileNotFoundError(
                f"Partial save path {session} holds no committed partial save (saves still "
                "running, or interrupted)."
            )
        try:
            _merge_docs([(p.name, p.content.name, p.doc) for p in pieces])  # collisions first
        except FileExistsError as exc:
            raise FileExistsError(f"{exc}{_start_over(session, final)}") from None
        logger.info("Finalizing %s from %d partial saves.", final, len(pieces))
        adopted = resolution.strategy.adopt(session, final, backend=backend)
        if adopted is not None:
            await _commit_session_in_place(resolution, final, session, pieces, adopted)
        else:
            await _commit_copy(resolution, final, session, pieces)

    run_sync(run())
