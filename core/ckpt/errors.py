"""Exceptions raised by ckpt.

Every error names the path and, where it matters, the backend and what to do next.
"""

from __future__ import annotations

__all__ = [
    "BackendNotInstalledError",
    "CommitConflictError",
    "CommitNotDurableError",
    "ConfigError",
    "CorruptCheckpointError",
    "InvalidPathError",
    "UnknownStrategyError",
    "UnsafePathError",
    "UnsupportedStrategyError",
    "ValidationError",
]


class ValidationError(ValueError):
    """A temporary or final checkpoint path is not what its strategy expects."""


class CommitConflictError(FileExistsError):
    """Another writer committed the same checkpoint first.

    The other writer's checkpoint is intact; this writer's data was discarded.
    """


class CommitNotDurableError(OSError):
    """The checkpoint was committed (it is visible and complete at its final path), but
    making the commit durable failed (e.g. the fsync of its parent directory): after a
    power loss it might be missing. The checkpoint is known as committed."""


class UnknownStrategyError(ValueError):
    """The configured atomicity strategy name is not registered."""


class UnsupportedStrategyError(ValueError):
    """The strategy needs a capability that the backend does not have."""


class BackendNotInstalledError(ValueError):
    """No installed backend handles the URL scheme of a path."""


class UnsafePathError(ValueError):
    """A name would escape its base directory, or a path is a symlink where none is allowed."""


class CorruptCheckpointError(ValueError):
    """A committed checkpoint's files do not match what its save recorded.

    Raised by restores (and reported by ``ckpt verify``) when a file listed in the
    checkpoint's integrity manifest is missing, has another size, or (with
    ``verify_checksums``) another CRC32C. ckpt never returns data from such a checkpoint.

    Attributes:
        checkpoint: the checkpoint (step) path.
        problems: one line per bad file, ``"<file>: <what is wrong>"``.
        leaf: the leaf path of the first bad file, or None if it belongs to no leaf.
        file: the first bad file's full path.
    """

    def __init__(
        self,
        checkpoint: str,
        problems: list[str],
        *,
        leaf: str | None = None,
        file: str | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.problems = list(problems)
        self.leaf = leaf
        self.file = file
        where = f" (leaf {leaf!r})" if leaf else ""
        more = f"; {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
        first = problems[0] if problems else "?"
        if first.endswith("."):
            first = first[:-1]  # the sentence ends below, with one period
        super().__init__(
            f"Corrupt checkpoint {checkpoint}{where}: {first}"
            f"{more}. Restore from another step; `ckpt verify {checkpoint}` lists every "
            "problem."
        )


class InvalidPathError(ValueError):
    """A path or URL that ckpt cannot use as written: a storage URL without ``//``
    (``s3:/bucket``), ``.``/``..``/empty segments inside a URL, an empty path. The message
    names the path and says how to write it."""


class ConfigError(ValueError):
    """A configuration value (config file, ``CKPT_*`` environment variable or backend
    option) is unknown or malformed. The message names where it came from and the fix."""
