"""Looking up backends: the installed backend that serves a URL scheme."""

from __future__ import annotations

import json
import os
from typing import Any

from upath import UPath

from ckpt import config as config_lib
from ckpt.backend import Backend
from ckpt.paths import split_scheme, to_path
from ckpt.plugins import KNOWN_BACKEND_PACKAGES, backend_not_installed, manager

__all__ = [
    "KNOWN_BACKEND_PACKAGES",
    "backend_not_installed",
    "get_backend",
    "list_backends",
    "scheme_of",
]

_LOCAL_ALIASES = {"", "file", "local", "posix"}


def scheme_of(location: Any) -> str:
    """The URL scheme of a path, lower-case (``"file"`` for plain local paths)."""
    if isinstance(location, UPath):
        protocol = location.protocol
        if isinstance(protocol, tuple):
            protocol = protocol[0]
        return "file" if protocol in _LOCAL_ALIASES else str(protocol)
    text = os.fspath(location)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    parts = split_scheme(text)
    if parts is not None and parts[1].startswith("//"):
        return "file" if parts[0] in _LOCAL_ALIASES else parts[0]
    return "file"


def get_backend(location: Any, *, config: config_lib.Config | None = None) -> Backend:
    """The backend instance that serves ``location`` (a path, URL or UPath)."""
    scheme = scheme_of(location)
    registry = manager.registry()
    backend_class = registry.backends.get(scheme)
    if backend_class is None:
        raise backend_not_installed(scheme, location)
    config = config if config is not None else config_lib.load_config()
    options = config.backend_options(scheme, backend_class.scheme)
    key = (scheme, json.dumps(options, sort_keys=True, default=str))
    backend = registry.instances.get(key)
    if backend is None:
        backend = backend_class(options)
        registry.instances[key] = backend
    return backend.bind(to_path(location))


def list_backends() -> dict[str, type[Backend]]:
    """Installed backends by scheme."""
    return dict(sorted(manager.registry().backends.items()))
