"""Names on storage: the Orbax-compatible on-disk layout of checkpoints.

Pure functions on names; no I/O. See docs/layout.md.
"""

from __future__ import annotations

import os
import time
import uuid

__all__ = [
    "COMMIT_SUCCESS_FILE",
    "METADATA_FILE",
    "TMP_DIR_SUFFIX",
    "WRITERS_DIR",
    "WRITER_DIR_INFIX",
]

#: Suffix that marks a temporary checkpoint directory (Orbax detects it by substring).
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"
#: Commit marker file (Orbax's name).
COMMIT_SUCCESS_FILE = "commit_success.txt"
#: Step metadata JSON file (Orbax's name).
METADATA_FILE = "_CHECKPOINT_METADATA"
#: Infix of the writer-unique directory holding one writer's files under ``commit_file``:
#: ``<root>/.ckpt-writers/<final name>.ckpt-writer-<token>``.
WRITER_DIR_INFIX = ".ckpt-writer-"
#: The one directory under a checkpoint root that holds ``commit_file`` writer directories
#: (one entry in the root's listing however many checkpoints there are).
WRITERS_DIR = ".ckpt-writers"

_COMMIT_TEXT = "Checkpoint commit was successful to {final}"
_WRITER_LINE = "ckpt-writer: "


def unique_token() -> str:  # "<time_ns>-<pid>-<12 hex>": parsed by temporary_paths
    """A token unique to one writer: wall time, process id and 48 random bits."""
    return f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def is_temporary_name(name: str) -> bool:
    """True if ``name`` carries the temporary suffix (any of Orbax's three forms)."""
    return TMP_DIR_SUFFIX in name


def temporary_name(final_name: str, token: str | None = None) -> str:
    """A writer-unique temporary name: ``<final>.orbax-checkpoint-tmp-<token>``."""
    return f"{final_name}{TMP_DIR_SUFFIX}-{token or unique_token()}"


def final_name_of(temporary_name: str) -> str:
    """The final name a temporary name stands for (cut at the first suffix)."""
    index = temporary_name.find(TMP_DIR_SUFFIX)
    if index == -1:
        raise ValueError(f"Expected {temporary_name!r} to contain {TMP_DIR_SUFFIX!r}.")
    return temporary_name[:index]


def writer_dir_name(final_name: str, token: str | None = None) -> str:
    """The name of a writer-unique directory for ``final_name`` (inside :data:`WRITERS_DIR`)."""
    return f"{final_name}{WRITER_DIR_INFIX}{token or unique_token()}"


def is_writer_dir_name(name: str) -> bool:
    return WRITER_DIR_INFIX in name and not is_temporary_name(name)


def final_name_of_writer(name: str) -> str:
    """The final name a writer directory belongs to."""
    index = name.find(WRITER_DIR_INFIX)
    if index <= 0:
        raise ValueError(f"Expected {name!r} to contain {WRITER_DIR_INFIX!r}.")
    return name[:index]


def commit_marker_text(final: str, writer_dir: str | None = None) -> str:
    """Text of ``commit_success.txt``; names the winning writer directory if there is one."""
    text = _COMMIT_TEXT.format(final=final)
    if writer_dir:
        text += f"\n{_WRITER_LINE}{WRITERS_DIR}/{writer_dir}\n"
    return text


def writer_dir_from_marker(text: str, final_name: str) -> str | None:
    """The name of the writer directory the commit marker of ``final_name`` names, or None
    (Orbax's marker names none). Refuses anything but a writer directory of ``final_name``
    inside :data:`WRITERS_DIR`."""
    for line in text.splitlines():
        if line.startswith(_WRITER_LINE):
            relative = line[len(_WRITER_LINE) :].strip()
            head, _, name = relative.partition("/")
            if (
                head == WRITERS_DIR
                and name.startswith(final_name + WRITER_DIR_INFIX)
                and "/" not in name
                and "\\" not in name
                and ".." not in name
            ):
                return name
            raise ValueError(f"Malformed commit marker of {final_name!r}: writer {name!r}.")
    return None


def check_safe_name(name: str, what: str = "name") -> str:
    """Refuse a single path component that could escape its base directory."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise _unsafe(
            f"Refusing {what} {name!r}: it must be a single path component "
            "(no '/', '..', or empty names) so it cannot escape the base directory."
        )
    return name


def _unsafe(message: str) -> Exception:
    from ckpt.errors import UnsafePathError

    return UnsafePathError(message)
