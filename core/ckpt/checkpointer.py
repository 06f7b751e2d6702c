"""``Checkpointer``: save and restore one pytree at a path, atomically, on any backend.

A save snapshots the tree (:func:`ckpt.tree_snapshot.prepare`), asks the configured strategy
for a writer-unique temporary path, writes the tree there and commits it. Readers never
see a half-written checkpoint: until the commit, the data lives under a name that every
discovery function (ckpt's and Orbax's) skips.

``force=True`` replaces an existing checkpoint. Unlike Orbax, which deletes the old
checkpoint before writing the new one, ckpt writes the new checkpoint completely first and
lets the strategy replace the old one in its commit (see
:meth:`ckpt.TemporaryPath.finalize`): the old checkpoint stays committed and readable until
the new one is, and a failure or a crash at any point leaves exactly one of them committed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import jax
from upath import UPath

from ckpt import (
    _progress,
    _tasks,
    _timing,
    multihost,
    tree_format,
    tree_read,
    tree_snapshot,
    tree_write,
)
from ckpt._storage_errors import translate
from ckpt._sync import run as run_sync
from ckpt.backend import Backend
from ckpt.cleanup import repair_async
from ckpt.committed import owner
from ckpt.discovery import PathState, path_state_async
from ckpt.errors import CommitNotDurableError, CorruptCheckpointError
from ckpt.manifest import MANIFEST_FILE, Manifest
from ckpt.paths import to_path
from ckpt.registry import Resolution, resolve
from ckpt.step_metadata import MAX_METADATA_BYTES, StepMetadata, read_step_metadata
from ckpt.strategy import FileOptions, ReadOnlyTemporaryPath, TemporaryPath

__all__ = ["ITEM_HANDLERS", "Checkpointer"]

logger = logging.getLogger("ckpt")

#: The ``item_handlers`` value ckpt writes into ``_CHECKPOINT_METADATA``: it names the
#: format of the saved item (a ckpt tree, see :mod:`ckpt.tree_format`). A dict, as
#: Orbax's CheckpointManager expects (``{item name: handler}``), so that its
#: ``metadata(step)`` reads ckpt's steps.
ITEM_HANDLERS: dict[str, str] = {"ckpt": "ckpt.tree_format"}

#: Upper bound for removing this writer's own temporary data after a failure.
_DISCARD_TIMEOUT_SECS = 60.0


def check_custom_metadata(custom_metadata: Any) -> dict[str, Any]:
    """``custom_metadata`` as a dict; ValueError unless it is a JSON-serializable dict."""
    if custom_metadata is None:
        return {}
    if not isinstance(custom_metadata, dict):
        raise ValueError(
            f"custom_metadata must be a dict, got {type(custom_metadata).__qualname__}."
        )
    try:
        size = len(json.dumps(custom_metadata))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"custom_metadata must be JSON-serializable: {exc}") from exc
    except RecursionError:
        raise ValueError("custom_metadata is nested too deeply to store as JSON.") from None
    if size > MAX_METADATA_BYTES:
        raise ValueError(
            f"custom_metadata is {size} bytes as JSON, more than the {MAX_METADATA_BYTES} "
            "bytes of checkpoint metadata ckpt stores; save large data in the tree instead."
        )
    return dict(custom_metadata)


@dataclasses.dataclass
class SaveRequest:
    """One save, from the blocking part to the commit (internal)."""

    final: UPath
    resolution: Resolution
    tmp: TemporaryPath
    prepared: tree_snapshot.PreparedTree | None  # dropped once written, to free memory
    force: bool
    #: ``time.perf_counter()`` when ``save`` was called.
    start: float
    #: The phase in progress: ``blocking``, ``directory_creation``, ``write``, ``commit``,
    #: ``committed``.
    phase: str = "blocking"
    #: Progress callback for the array writes (synchronous saves on a terminal).
    progress: _progress.ProgressCallback | None = None
    #: The coordinated operation of a multi-process save (:mod:`ckpt.multihost`), else None.
    operation: Any = None

    @property
    def backend(self) -> Backend:
        return self.resolution.backend


async def _discard_after_failure(request: SaveRequest, exc: BaseException) -> None:
    """Remove this writer's own temporary data, unless it is (or may be) committed."""
    tmp, final, backend = request.tmp, request.final, request.backend
    if request.phase == "directory_creation" and isinstance(exc, FileExistsError):
        return  # create() refused: the temporary path was not made by this writer.
    if isinstance(exc, CommitNotDurableError):
        return  # committed: this writer's data is the checkpoint
    if request.phase in ("commit", "committed"):
        try:
            strategy = request.resolution.strategy
            if not await backend.exists(tmp.get()):
                return  # nothing of this writer's is left to remove
            if (await owner(backend, final, strategy))[1] == tmp.get():
                logger.warning(
                    "Save of %s failed after its commit (%r); the checkpoint is committed.",
                    final,
                    exc,
                )
                return
        except Exception as check_exc:
            logger.warning(
                "Could not tell whether %s was committed (%r); leaving %s for cleanup.",
                final,
                check_exc,
                tmp.get(),
            )
            return
    try:
        await asyncio.wait_for(tmp.discard(), _DISCARD_TIMEOUT_SECS)
    except Exception as discard_exc:
        logger.warning(
            "Could not remove temporary checkpoint %s after a failed save (%r); "
            "cleanup_temporary_paths will remove it.",
            tmp.get(),
            discard_exc,
        )


