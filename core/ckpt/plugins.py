"""The plugin manager: built-in and pip-installed backends and strategies.

This module holds ckpt's only module-level mutable state: the pluggy plugin manager and
the registry built from it (backend classes, strategy classes, backend instances).

Built-in plugins are registered through the same hooks as third-party ones. Installed
distributions add plugins through the ``ckpt`` entry-point group. ``CKPT_LOAD_PLUGINS``
(comma-separated entry-point names) restricts which installed plugins load;
``CKPT_DISABLE_PLUGINS`` blocks named ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ckpt import hookspecs
from ckpt.errors import BackendNotInstalledError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ckpt"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "ckpt_backend_local",
    "ckpt_strategies.rename",
    "ckpt_strategies.commit_file",
    "ckpt_strategies.snapshot",
)


@dataclass
class PluginFailure:
    """A plugin that could not be loaded: its name and the error."""

    name: str
    error: str


@dataclass
class _Registry:
    backends: dict[str, type[Any]] = field(default_factory=dict)
    strategies: dict[str, type[Any]] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    instances: dict[tuple[str, str], Any] = field(default_factory=dict)


class _Manager:
    """Owns the pluggy manager; loads plugins lazily on first use."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("ckpt")
        self.pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._registry: _Registry | None = None
        self._loaded = False

    def _load(self) -> None:
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            if not self.pm.is_registered(module):
                self.pm.register(module, module_name)
        allow = _env_list("CKPT_LOAD_PLUGINS")
        deny = set(_env_list("CKPT_DISABLE_PLUGINS") or ())
        self._failures: list[PluginFailure] = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if (allow is not None and ep.name not in allow) or ep.name in deny:
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the others
                dist = getattr(ep, "dist", None)
                where = f" (from {dist.name})" if dist is not None else ""
                message = f"{type(exc).__name__}: {exc}"
                logger.warning("ckpt plugin %r%s failed to load: %s", ep.name, where, message)
                self._failures.append(PluginFailure(ep.name + where, message))
        self.pm.check_pending()
        self._loaded = True

    def registry(self) -> _Registry:
        with self._lock:
            if self._registry is None:
                if not self._loaded:
                    self._load()
                registry = _Registry(failures=list(self._failures))

                def register_backend(
                    backend_class: type[Any], *, schemes: tuple[str, ...] | None = None
                ) -> None:
                    for scheme in schemes or (backend_class.scheme,):
                        registry.backends[scheme] = backend_class

                def register_strategy(name: str, strategy_class: type[Any]) -> None:
                    registry.strategies[name] = strategy_class

                for hook_name, callback in (
                    ("register_backends", register_backend),
                    ("register_strategies", register_strategy),
                ):
                    hook = getattr(self.pm.hook, hook_name)
                    for impl in hook.get_hookimpls():
                        try:
                            impl.function(callback)
                        except Exception as exc:
                            message = f"{type(exc).__name__}: {exc}"
                            logger.warning(
                                "ckpt plugin %r failed in %s: %s",
                                impl.plugin_name,
                                hook_name,
                                message,
                            )
                            registry.failures.append(PluginFailure(impl.plugin_name, message))
                self._registry = registry
            return self._registry

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object (tests, embedding applications)."""
        with self._lock:
            self.registry()
            self.pm.register(plugin, name=name)
            self._registry = None

    def unregister(self, plugin: Any = None, name: str | None = None) -> None:
        with self._lock:
            self.pm.unregister(plugin=plugin, name=name)
            self._registry = None

    def reset_instances(self) -> None:
        """Forget backend instances (they are rebuilt from configuration on next use)."""
        with self._lock:
            if self._registry is not None:
                self._registry.instances.clear()


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


manager = _Manager()

#: Decorator for hook implementations in plugins.
hookimpl = hookspecs.hookimpl


#: Packages that provide backends for well-known schemes (for "not installed" errors).
KNOWN_BACKEND_PACKAGES = {
    "s3": "ckpt-backend-s3",
    "s3a": "ckpt-backend-s3",
    "gs": "ckpt-backend-gcs",
    "gcs": "ckpt-backend-gcs",
    "az": "ckpt-backend-azure",
    "abfs": "ckpt-backend-azure",
}


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
