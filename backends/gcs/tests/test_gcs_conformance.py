"""ckpt's shared backend conformance suite on a flat and on an HNS bucket.

The backend is reached through ckpt's registry (``ckpt.get_backend``), configured by the
``[backends.gs]`` table that the ``ckpt_config`` fixture writes; out-of-band checks use
plain gcsfs against fake-gcs-server.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from ckpt_conformance import BackendConformance
from ckpt_conformance.suite import shipped_strategy_names


class _GCSConformance(BackendConformance):
    fault_sample = 2  # faults at the first and the last call (see faults.py)

    bucket = ""

    @pytest.fixture
    def ckpt_root(self, ckpt_config: str) -> str:
        return f"gs://{self.bucket}/conformance-{uuid.uuid4().hex[:12]}"

    @pytest.fixture
    def ckpt_storage_options(self, fake_gcs: Any) -> dict[str, Any]:
        return {
            "endpoint_url": fake_gcs.url,
            "token": "anon",
            "project": "test",
            "use_listings_cache": False,
        }


class TestFlatBucketConformance(_GCSConformance):
    bucket = "ckpt-flat"
    # Shipped strategies only: a test-only third-party strategy (tests/
    # test_third_party_strategy.py) runs on the local disk and the HNS bucket.
    strategies = shipped_strategy_names()


class TestHNSBucketConformance(_GCSConformance):
    bucket = "ckpt-hns"