async def write_and_commit(request: SaveRequest) -> None:
    """Create the temporary path, write the tree, commit (with ``force``, replacing the
    old checkpoint). On failure, wait for every outstanding write, discard this writer's
    temporary data and re-raise.

    In a multi-process job (see :mod:`ckpt.multihost`) this is
    :func:`_write_and_commit_multiprocess`: the same call on every process."""
    if request.operation is not None and request.operation.coordinator.multiprocess:
        await _write_and_commit_multiprocess(request, request.operation)
        return
    tmp, final, backend = request.tmp, request.final, request.backend
    try:
        mode = tmp.file_options.path_permission_mode
        request.phase = "directory_creation"
        with _timing.timed("directory_creation", path=final):
            if mode is not None:  # missing parents get the mode too
                await backend.mkdir(tmp.get().parent, parents=True, exist_ok=True, mode=mode)
            await tmp.create()
        request.phase = "write"
        with _timing.timed("write", path=final):
            assert request.prepared is not None, "a save request is written only once"
            # The strategy stores the manifest (with the step metadata) at finalize.
            tmp.manifest = await _tasks.settled(
                tree_write.write(
                    backend,
                    tmp.get(),
                    request.prepared,
                    progress=request.progress,
                    store_manifest=False,
                ),
                timeout=_DISCARD_TIMEOUT_SECS,
            )
            if mode is not None:  # the directories tensorstore made, before the commit
                await backend.apply_dir_mode(tmp.get(), mode)
        await _commit(request)
    except BaseException as exc:  # includes cancellation by a timeout
        await _discard_after_failure(request, exc)
        translated = translate(exc, action="Saving", path=final, backend=backend)
        if translated is not exc:
            raise translated from exc
        raise
    _timing.record_duration(
        "total", time.perf_counter() - request.start, path=final, level=logging.INFO
    )


async def _commit(request: SaveRequest) -> None:
    """Commit the written temporary (with ``force``, the strategy replaces the old
    checkpoint atomically)."""
    request.phase = "commit"
    with _timing.timed("commit", path=request.final):
        if request.force and await request.backend.is_link(request.final):
            # A symlink is never a checkpoint: replace the link, never what it points to.
            await request.backend.remove_file(request.final)
        try:
            await request.tmp.finalize()
        except CommitNotDurableError:
            request.phase = "committed"
            raise
    request.phase = "committed"


def _status(error: BaseException | None, payload: dict[str, Any] | None = None) -> bytes:
    doc: dict[str, Any] = {"ok": error is None, **(payload or {})}
    if error is not None:
        doc["error"] = f"{type(error).__name__}: {error}"
    return json.dumps(doc).encode()


