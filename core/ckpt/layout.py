"""Names on storage shared by every layout: Orbax's names (temporary suffix, commit
marker, step metadata) and writer tokens. Each strategy's own names live with it.

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
    "check_safe_name",
    "commit_marker_text",
    "final_name_of",
    "is_commit_marker",
    "is_temporary_name",
    "temporary_name",
    "unique_token",
]

#: Suffix that marks a temporary checkpoint directory (Orbax detects it by substring).
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"
#: Commit marker file (Orbax's name).
COMMIT_SUCCESS_FILE = "commit_success.txt"
#: ``<path>.partial_save``: the session directory of a partial save (:mod:`ckpt.partial`).
PARTIAL_SAVE_SUFFIX = ".partial_save"
#: Names holding this are ckpt's internal names (a strategy's writer or set-aside
#: directories): never a step name or step prefix.
RESERVED_INFIX = ".ckpt-"
#: Step metadata JSON file (Orbax's name).
METADATA_FILE = "_CHECKPOINT_METADATA"
_COMMIT_TEXT = "Checkpoint commit was successful to {final}"


def unique_token() -> str:  # "<time_ns>-<pid>-<12 hex>": parsed by strategy.token_created_ns
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


def commit_marker_text(final: str) -> str:
    """Text of ``commit_success.txt`` (Orbax's). A strategy may append lines of its own."""
    return _COMMIT_TEXT.format(final=final)


def is_commit_marker(text: str) -> bool:
    """True if ``text`` is a complete commit marker (an empty or foreign file is not)."""
    return text.startswith(_COMMIT_TEXT.split("{", 1)[0])


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
