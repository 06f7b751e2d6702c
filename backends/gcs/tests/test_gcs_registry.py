"""Registration, configuration, and which strategy ``auto`` resolves to on each layout."""

from __future__ import annotations

import logging

import pytest
from upath import UPath

import ckpt
import ckpt_backend_gcs
from ckpt import registry
from ckpt_backend_gcs import GCSBackend, GCSBucketBackend, GCSOptions, Layout

FLAT_URL = "gs://ckpt-flat/run/ckpts"
HNS_URL = "gs://ckpt-hns/run/ckpts"


def test_registered_through_the_entry_point() -> None:
    backends = ckpt.list_backends()
    assert backends["gs"] is GCSBackend and backends["gcs"] is GCSBackend
    assert GCSBackend.package == "ckpt-backend-gcs"
    assert ckpt_backend_gcs.register_backends  # the hookimpl the entry point loads


def test_get_backend_uses_the_config_table(ckpt_config, gcs_options) -> None:
    backend = ckpt.get_backend(FLAT_URL)
    assert isinstance(backend, GCSBackend)
    assert backend._opts.endpoint_url == gcs_options["endpoint_url"]
    assert backend._opts.storage_control_endpoint == gcs_options["storage_control_endpoint"]
    assert isinstance(ckpt.get_backend("gcs://ckpt-hns/x"), GCSBackend)


@pytest.mark.parametrize(("url", "strategy"), [(FLAT_URL, "commit_file"), (HNS_URL, "rename")])
def test_auto_resolves_per_layout(ckpt_config, url: str, strategy: str) -> None:
    view = ckpt.get_backend(url)
    if not isinstance(view, GCSBucketBackend):  # the core registry has no bind hook yet
        view = view.bind(url)
    resolution = registry.resolve(url, backend=view)
    assert resolution.name == strategy
    assert resolution.strategy is ckpt.get_strategy(strategy)
    assert "auto" in resolution.source


@pytest.mark.parametrize(("url", "strategy"), [(FLAT_URL, "commit_file"), (HNS_URL, "rename")])
def test_auto_resolves_per_layout_through_the_registry(ckpt_config, url, strategy) -> None:
    if not isinstance(ckpt.get_backend(url), GCSBucketBackend):
        pytest.skip("ckpt.registry.get_backend does not call Backend.bind(path) yet (core change)")
    assert registry.resolve(url).name == strategy
    assert ckpt.strategy_for(url) is ckpt.get_strategy(strategy)


def test_rename_refused_on_flat(ckpt_config, gcs_backend) -> None:
    flat = gcs_backend.bind(FLAT_URL)
    with pytest.raises(ckpt.UnsupportedStrategyError) as info:
        registry.resolve(FLAT_URL, "rename", backend=flat)
    message = str(info.value)
    assert "atomic_dir_rename" in message and "commit_file" in message
    assert "flat bucket 'ckpt-flat'" in message
    # and the explicit choices that do work
    assert registry.resolve(FLAT_URL, "commit_file", backend=flat).name == "commit_file"
    hns = gcs_backend.bind(HNS_URL)
    assert registry.resolve(HNS_URL, "commit_file", backend=hns).name == "commit_file"
    # (third-party strategies registered by other tests may be listed too)
    builtin = {"commit_file", "rename"}
    assert builtin & set(registry.supported_strategies(flat)) == {"commit_file"}
    assert builtin & set(registry.supported_strategies(hns)) == {"commit_file", "rename"}


def test_layout_detected_once_per_bucket(gcs_options, storage_control) -> None:
    backend = GCSBackend(gcs_options)
    try:
        before = storage_control.calls.count("GetStorageLayout")
        for _ in range(3):
            backend.bind("gs://ckpt-hns/a")
            backend.bind("gs://ckpt-flat/b")
        assert storage_control.calls.count("GetStorageLayout") == before + 2
        assert backend.layout_of("ckpt-hns") is Layout.HNS
        assert backend.layout_of("ckpt-flat") is Layout.FLAT
    finally:
        backend.close()


