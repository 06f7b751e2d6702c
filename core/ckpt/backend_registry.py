"""Looking up backends: the installed backend that serves a URL scheme."""

from __future__ import annotations

import json
import os
from typing import Any

from upath import UPath

from ckpt import config as config_lib
from ckpt.backend import Backend
from ckpt.errors import BackendNotInstalledError
from ckpt.paths import to_path
from ckpt.plugins import manager

__all__ = ["KNOWN_BACKEND_PACKAGES", "get_backend", "list_backends", "scheme_of"]

#: Packages that provide backends for well-known schemes (for "not installed" errors).
KNOWN_BACKEND_PACKAGES = {
    "s3": "ckpt-backend-s3",
    "s3a": "ckpt-backend-s3",
    "gs": "ckpt-backend-gcs",
    "gcs": "ckpt-backend-gcs",
    "az": "ckpt-backend-azure",
    "abfs": "ckpt-backend-azure",
}

_LOCAL_ALIASES = {"", "file", "local", "posix"}


def scheme_of(location: Any) -> str:
    """The URL scheme of a path (``"file"`` for plain local paths)."""
    if isinstance(location, UPath):
        protocol = location.protocol
        if isinstance(protocol, tuple):
            protocol = protocol[0]
        return "file" if protocol in _LOCAL_ALIASES else str(protocol)
    text = os.fspath(location)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        return "file" if scheme in _LOCAL_ALIASES else scheme
    return "file"


def get_backend(location: Any, *, config: config_lib.Config | None = None) -> Backend:
    """The backend instance that serves ``location`` (a path, URL or UPath)."""
    scheme = scheme_of(location)
    registry = manager.registry()
    backend_class = registry.backends.get(scheme)
    if backend_class is None:
        package = KNOWN_BACKEND_PACKAGES.get(scheme)
        hint = (
            f"Install it with `pip install {package}`."
            if package
            else "Install a ckpt backend plugin that serves this scheme."
        )
        failed = [f for f in registry.failures if package and package in f.name]
        extra = f" (the installed plugin failed to load: {failed[0].error})" if failed else ""
        raise BackendNotInstalledError(
            f"No ckpt backend is installed for '{scheme}://' (path: {location}){extra}. {hint} "
            f"Installed backends: {', '.join(sorted(registry.backends)) or 'none'}."
        )
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
