"""Exceptions raised by ckpt.

Every error names the path and, where it matters, the backend and what to do next.
"""

from __future__ import annotations

__all__ = [
    "BackendNotInstalledError",
    "CommitConflictError",
    "CommitNotDurableError",
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
