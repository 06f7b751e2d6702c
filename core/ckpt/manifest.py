"""The integrity manifest: every file a save wrote, with its size and CRC32C.

A save records, before its commit, one ``_CKPT_MANIFEST.json`` at the top of the
checkpoint's content directory::

    {"format": "ckpt-manifest", "version": 1, "checksum": "crc32c",
     "files": {"_TREE.json": [812, 3735928559],
               "_CHECKPOINT_METADATA": [301, 271828182],
               "arrays/0/zarr.json": [402, 1234567],
               "arrays/0/c/0/0": [67108864, 99999], ...}}

Each entry maps a path relative to the content directory (``/``-separated) to
``[size in bytes, CRC32C (Castagnoli) as an unsigned 32-bit integer]``. The checksums are
computed from the bytes in host memory as they are written (never by reading the files
back), with ``google-crc32c`` (hardware-accelerated).

What is checked when (see docs/integrity.md):

- restore, always: every file of the checkpoint is present with its recorded size (one
  listing of the checkpoint); a missing or resized file raises
  :class:`ckpt.CorruptCheckpointError` naming the step, the leaf and the file.
- restore with ``verify_checksums`` (argument or config key): the CRC32C of every file read.
- ``ckpt verify``: presence, size and CRC32C of every file.

Checkpoints written before manifests existed (and Orbax checkpoints) have none; their tree
document does not claim one, and ``ckpt verify`` says so rather than printing OK.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import google_crc32c
import numpy as np
from upath import UPath

from ckpt.backend import Backend

__all__ = [
    "MANIFEST_FILE",
    "FileRecord",
    "Manifest",
    "Problem",
    "check_files",
    "crc32c",
    "crc32c_extend",
    "read_manifest",
]

#: Name of the manifest file, at the top of a checkpoint's content directory.
MANIFEST_FILE = "_CKPT_MANIFEST.json"
FORMAT_NAME = "ckpt-manifest"
FORMAT_VERSION = 1
#: Largest manifest read (bytes); a bigger file is refused as corrupt.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


def _as_buffer(data: Any) -> Any:
    # google-crc32c takes read-only buffers; numpy arrays pass as they are (no copy).
    if isinstance(data, (bytes, np.ndarray)):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return np.frombuffer(data, np.uint8)
    raise TypeError(f"cannot checksum {type(data).__qualname__}")


def crc32c(data: Any) -> int:
    """CRC32C of ``data`` (bytes, bytearray, memoryview or a C-contiguous numpy array)."""
    return int(google_crc32c.value(_as_buffer(data)))


def crc32c_extend(crc: int, data: Any) -> int:
    """CRC32C of the concatenation of the bytes with checksum ``crc`` and ``data``."""
    return int(google_crc32c.extend(crc, _as_buffer(data)))


_ZEROS = np.zeros(1 << 20, np.uint8)


def crc32c_zeros(crc: int, n: int) -> int:
    """``crc`` extended by ``n`` zero bytes."""
    while n > 0:
        step = min(n, _ZEROS.size)
        crc = crc32c_extend(crc, _ZEROS[:step])
        n -= step
    return crc


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """One file of a checkpoint: ``size`` in bytes and ``crc32c`` (unsigned 32-bit)."""

    size: int
    crc32c: int


@dataclasses.dataclass
class Manifest:
    """Files of one checkpoint, by path relative to its content directory."""

    files: dict[str, FileRecord] = dataclasses.field(default_factory=dict)

    def add(self, relpath: str, data: Any) -> None:
        """Record the file ``relpath`` holding exactly ``data``."""
        self.files[relpath] = FileRecord(len(memoryview(data).cast("B")), crc32c(data))

    def add_record(self, relpath: str, record: FileRecord) -> None:
        """Record the file ``relpath`` with a size and checksum computed elsewhere."""
        self.files[relpath] = record

    def merge(self, other: Manifest, prefix: str = "") -> None:
        """Add every file of ``other``, its paths under ``prefix`` (e.g. ``piece-1``)."""
        for rel, record in other.files.items():
            self.files[f"{prefix}/{rel}" if prefix else rel] = record

    def to_bytes(self) -> bytes:
        """The manifest file's contents (compact JSON, files sorted by path)."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "checksum": "crc32c",
            "files": {k: [r.size, r.crc32c] for k, r in sorted(self.files.items())},
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse a manifest; ValueError (naming ``where``) if it is malformed."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"Manifest {where} is larger than {MAX_MANIFEST_BYTES} bytes.")
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"Manifest {where} is not valid JSON ({exc}).") from None
        if not (
            isinstance(doc, dict)
            and doc.get("format") == FORMAT_NAME
            and doc.get("version") == FORMAT_VERSION
            and doc.get("checksum") == "crc32c"
            and isinstance(doc.get("files"), dict)
        ):
            raise ValueError(
                f"Manifest {where} is not a {FORMAT_NAME} version {FORMAT_VERSION} document."
            )
        files: dict[str, FileRecord] = {}
        for rel, value in doc["files"].items():
            if not (
                _safe_relpath(rel)
                and isinstance(value, list)
                and len(value) == 2
                and all(type(v) is int and v >= 0 for v in value)
                and value[1] < 2**32
            ):
                raise ValueError(f"Manifest {where}: malformed entry {rel!r}: {value!r}.")
            files[rel] = FileRecord(value[0], value[1])
        return cls(files)


