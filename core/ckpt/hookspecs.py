"""Hook specifications of ckpt's plugin system (pluggy project ``ckpt``).

Plugins implement hooks that receive a ``register`` callback, so new keyword arguments can
be added later without breaking existing plugins. Built-in backends and strategies are
registered through these same hooks.

Example plugin module::

    import ckpt

    @ckpt.hookimpl
    def register_backends(register):
        register(MyBackend)          # a ckpt.Backend subclass with .scheme set

    @ckpt.hookimpl
    def register_strategies(register):
        register("my_strategy", MyTemporaryPath)
"""

from __future__ import annotations

from typing import Any, Protocol

import pluggy

hookspec = pluggy.HookspecMarker("ckpt")
hookimpl = pluggy.HookimplMarker("ckpt")


class RegisterBackend(Protocol):
    """The ``register`` callable ``register_backends`` receives: register a
    :class:`ckpt.Backend` subclass for its ``scheme`` (or the given ``schemes``)."""

    def __call__(
        self, backend_class: type[Any], *, schemes: tuple[str, ...] | None = None
    ) -> None: ...


class RegisterStrategy(Protocol):
    """The ``register`` callable ``register_strategies`` receives: register a
    :class:`ckpt.TemporaryPath` subclass under ``name`` (the ``atomicity=`` value)."""

    def __call__(self, name: str, strategy_class: type[Any]) -> None: ...


@hookspec
def register_backends(register: RegisterBackend) -> None:
    """Register storage backends: ``register(BackendClass, schemes=("s3",))``.

    ``schemes`` defaults to ``BackendClass.scheme``."""


@hookspec
def register_strategies(register: RegisterStrategy) -> None:
    """Register atomicity strategies: ``register("name", TemporaryPathClass)``."""
