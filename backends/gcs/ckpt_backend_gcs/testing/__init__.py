"""Test servers for the GCS backend's tests (not for production use).

- :class:`FakeGCS`: starts fake-gcs-server (a GCS JSON API emulator) on 127.0.0.1.
- :class:`StorageControlTestServer`: this project's own TEST SERVER of the Storage Control
  gRPC API (hierarchical-namespace folders and RenameFolder) on top of fake-gcs-server.
"""

from ckpt_backend_gcs.testing.fake_gcs import FakeGCS
from ckpt_backend_gcs.testing.storage_control_server import StorageControlTestServer

__all__ = ["FakeGCS", "StorageControlTestServer"]