def _parse_status(data: bytes, what: str, process: int) -> dict[str, Any]:
    doc = json.loads(data)
    if not isinstance(doc, dict) or not doc.get("ok"):
        error = doc.get("error") if isinstance(doc, dict) else repr(doc)
        raise RuntimeError(f"{what} failed in process {process}: {error}")
    return doc


async def _write_and_commit_multiprocess(request: SaveRequest, op: Any) -> None:
    """One save made by every process of a job (``op``: its :class:`ckpt.multihost.Operation`).

    1. The primary creates the temporary and hands its path to the others (key-value
       store, as ``ReadOnlyTemporaryPath`` JSON; not a barrier).
    2. Every process writes its own shards; each publishes the manifest of what it wrote
       (or its error). Barrier ``written``.
    3. The primary merges the manifests and commits, unless a process failed; it publishes
       the outcome. Barrier ``committed``; every process raises if the save failed.

    Two barriers; a process that dies or stalls makes the others raise TimeoutError at the
    next barrier, and nothing is committed."""
    tmp, final, backend = request.tmp, request.final, request.backend
    primary = op.coordinator.is_primary
    assert request.prepared is not None, "a save request is written only once"
    # -- 1. the temporary path ---------------------------------------------------------
    if primary:
        try:
            request.phase = "directory_creation"
            await tmp.create()
        except BaseException as exc:
            await asyncio.to_thread(op.publish, "tmp", _status(exc))
            await _discard_after_failure(request, exc)
            raise
        shared = ReadOnlyTemporaryPath.from_paths(temporary_path=tmp.get(), final_path=final)
        status = _status(None, {"path": shared.to_bytes().decode()})
        await asyncio.to_thread(op.publish, "tmp", status)
        where = tmp.get()
    else:
        received = await asyncio.to_thread(op.receive, "tmp", 0)
        doc = _parse_status(received, "Creating the temporary", 0)
        where = ReadOnlyTemporaryPath.from_bytes(doc["path"].encode()).get()
    # -- 2. every process writes its part --------------------------------------------------
    request.phase = "write"
    error: BaseException | None = None
    written = Manifest()
    try:
        written = await _tasks.settled(
            tree_write.write(
                backend,
                where,
                request.prepared,
                progress=request.progress,
                store_manifest=False,
                primary=primary,
            ),
            timeout=_DISCARD_TIMEOUT_SECS,
        )

    except Exception as exc:
        error = exc
    await asyncio.to_thread(
        op.publish, "written", _status(error, {"files": written.to_bytes().decode()})
    )
    try:
        await asyncio.to_thread(op.barrier, "written")
    except BaseException as exc:
        if primary:
            await _discard_after_failure(request, exc)
        raise
    # -- 3. the primary commits ------------------------------------------------------------
    if primary:
        try:
            if error is not None:
                raise error
            merged = Manifest()
            merged.merge(written)
            for process in range(1, op.coordinator.process_count):
                doc = _parse_status(
                    await asyncio.to_thread(op.receive, "written", process), "Writing", process
                )
                merged.merge(Manifest.from_bytes(doc["files"].encode(), f"process {process}"))
            tmp.manifest = merged
            await _commit(request)
        except BaseException as exc:
            await asyncio.to_thread(op.publish, "outcome", _status(exc))
            await _discard_after_failure(request, exc)
            await asyncio.to_thread(op.barrier, "committed")
            raise
        await asyncio.to_thread(op.publish, "outcome", _status(None))
    await asyncio.to_thread(op.barrier, "committed")
    if not primary:
        if error is not None:
            raise error
        _parse_status(await asyncio.to_thread(op.receive, "outcome", 0), "Committing", 0)
    _timing.record_duration(
        "total", time.perf_counter() - request.start, path=final, level=logging.INFO
    )


