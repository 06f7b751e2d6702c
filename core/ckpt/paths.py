"""Turning user input (str, os.PathLike, URL, UPath) into path objects."""

from __future__ import annotations

import os
from typing import Any

from upath import UPath

__all__ = ["to_path"]


def to_path(location: Any) -> UPath:
    """A pathlib-like path for a str, ``os.PathLike``, URL string or ``UPath``.

    Local paths are made absolute so that names and parents behave predictably."""
    if isinstance(location, UPath):
        return location
    if location is None:
        raise ValueError("A checkpoint path is required, got None.")
    text = os.fspath(location)
    if "://" in text and not text.startswith("file://"):
        return UPath(text)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return UPath(os.path.abspath(text))