def _safe_relpath(rel: Any) -> bool:
    """A relative ``/``-separated path that stays inside its directory."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


@dataclasses.dataclass(frozen=True)
class Problem:
    """One file that does not match the manifest. ``kind``: ``missing`` (absent, or not
    recorded though needed), ``size``, ``checksum`` or ``malformed`` (unreadable)."""

    relpath: str
    kind: str
    detail: str


def compare_sizes(manifest: Manifest, found: Mapping[str, int]) -> list[Problem]:
    """Problems of presence and size: ``found`` maps relative paths to sizes in bytes."""
    problems = []
    for rel, record in sorted(manifest.files.items()):
        size = found.get(rel)
        if size is None:
            problems.append(Problem(rel, "missing", f"missing (expected {record.size} bytes)"))
        elif size != record.size:
            problems.append(
                Problem(rel, "size", f"has {size} bytes, the manifest records {record.size}")
            )
    return problems


def checksum_problem(rel: str, record: FileRecord, data: Any) -> Problem | None:
    """The problem with file ``rel`` holding ``data``, if any (size, then CRC32C)."""
    size = len(memoryview(data).cast("B"))
    if size != record.size:
        return Problem(rel, "size", f"has {size} bytes, the manifest records {record.size}")
    actual = crc32c(data)
    if actual != record.crc32c:
        return Problem(
            rel, "checksum", f"CRC32C {actual:08x} differs from the manifest's {record.crc32c:08x}"
        )
    return None


def leaf_of(relpath: str, array_paths: Iterable[tuple[str, str]]) -> str | None:
    """The leaf keypath whose array directory holds ``relpath``, given
    ``(array dir, keypath)`` pairs; None for files that belong to no leaf."""
    for directory, keypath in array_paths:
        if relpath.startswith(directory + "/"):
            return keypath
    return None


async def read_manifest(backend: Backend, directory: UPath) -> Manifest | None:
    """The manifest at the top of ``directory``, or None if it has none.

    Raises:
        ValueError: the file exists but is malformed (the message names it).
    """
    path = directory / MANIFEST_FILE
    try:
        raw = await backend.read_bytes(path)
    except FileNotFoundError:
        return None
    return Manifest.from_bytes(raw, str(path))


async def check_files(
    backend: Backend,
    directory: UPath,
    manifest: Manifest,
    *,
    checksums: bool = True,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[Problem]:
    """Every problem of the files under ``directory`` against ``manifest``: presence and
    size from one listing, then (with ``checksums``) the CRC32C of each file read through
    the backend, ``concurrency`` files at a time. ``progress(advance_bytes, total)`` is
    called as files are checked."""
    found = await backend.file_sizes(directory)
    problems = compare_sizes(manifest, found)
    if not checksums:
        return problems
    bad = {p.relpath for p in problems}
    todo = [rel for rel in sorted(manifest.files) if rel not in bad]
    total = sum(manifest.files[rel].size for rel in todo)
    if progress is not None:
        progress(0, total)
    limit = asyncio.Semaphore(concurrency)

    async def one(rel: str) -> Problem | None:
        async with limit:
            try:
                data = await backend.read_bytes(directory / rel)
            except FileNotFoundError:
                return Problem(rel, "missing", "missing (removed while being verified)")
            problem = checksum_problem(rel, manifest.files[rel], data)
            del data
        if progress is not None:
            progress(manifest.files[rel].size, total)
        return problem

    checked = await asyncio.gather(*(one(rel) for rel in todo))
    problems += [p for p in checked if p is not None]
    return sorted(problems, key=lambda p: p.relpath)