async def occupied(resolution: Resolution, final: UPath) -> PathState | None:
    """The state of whatever is at ``final``, or None if nothing is in the way of a save.

    An empty directory with no commit evidence does not count: ``commit_file`` creates the
    final directory just before its marker, so a crash or a failed commit in between
    leaves one behind."""
    backend = resolution.backend
    if not await backend.exists(final):
        return None
    state = await path_state_async(final, resolution.strategy, backend)
    if state is not PathState.FINALIZED and not await backend.list_dir(final):
        return None
    return state


async def check_destination(resolution: Resolution, final: UPath, *, force: bool) -> None:
    """ValueError if something is at ``final`` (see :func:`occupied`) and ``force`` is not
    set."""
    state = await occupied(resolution, final)
    if state is None:
        return
    if not force:
        raise ValueError(
            f"Destination {final} already exists ({state} checkpoint). Pass force=True "
            "to replace it, or delete it first."
        )
    logger.info("force=True: %s exists and will be replaced once the new save is written.", final)


async def restore_async(
    resolution: Resolution,
    final: UPath,
    target: Any = None,
    *,
    progress: _progress.ProgressCallback | None = None,
    jax_enable_x64: bool | None = None,
) -> Any:
    """Read the committed checkpoint at ``final`` (see :meth:`Checkpointer.restore`).
    ``jax_enable_x64``: jax's 64-bit mode in the caller's thread (None: this thread's)."""
    try:
        return await _restore(resolution, final, target, progress, jax_enable_x64)
    except Exception as exc:
        translated = translate(exc, action="Restoring", path=final, backend=resolution.backend)
        if translated is not exc:
            raise translated from exc
        raise


async def _restore(
    resolution: Resolution,
    final: UPath,
    target: Any,
    progress: _progress.ProgressCallback | None,
    jax_enable_x64: bool | None = None,
) -> Any:
    content = await committed_content(resolution, final)
    try:
        return await tree_read.read(
            resolution.backend,
            content,
            target,
            progress=progress,
            verify_checksums=resolution.verify_checksums,
            checkpoint=str(final),
            jax_enable_x64=jax_enable_x64,
        )
    except FileNotFoundError as exc:
        if not await resolution.backend.exists(content / tree_format.TREE_FILE):
            if await resolution.backend.exists(content / MANIFEST_FILE):
                raise CorruptCheckpointError(
                    str(final),
                    [f"{content / tree_format.TREE_FILE}: missing (recorded in its manifest)"],
                    file=str(content / tree_format.TREE_FILE),
                ) from exc
            raise ValueError(
                f"Checkpoint {final} is committed but holds no ckpt tree "
                f"({tree_format.TREE_FILE} is missing in {content}); it was probably "
                "written by another tool (e.g. Orbax)."
            ) from exc
        raise


async def committed_content(resolution: Resolution, final: UPath) -> UPath:
    """Where the files of the committed checkpoint ``final`` are; FileNotFoundError if it is
    missing, ValueError if it is not committed."""
    backend = resolution.backend
    if not await backend.exists(final):
        # A replace interrupted between its steps may have left the checkpoint aside (e.g.
        # rename's two-rename fallback): the strategies repair it, then it is read.
        _, repaired = await repair_async(final.parent, backend, resolution.strategy)
        if final not in repaired and not await backend.exists(final):
            raise FileNotFoundError(f"Checkpoint at {final} not found.")
    state = await path_state_async(final, resolution.strategy, backend)
    if state is not PathState.FINALIZED:
        why = (
            "it is a temporary checkpoint (a save in progress or interrupted)"
            if state is PathState.TEMPORARY
            else "it has no commit evidence (a symlink, a directory written by another "
            "tool, or a save interrupted before its commit)"
        )
        raise ValueError(
            f"Found incomplete checkpoint at {final}: its state is '{state}' under the "
            f"'{resolution.name}' strategy; {why}."
        )
    return (await owner(backend, final, resolution.strategy))[1]


