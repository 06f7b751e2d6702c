"""Exceptions raised by ckpt.

Every error names the path and, where it matters, the backend and what to do next.
"""

from __future__ import annotations

__all__ = [
    "BackendNotInstalledError",
    "CommitConflictError",
    "ConfigError",
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


class UnknownStrategyError(ValueError):
    """The configured atomicity strategy name is not registered."""


class UnsupportedStrategyError(ValueError):
    """The strategy needs a capability that the backend does not have."""


class BackendNotInstalledError(ValueError):
    """No installed backend handles the URL scheme of a path."""


class UnsafePathError(ValueError):
    """A name would escape its base directory, or a path is a symlink where none is allowed."""


class InvalidPathError(ValueError):
    """A path or URL that ckpt cannot use as written: a storage URL without ``//``
    (``s3:/bucket``), ``.``/``..``/empty segments inside a URL, an empty path. The message
    names the path and says how to write it."""


class ConfigError(ValueError):
    """A configuration value (config file, ``CKPT_*`` environment variable or backend
    option) is unknown or malformed. The message names where it came from and the fix."""
