"""The S3 backend passes ckpt's shared conformance suite, on moto and on SeaweedFS."""

from __future__ import annotations

from typing import Any

import pytest

from ckpt_conformance import BackendConformance
from ckpt_conformance.suite import shipped_strategy_names


class TestS3Conformance(BackendConformance):
    fault_sample = 2  # faults at the first and the last call (see faults.py)
    # Shipped strategies only: the test-only third-party strategy of
    # tests/test_third_party_strategy.py runs on the local disk and the GCS HNS bucket.
    strategies = shipped_strategy_names()

    @pytest.fixture
    def ckpt_root(self, s3_root: str) -> str:
        return s3_root

    @pytest.fixture
    def ckpt_storage_options(self, s3_server: Any) -> dict[str, Any]:
        return {
            "endpoint_url": s3_server.endpoint,
            "skip_instance_cache": True,
            "use_listings_cache": False,
        }
