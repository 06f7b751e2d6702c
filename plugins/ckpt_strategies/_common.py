"""Checks shared by the built-in strategies."""

from __future__ import annotations

from upath import UPath

from ckpt.backend import Backend
from ckpt.backend_registry import get_backend
from ckpt.errors import ValidationError


async def reject_symlink(backend: Backend, path: UPath) -> None:
    """ValidationError if ``path`` is a symbolic link (never a checkpoint)."""
    if backend.capabilities.symlinks and await backend.is_link(path):
        raise ValidationError(
            f"Path {path} is a symbolic link; ckpt never treats a symlink as a checkpoint."
        )


async def require_dir(backend: Backend, path: UPath, what: str) -> None:
    """ValidationError naming ``what`` if ``path`` is not an existing directory."""
    if not await backend.is_dir(path):
        raise ValidationError(f"Expected {what} ({path}) to be an existing directory.")


def backend_for(path: UPath, backend: Backend | None) -> Backend:
    """``backend``, or the registered backend for ``path``'s scheme."""
    return backend or get_backend(path)
