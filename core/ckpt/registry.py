"""Looking up backends and strategies: by URL scheme and by the ``atomicity`` key."""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from upath import UPath

from ckpt import config as config_lib
from ckpt.backend import Backend
from ckpt.errors import BackendNotInstalledError, UnknownStrategyError, UnsupportedStrategyError
from ckpt.paths import split_scheme, to_path
from ckpt.plugins import manager

if TYPE_CHECKING:
    from ckpt.temporary_path import TemporaryPath

__all__ = [
    "BackendInfo",
    "backend_not_installed",
    "get_backend",
    "get_strategy",
    "list_backends",
    "list_strategies",
    "scheme_of",
    "strategy_for",
]

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


def backend_not_installed(scheme: str, location: Any) -> BackendNotInstalledError:
    """The error for a path whose scheme no installed backend serves."""
    registry = manager.registry()
    package = KNOWN_BACKEND_PACKAGES.get(scheme)
    hint = (
        f"Install it with `pip install {package}`."
        if package
        else "Install a ckpt backend plugin that serves this scheme."
    )
    failed = [f for f in registry.failures if package and package in f.name]
    extra = f" (the installed plugin failed to load: {failed[0].error})" if failed else ""
    return BackendNotInstalledError(
        f"No ckpt backend is installed for '{scheme}://' (path: {location}){extra}. {hint} "
        f"Installed backends: {', '.join(sorted(registry.backends)) or 'none'}."
    )


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


def list_strategies() -> dict[str, type[TemporaryPath]]:
    """Registered atomicity strategies by name."""
    return dict(sorted(manager.registry().strategies.items()))


def get_strategy(name: str) -> type[TemporaryPath]:
    """The strategy class registered as ``name``."""
    strategies = manager.registry().strategies
    if name in strategies:
        return strategies[name]
    folded = [k for k in strategies if isinstance(name, str) and k.casefold() == name.casefold()]
    if len(folded) == 1:  # "Rename", "COMMIT_FILE": names are case-insensitive
        return strategies[folded[0]]
    close = (
        difflib.get_close_matches(name.lower(), [*strategies, "auto"], n=1)
        if isinstance(name, str)
        else []
    )
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownStrategyError(
        f"Unknown atomicity strategy {name!r}. Registered strategies: "
        f"{', '.join(sorted(strategies))} (or 'auto' for the backend's default).{hint}"
    )


def supported_strategies(backend: Backend) -> list[str]:
    """Names of the registered strategies whose required capabilities ``backend`` has."""
    return backend.strategy_names_supported(list_strategies().items())


def strategy_for(
    location: Any, atomicity: str | None = None, *, backend: Backend | None = None
) -> type[TemporaryPath]:
    """The strategy class the ``atomicity`` key selects for ``location``.

    Raises a clear error for an unknown name, or a strategy the backend cannot run.
    """
    return resolve(location, atomicity, backend=backend).strategy


@dataclass(frozen=True)
class Resolution:
    """What the configuration resolves to for a location."""

    backend: Backend
    strategy: type[TemporaryPath]
    name: str
    source: str
    #: Whether restores check the CRC32C of every file (``verify_checksums``).
    verify_checksums: bool = False


def resolve(
    location: Any,
    atomicity: str | None = None,
    *,
    backend: Backend | None = None,
    verify_checksums: bool | None = None,
) -> Resolution:
    """Backend, strategy, where the setting came from, and the read checks, for
    ``location``."""
    config = config_lib.load_config()
    verify = config_lib.resolve_verify_checksums(
        (scheme_of(location),), verify_checksums, config
    )
    backend = backend or get_backend(location, config=config)
    name, source = config_lib.resolve_atomicity(
        (scheme_of(location), type(backend).scheme), atomicity, config
    )
    if name == config_lib.AUTO:
        name = backend.default_strategy
        source = f"{source} (auto -> {backend.describe()} default)"
    strategy = get_strategy(name)
    registered = str(getattr(strategy, "name", ""))
    if registered.casefold() == name.casefold():
        name = registered  # the registered spelling: "Rename" -> "rename"
    missing = [c for c in getattr(strategy, "requires", ()) if not backend.capabilities.has(c)]
    if missing:
        works = supported_strategies(backend)
        raise UnsupportedStrategyError(
            f"Atomicity strategy {name!r} (from {source}) cannot run on the {backend.describe()} "
            f"backend for {location}: it needs {', '.join(missing)}, which this store does not "
            f"have. Strategies that work here: {', '.join(works) or 'none'}."
        )
    return Resolution(
        backend=backend, strategy=strategy, name=name, source=source, verify_checksums=verify
    )


@dataclass(frozen=True)
class BackendInfo:
    scheme: str
    backend_class: type[Backend]
    capabilities: list[str]
    strategies: list[str]
    default_strategy: str
