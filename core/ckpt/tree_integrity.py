"""Integrity checks when a tree is read: the manifest of the checkpoint against the files
found (presence, size, and with ``verify_checksums`` the CRC32C) and against the files the
tree document needs (see :mod:`ckpt.manifest`)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from upath import UPath

from ckpt import tree_format
from ckpt.backend import Backend
from ckpt.errors import CorruptCheckpointError
from ckpt.manifest import (
    MANIFEST_FILE,
    FileRecord,
    Manifest,
    Problem,
    checksum_problem,
    compare_sizes,
    read_manifest,
)
from ckpt.tree_format import _ARRAY_KINDS, TREE_FILE, _chunk_key, _display

__all__ = ["required_files", "unrecorded_files"]


# -- integrity checks on read -----------------------------------------------------------


def _array_dir_of(relpath: str) -> str | None:
    """The array directory (e.g. ``arrays/3``) of a zarr file path, else None."""
    if relpath.endswith("/zarr.json"):
        return relpath[: -len("/zarr.json")]
    if relpath.endswith("/c"):
        return relpath[:-2]
    if "/c/" in relpath:
        return relpath.split("/c/", 1)[0]
    return None


def required_files(doc: dict[str, Any]) -> set[str]:
    """Every file a (validated) tree document needs, relative to its directory: the
    document itself, the pack file of each packed leaf, and each zarr array's
    ``zarr.json`` and chunk files (every chunk is stored, fill values included)."""
    out = {TREE_FILE}
    for meta in doc["leaves"]:
        if meta["kind"] not in _ARRAY_KINDS:
            continue
        if "offset" in meta:
            out.add(meta["path"])
            continue
        out.add(f"{meta['path']}/zarr.json")
        shape, chunks = meta["shape"], meta.get("chunks")
        if chunks is None or 0 in shape or len(chunks) != len(shape) or 0 in chunks:
            continue  # no chunk files (or a layout the array read itself refuses)
        grid = [range(-(-n // c)) for n, c in zip(shape, chunks, strict=True)]
        out.update(f"{meta['path']}/{_chunk_key(index)}" for index in itertools.product(*grid))
    return out


def unrecorded_files(doc: dict[str, Any], manifest: Manifest) -> list[Problem]:
    """The files ``doc`` needs that ``manifest`` does not record: such a file's data could
    not be proven to be what the save wrote (a damaged or hand-edited manifest)."""
    return [
        Problem(rel, "missing", "needed by the tree document, not recorded in the manifest")
        for rel in sorted(required_files(doc) - set(manifest.files))
    ]


class _Integrity:
    """The manifest of the checkpoint being read, and the checks made against it."""

    def __init__(
        self,
        backend: Backend,
        directory: UPath,
        manifest: Manifest,
        doc: dict[str, Any],
        *,
        verify_checksums: bool,
        checkpoint: str,
    ) -> None:
        self.backend = backend
        self.directory = directory
        self.manifest = manifest
        self.doc = doc
        self.verify_checksums = verify_checksums
        self.checkpoint = checkpoint
        leaves: list[dict[str, Any]] = doc["leaves"]
        self.keypaths = {
            m["path"]: m["keypath"] for m in leaves if "path" in m and "offset" not in m
        }
        self.packed: dict[str, list[str]] = {}  # pack file -> keypaths of its leaves
        for m in leaves:
            if "offset" in m:
                self.packed.setdefault(m["path"], []).append(m["keypath"])
        self.files_of: dict[str, list[str]] = {}
        for rel in manifest.files:
            array_dir = _array_dir_of(rel)
            if array_dir is not None:
                self.files_of.setdefault(array_dir, []).append(rel)

    @classmethod
    async def load(
        cls,
        backend: Backend,
        directory: UPath,
        doc: dict[str, Any],
        *,
        verify_checksums: bool,
        checkpoint: str,
    ) -> _Integrity:
        name = doc["manifest"]
        if name != MANIFEST_FILE:
            raise ValueError(
                f"Malformed tree metadata {directory / TREE_FILE}: unknown manifest {name!r}."
            )
        path = directory / MANIFEST_FILE
        try:
            raw = await backend.read_bytes(path)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                checkpoint,
                [f"{path}: missing (the tree document says the save recorded a manifest)"],
                file=str(path),
            ) from None
        try:
            manifest = Manifest.from_bytes(raw, str(path))
        except ValueError as exc:
            raise CorruptCheckpointError(checkpoint, [str(exc)], file=str(path)) from None
        return cls(
            backend,
            directory,
            manifest,
            doc,
            verify_checksums=verify_checksums,
            checkpoint=checkpoint,
        )

    def leaf_of(self, relpath: str) -> str | None:
        if relpath in self.packed:  # a pack file: the first of the leaves it holds
            return _display(self.packed[relpath][0])
        array_dir = _array_dir_of(relpath)
        keypath = self.keypaths.get(array_dir) if array_dir is not None else None
        return _display(keypath) if keypath is not None else None

    def fail(self, problems: list[Problem]) -> CorruptCheckpointError:
        first = problems[0]

        def line(p: Problem) -> str:
            held = self.packed.get(p.relpath, [])
            more = f" (holds leaves {', '.join(map(repr, map(_display, held[:3])))}" + (
                f" and {len(held) - 3} more)" if len(held) > 3 else ")"
            )
            return f"{self.directory / p.relpath}: {p.detail}" + (more if held else "")

        return CorruptCheckpointError(
            self.checkpoint,
            [line(p) for p in problems],
            leaf=self.leaf_of(first.relpath),
            file=str(self.directory / first.relpath),
        )

    async def check_sizes(self, tree_raw: bytes) -> None:
        """Every recorded file is present with its size (one listing); the tree document
        read is the one recorded. Raises :class:`CorruptCheckpointError`."""
        record = self.manifest.files.get(TREE_FILE)
        if record is None:
            raise self.fail([Problem(TREE_FILE, "missing", "not recorded in the manifest")])
        # The tree document is in memory anyway: its checksum is always checked.
        problem = checksum_problem(TREE_FILE, record, tree_raw)
        # Only the recorded tree document's needs are checked against the manifest.
        problems = [problem] if problem is not None else unrecorded_files(self.doc, self.manifest)
        found = await self.backend.file_sizes(self.directory)
        problems += [p for p in compare_sizes(self.manifest, found) if p.relpath != TREE_FILE]
        if problems:
            raise self.fail(problems)

    async def verify_files(self, relpaths: list[str]) -> None:
        """Read ``relpaths`` and compare size and CRC32C (a separate read pass)."""
        limit = asyncio.Semaphore(tree_format.FILE_IO_CONCURRENCY)

        async def one(rel: str) -> Problem | None:
            async with limit:
                try:
                    data = await self.backend.read_bytes(self.directory / rel)
                except FileNotFoundError:
                    return Problem(rel, "missing", "missing")
                return checksum_problem(rel, self.manifest.files[rel], data)

        found = await asyncio.gather(*(one(r) for r in relpaths))
        problems = [p for p in found if p is not None]
        if problems:
            raise self.fail(problems)

    def chunk_record(self, array_dir: str, key: str) -> FileRecord | None:
        return self.manifest.files.get(f"{array_dir}/{key}")


async def _check_against_manifest(
    backend: Backend, directory: UPath, tree_raw: bytes, checkpoint: str | None
) -> None:
    """CorruptCheckpointError if ``directory`` has a manifest whose record of the tree
    document does not match ``tree_raw``."""
    try:
        manifest = await read_manifest(backend, directory)
    except ValueError:
        manifest = None
    record = manifest.files.get(TREE_FILE) if manifest is not None else None
    if record is None:
        return
    problem = checksum_problem(TREE_FILE, record, tree_raw)
    if problem is not None:
        raise CorruptCheckpointError(
            checkpoint or str(directory),
            [f"{directory / TREE_FILE}: {problem.detail}"],
            file=str(directory / TREE_FILE),
        )
