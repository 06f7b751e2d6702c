"""The S3 backend passes ckpt's shared conformance suite, on moto and on SeaweedFS."""

from __future__ import annotations

from typing import Any

import pytest

from ckpt_conformance import BackendConformance


class TestS3Conformance(BackendConformance):
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

    def test_names_that_escape_are_refused(self, root: str, raw: Any, s3_server: Any) -> None:
        if s3_server.name == "seaweedfs":
            # The suite's out-of-band check looks up the literal key `<root>/../escape`;
            # SeaweedFS answers any key with a `..` component with 400 Bad Request, so
            # raw s3fs raises instead of returning False. A suite issue (reported), not
            # the backend's: ckpt itself refuses such names before any request.
            pytest.xfail("suite probes a '..' key out of band; SeaweedFS rejects it (400)")
        super().test_names_that_escape_are_refused(root, raw)
