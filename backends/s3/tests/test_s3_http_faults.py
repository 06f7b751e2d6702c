"""Array I/O included: a save through a fault-injecting HTTP proxy in front of the S3 test
server fails its k-th request (``fail``: 503 without effect; ``reset``: connection dropped
without effect; ``after``: applied, then the connection dropped), for k spread over every
request of the save (``CKPT_FAULT_ALL_CALLS=1``: every k). After each fault: the step is
committed and restores exactly, or is invisible; the step before is intact; cleanup leaves
no temporaries; the next save works."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckpt
import ckpt.plugins


def _load_proxy_module() -> Any:
    path = Path(__file__).with_name("fault_proxy.py")
    spec = importlib.util.spec_from_file_location("ckpt_s3_fault_proxy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_proxy = _load_proxy_module()
MODES, FaultProxy = _proxy.MODES, _proxy.FaultProxy

STRATEGIES = ["rename", "commit_file"]
SAMPLE = 4  # values of k per mode in CI


def _tree(seed: int) -> dict[str, Any]:
    return {"w": np.full((64, 64), seed, np.float32), "b": np.arange(seed + 3)}


def _same(a: Any, b: Any) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def proxied_root(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, str]]:
    proxy = FaultProxy(s3_server.endpoint)
    config = tmp_path / "ckpt.toml"
    config.write_text(f'[backends.s3]\nendpoint_url = "{proxy.url}"\n', encoding="utf-8")
    monkeypatch.setenv("CKPT_CONFIG", str(config))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    ckpt.plugins.manager.reset_instances()
    yield proxy, f"s3://{s3_server.bucket}/http-faults-{uuid.uuid4().hex[:12]}"
    ckpt.plugins.manager.reset_instances()
    proxy.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_with_a_failed_request_at_every_point(
    proxied_root: tuple[Any, str], strategy: str, mode: str
) -> None:
    proxy, base = proxied_root
    backend = ckpt.get_backend(base).bind(ckpt.registry.to_path(base))
    if strategy not in ckpt.registry.supported_strategies(backend):
        pytest.skip(f"{backend.describe()} does not support {strategy!r}")
    plain = ckpt.Checkpointer(strategy, verify_checksums=True)
    plain.save(f"{base}/count/0", _tree(0))
    proxy.arm(0)
    ckpt.Checkpointer(strategy).save(f"{base}/count/1", _tree(1))
    n = proxy.count
    assert n > 5, f"only {n} requests"
    if os.environ.get("CKPT_FAULT_ALL_CALLS") == "1":
        ks = list(range(1, n + 1))
    else:
        ks = sorted({1 + round(i * (n - 1) / (SAMPLE - 1)) for i in range(SAMPLE)})
    for k in ks:
        root = f"{base}/k{k}"
        plain.save(f"{root}/0", _tree(0))
        proxy.arm(k, mode)
        saved = True
        try:
            ckpt.Checkpointer(strategy).save(f"{root}/1", _tree(1))
        except (OSError, RuntimeError, ValueError):
            saved = False
        proxy.arm(0)
        where = f"{mode} request {k} of {n} ({proxy.injected or 'none'}), saved={saved}"
        steps = ckpt.checkpoint_steps(root, atomicity=strategy)
        assert 0 in steps and _same(plain.restore(f"{root}/0"), _tree(0)), where
        if 1 in steps:
            assert _same(plain.restore(f"{root}/1"), _tree(1)), f"{where}: torn"
        else:
            assert not saved, f"{where}: reported success, not committed"
        ckpt.cleanup_temporary_paths(root, atomicity=strategy)
        assert ckpt.all_temporary_paths(root, atomicity=strategy) == [], where
        if 1 not in steps:
            plain.save(f"{root}/1", _tree(1))
        assert _same(plain.restore(f"{root}/1"), _tree(1)), f"{where}: next save"
