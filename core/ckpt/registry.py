"""Looking up strategies by the ``atomicity`` key, and resolving the configuration for a
location once (backend, strategy, where the setting came from)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ckpt import config as config_lib
from ckpt.backend import Backend
from ckpt.backend_registry import get_backend, list_backends, scheme_of
from ckpt.errors import UnknownStrategyError, UnsupportedStrategyError
from ckpt.paths import to_path
from ckpt.plugins import manager
from ckpt.strategy import TemporaryPath

__all__ = [
    "BackendInfo",
    "Resolution",
    "get_backend",
    "get_strategy",
    "list_backends",
    "list_strategies",
    "resolve",
    "scheme_of",
    "strategies_for",
    "strategy_for",
    "supported_strategies",
    "to_path",
]


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


def strategies_for(
    backend: Backend, first: type[TemporaryPath] | None = None
) -> list[type[TemporaryPath]]:
    """The registered strategy classes ``backend`` can run, ``first`` (the configured one)
    first. Discovery, cleanup and reads consult all of them, so that a root holding
    checkpoints of several layouts is understood whatever the configured strategy is."""
    found: list[type[TemporaryPath]] = [first] if first is not None else []
    for name in supported_strategies(backend):
        cls = get_strategy(name)
        if cls not in found:
            found.append(cls)
    return found


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

    @property
    def strategies(self) -> list[type[TemporaryPath]]:
        """Every strategy the backend runs, the configured one first."""
        return strategies_for(self.backend, self.strategy)


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
    verify = config_lib.resolve_verify_checksums((scheme_of(location),), verify_checksums, config)
    backend = backend or get_backend(location, config=config)
    name, source = config_lib.resolve_atomicity(
        (scheme_of(location), type(backend).scheme), atomicity, config
    )
    if name == config_lib.AUTO:
        name = backend.default_strategy
        source = f"{source} (auto -> {backend.describe()} default)"
        if not name:
            raise UnknownStrategyError(
                f"The {backend.describe()} backend declares no default strategy: set "
                f"'atomicity' for {location}. Strategies that work here: "
                f"{', '.join(supported_strategies(backend)) or 'none'}."
            )
    strategy = get_strategy(name)
    registered = str(getattr(strategy, "name", ""))
    if registered.casefold() == name.casefold():
        name = registered  # the registered spelling: "Rename" -> "rename"
    missing = [c for c in strategy.requires if not backend.capabilities.has(c)]
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
    """One registered backend as ``ckpt backends`` lists it: its URL ``scheme``, class,
    declared capabilities, the strategies it can run and the one ``auto`` picks."""

    scheme: str
    backend_class: type[Backend]
    capabilities: list[str]
    strategies: list[str]
    default_strategy: str