class Checkpointer:
    """Saves and restores pytrees synchronously, atomically.

    Args:
        atomicity: the strategy name (``rename``, ``commit_file``, ...) or ``auto``;
            None follows the configuration (see :mod:`ckpt.config`).
        file_options: options for created directories (e.g. permissions).
        backend: a backend instance to use instead of the one registered for each path's
            scheme (e.g. a wrapper that instruments storage calls).
        progress: show a progress bar (on stderr) while arrays are written or read;
            None shows one on a terminal for trees of 256 MiB and more.
        verify_checksums: restores check the CRC32C of every file read against the
            checkpoint's integrity manifest (presence and size are always checked); None
            follows the configuration (``verify_checksums`` key, default false). See
            docs/integrity.md for the cost.

    Example::

        with ckpt.Checkpointer() as ckptr:
            ckptr.save("/ckpts/100", {"params": params, "step": 100})
            state = ckptr.restore("/ckpts/100")
    """

    #: Whether the blocking part snapshots (copies) mutable arrays; only an asynchronous
    #: save, which returns before writing, needs that.
    _snapshot_tree = False

    def __init__(
        self,
        atomicity: str | None = None,
        *,
        file_options: FileOptions | None = None,
        backend: Backend | None = None,
        progress: bool | None = None,
        verify_checksums: bool | None = None,
    ) -> None:
        self._atomicity = atomicity
        self._verify_checksums = verify_checksums
        self._progress = progress
        self._file_options = file_options or FileOptions()
        self._backend = backend
        self._closed = False

    # -- helpers -------------------------------------------------------------------------
    def _resolve(self, path: Any) -> tuple[UPath, Resolution]:
        final = to_path(path)
        return final, resolve(
            final,
            self._atomicity,
            backend=self._backend,
            verify_checksums=self._verify_checksums,
        )

    def _prepare(
        self, path: Any, tree: Any, *, force: bool, custom_metadata: dict[str, Any] | None
    ) -> SaveRequest:
        """The blocking part of a save: validation and the snapshot of ``tree``."""
        start = time.perf_counter()
        if self._closed:
            raise ValueError(f"{type(self).__name__} is closed.")
        final, resolution = self._resolve(path)
        custom = check_custom_metadata(custom_metadata)
        # Validate the tree before any storage call (an unsavable leaf is a TypeError).
        # A synchronous save writes before returning: no snapshot copy is needed.
        try:
            prepared = tree_snapshot.prepare(tree, copy=self._snapshot_tree)
        except RecursionError:
            raise ValueError(
                f"Cannot save to {final}: the tree is nested too deeply (more levels of "
                "dicts, lists and tuples than Python's recursion limit allows)."
            ) from None
        run_sync(check_destination(resolution, final, force=force))
        tmp = resolution.strategy.from_final(
            final, backend=resolution.backend, file_options=self._file_options
        )
        # Strategies that refuse to write beside a committed final path may honour this.
        tmp.replace_existing = force
        tmp.metadata.custom_metadata = custom
        tmp.metadata.item_handlers = dict(ITEM_HANDLERS)
        blocking = time.perf_counter() - start
        # Orbax reads performance_metrics as its SaveStepStatistics: only its keys.
        tmp.metadata.performance_metrics = {
            "checkpointer_blocking_start_time": time.time() - blocking,
            "checkpointer_blocking_duration_secs": blocking,
        }
        _timing.record_duration("blocking", blocking, path=final)
        request = SaveRequest(final, resolution, tmp, prepared, force, start)
        coordinator = multihost.current()
        if coordinator.multiprocess:
            request.operation = coordinator.operation("save", final)
        return request

    # -- public API ----------------------------------------------------------------------
    def save(
        self,
        path: Any,
        tree: Any,
        *,
        force: bool = False,
        custom_metadata: dict[str, Any] | None = None,
    ) -> None:
        """Save ``tree`` to ``path`` and commit it; returns once it is committed.

        Args:
            path: the final checkpoint path (local path or URL).
            tree: nested dicts/lists/tuples of jax/numpy arrays and scalars.
            force: replace an existing checkpoint at ``path`` (see the module docstring
                for the order of operations).
            custom_metadata: a JSON-serializable dict stored in ``_CHECKPOINT_METADATA``.

        Raises:
            ValueError: ``path`` exists and ``force`` is not set, or ``custom_metadata``
                is not a JSON-serializable dict.
            TypeError: ``tree`` holds an unsupported leaf (the message names it); raised
                before any storage call.
            ckpt.CommitConflictError: another writer committed ``path`` first.
            OSError: the store failed, as the standard subclass for its errno where there
                is one: ``OSError`` with ``errno.ENOSPC`` (no space) or ``errno.EROFS``
                (read-only file system), ``PermissionError``, ``FileNotFoundError``;
                the message names the path, the backend and the fix. The temporary data
                is removed; existing checkpoints are untouched.
            ckpt.CommitNotDurableError: the checkpoint was committed but the commit could
                not be made durable (see its message).
        """
        self._save(path, tree, force=force, custom_metadata=custom_metadata)

    def _save(
        self,
        path: Any,
        tree: Any,
        *,
        force: bool = False,
        custom_metadata: dict[str, Any] | None = None,
        on_commit: Callable[[], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """:meth:`save`, plus hooks (for the manager): ``on_commit()`` after the commit,
        ``on_failure(exc)`` when the save fails (before ``exc`` is raised)."""
        try:
            request = self._prepare(path, tree, force=force, custom_metadata=custom_metadata)
            assert request.prepared is not None
            show = _progress.wanted(self._progress, tree_snapshot.tree_nbytes(request.prepared))
            with _progress.byte_progress(f"saving {request.final}", show) as bar:
                request.progress = bar
                run_sync(write_and_commit(request))
        except CommitNotDurableError:
            if on_commit is not None:  # committed: the step exists
                on_commit()
            raise
        except BaseException as exc:
            if on_failure is not None:
                on_failure(exc)
            raise
        if on_commit is not None:
            on_commit()

    def restore(self, path: Any, target: Any = None) -> Any:
        """Read the committed checkpoint at ``path``.

        Args:
            path: the final checkpoint path.
            target: optional tree like the saved one; jax leaves (arrays or
                ``jax.ShapeDtypeStruct``) make the matching leaves come back as jax arrays
                with their sharding, and every leaf is checked against the checkpoint.

        Raises:
            FileNotFoundError: nothing exists at ``path``.
            ckpt.CorruptCheckpointError: a file the save recorded in the checkpoint's
                manifest is missing or has another size (or, with ``verify_checksums``,
                another CRC32C); it names the step, the leaf and the file.
            ValueError: ``path`` is not a committed checkpoint (temporary or unknown), or
                does not match ``target``; or a jax target asks for a 64-bit dtype while
                jax's 64-bit mode is off (jax would narrow the values silently).
            OSError: the store failed (``PermissionError``, ``FileNotFoundError`` for a
                missing array file, ...; see :meth:`save`).
        """
        start = time.perf_counter()
        final, resolution = self._resolve(path)
        logger.info("Restoring checkpoint from %s", final)
        with _progress.byte_progress(f"restoring {final}", _progress.wanted(self._progress)) as bar:
            # jax's 64-bit mode as this thread sees it (``jax.enable_x64`` is thread-local).
            x64 = bool(jax.config.read("jax_enable_x64"))
            result = run_sync(
                restore_async(resolution, final, target, progress=bar, jax_enable_x64=x64)
            )
        _timing.record_duration(
            "total", time.perf_counter() - start, path=final, prefix=_timing.READ_PREFIX
        )
        return result

    def metadata(self, path: Any) -> StepMetadata:
        """The step metadata (``_CHECKPOINT_METADATA``) of the committed checkpoint at
        ``path``; empty if it has none. Same errors as :meth:`restore`."""
        final, resolution = self._resolve(path)

        async def read() -> StepMetadata:
            content = await committed_content(resolution, final)
            found = await read_step_metadata(resolution.backend, content)
            return found if found is not None else StepMetadata()

        return run_sync(read())

    def close(self) -> None:
        """Release resources; later saves raise ValueError."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