def test_bind_from_inside_a_coroutine(gcs_options, run) -> None:
    """Strategies may look a backend up inside a coroutine (on ckpt's I/O loop): binding an
    unseen bucket there must not dead-lock on that loop."""
    backend = GCSBackend(gcs_options)

    async def inside() -> GCSBucketBackend:
        return backend.bind("gs://ckpt-hns/x")

    try:
        assert run(inside()).layout is Layout.HNS
        assert run(backend.bind_async(UPath("gs://ckpt-flat/x"))).layout is Layout.FLAT
    finally:
        backend.close()


def test_missing_bucket_is_not_cached(gcs_options) -> None:
    backend = GCSBackend(gcs_options)
    try:
        view = backend.bind("gs://no-such-bucket/x")
        assert view.layout is Layout.FLAT and backend.layout_of("no-such-bucket") is None
    finally:
        backend.close()


def test_forced_layout_skips_detection(gcs_options, storage_control) -> None:
    backend = GCSBackend({**gcs_options, "layout": "flat"})
    try:
        before = storage_control.calls.count("GetStorageLayout")
        assert backend.bind("gs://ckpt-hns/x").layout is Layout.FLAT
        assert storage_control.calls.count("GetStorageLayout") == before
    finally:
        backend.close()


def test_emulator_without_storage_control_is_flat(fake_gcs, caplog) -> None:
    backend = GCSBackend({"endpoint_url": fake_gcs.url})
    try:
        with caplog.at_level(logging.INFO, logger="ckpt_backend_gcs"):
            assert backend.bind("gs://ckpt-hns/x").layout is Layout.FLAT
        assert "without a storage_control_endpoint" in caplog.text
    finally:
        backend.close()


def test_options(monkeypatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:1234")
    opts = GCSOptions.from_mapping({})
    assert opts.endpoint_url == "http://127.0.0.1:1234" and opts.emulator
    assert opts.token == "anon"  # an emulator never gets the default credential chain
    opts = GCSOptions.from_mapping({"endpoint_url": "http://h:1/", "token": "google_default"})
    assert (opts.endpoint_url, opts.token) == ("http://h:1", "google_default")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    opts = GCSOptions.from_mapping({"project": "p", "rename_timeout_s": 30})
    assert not opts.emulator and opts.endpoint_url is None and opts.token is None
    assert (opts.project, opts.rename_timeout_s, opts.layout) == ("p", 30.0, "auto")
    with pytest.raises(ValueError, match=r"Unknown option.*'endpoint'"):
        GCSOptions.from_mapping({"endpoint": "x"})
    with pytest.raises(ValueError, match="layout"):
        GCSOptions.from_mapping({"layout": "zonal"})
    with pytest.raises(ValueError, match="rename_timeout_s"):
        GCSOptions.from_mapping({"rename_timeout_s": 0})
    assert (opts.connect_timeout_s, opts.read_timeout_s) == (30.0, 60.0)
    opts = GCSOptions.from_mapping({"connect_timeout_s": 1, "read_timeout_s": 2.5})
    assert (opts.connect_timeout_s, opts.read_timeout_s) == (1.0, 2.5)
    for bad in (0, float("inf"), "10", True):
        with pytest.raises(ValueError, match="read_timeout_s"):
            GCSOptions.from_mapping({"read_timeout_s": bad})


def test_ckpt_backends_lists_both_bucket_layouts(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from ckpt.cli import app

    monkeypatch.setenv("COLUMNS", "250")
    result = CliRunner().invoke(app, ["backends"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "GCSBackend" in line]
    assert len(rows) == 2
    flat = next(r for r in rows if "flat bucket" in r)
    hns = next(r for r in rows if "HNS bucket" in r)
    assert "atomic_dir_rename" not in flat and flat.rstrip(" │").endswith("commit_file")
    assert "atomic_dir_rename" in hns and hns.rstrip(" │").endswith("rename")
