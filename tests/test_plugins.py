"""Plugin registry: built-ins via the same hooks, third-party plugins, broken plugins."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import pytest

import ckpt
from ckpt import _sync
from ckpt.plugins import manager
from ckpt_backend_local import LocalBackend


def test_builtins_are_registered_through_hooks() -> None:
    manager.registry()  # plugins load on first use
    names = {manager.pm.get_name(p) for p in manager.pm.get_plugins()}
    assert {"ckpt_backend_local", "ckpt_strategies.rename", "ckpt_strategies.commit_file"} <= names
    assert set(ckpt.list_strategies()) >= {"rename", "commit_file"}
    assert ckpt.list_backends()["file"] is LocalBackend


class _MemoryishBackend(LocalBackend):
    scheme = "testfs"

    def path(self, location: Any) -> Any:
        return super().path(location)


class _Plugin:
    @ckpt.hookimpl
    def register_backends(self, register: Any) -> None:
        register(_MemoryishBackend)

    @ckpt.hookimpl
    def register_strategies(self, register: Any) -> None:
        register("rename_again", ckpt.get_strategy("rename"))


def test_third_party_plugin_registers_backend_and_strategy() -> None:
    plugin = _Plugin()
    manager.register(plugin, "test-plugin")
    try:
        assert "testfs" in ckpt.list_backends()
        assert "rename_again" in ckpt.list_strategies()
    finally:
        manager.unregister(plugin)
    assert "testfs" not in ckpt.list_backends()


class _BrokenHook:
    @ckpt.hookimpl
    def register_strategies(self, register: Any) -> None:
        raise RuntimeError("boom")


def test_failing_plugin_is_reported_and_does_not_break_others() -> None:
    plugin = _BrokenHook()
    manager.register(plugin, "broken-plugin")
    try:
        registry = manager.registry()
        assert any(f.name == "broken-plugin" and "boom" in f.error for f in registry.failures)
        assert "rename" in ckpt.list_strategies()
    finally:
        manager.unregister(plugin)


def test_plugin_that_fails_to_import_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bad = importlib.metadata.EntryPoint(name="badplugin", value="no_such_module_xyz", group="ckpt")
    real = importlib.metadata.entry_points

    def fake_entry_points(**kwargs: Any) -> Any:
        if kwargs.get("group") == "ckpt":
            return [*real(**kwargs), bad]
        return real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    fresh = type(manager)()
    registry = fresh.registry()
    assert any(
        f.name.startswith("badplugin") and "no_such_module_xyz" in f.error
        for f in registry.failures
    )
    assert "file" in registry.backends


def test_missing_backend_names_the_package_to_install() -> None:
    with pytest.raises(ckpt.BackendNotInstalledError) as info:
        ckpt.get_backend("az://container/x")
    assert "pip install ckpt-backend-azure" in str(info.value)
    assert "az://container/x" in str(info.value)
    with pytest.raises(ckpt.BackendNotInstalledError, match="ckpt backend plugin"):
        ckpt.get_backend("weird://x/y")


def test_backend_capabilities() -> None:
    caps = ckpt.get_backend("/tmp").capabilities
    assert caps.atomic_dir_rename and caps.conditional_put and caps.symlinks
    assert "durable_fsync" in caps.names()
    with pytest.raises(ValueError):
        caps.has("teleport")


def test_backend_instances_are_cached(tmp_path: Path) -> None:
    assert ckpt.get_backend(tmp_path) is ckpt.get_backend(tmp_path / "x")
    assert _sync.run(ckpt.get_backend(tmp_path).exists(ckpt.registry.to_path(tmp_path)))
