"""Turning user input (str, os.PathLike, URL, UPath) into path objects."""

from __future__ import annotations

import os
from typing import Any

from upath import UPath

__all__ = ["to_path"]


def to_path(location: Any) -> UPath:
    """A pathlib-like path for a str, ``os.PathLike``, URL string or ``UPath``.

    Local paths are made absolute so that names and parents behave predictably.

    Raises:
        ckpt.BackendNotInstalledError: no installed backend serves the URL's scheme.
    """
    if isinstance(location, UPath):
        return location
    if location is None:
        raise ValueError("A checkpoint path is required, got None.")
    text = os.fspath(location)
    if "://" in text and not text.startswith("file://"):
        try:
            return UPath(text)
        except ValueError as exc:
            if "Unsupported filesystem" not in str(exc) and "protocol" not in str(exc).lower():
                raise
            from ckpt.registry import get_backend  # not at import time: registry needs us

            get_backend(text)  # raises BackendNotInstalledError naming the package to install
            raise
    if text.startswith("file://"):
        text = text[len("file://") :]
    return UPath(os.path.abspath(text))
