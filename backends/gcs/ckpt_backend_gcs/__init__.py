"""ckpt backend for Google Cloud Storage (``gs://``, ``gcs://``): flat buckets commit with a
conditional marker (``ifGenerationMatch=0``), hierarchical-namespace buckets with an atomic
``RenameFolder``. See docs/backends/gcs.md."""

from __future__ import annotations

from typing import Any

import ckpt
from ckpt_backend_gcs._options import GCSOptions
from ckpt_backend_gcs.backend import (
    FLAT_CAPABILITIES,
    HNS_CAPABILITIES,
    GCSBackend,
    GCSBucketBackend,
    Layout,
    split_path,
)

__all__ = [
    "FLAT_CAPABILITIES",
    "HNS_CAPABILITIES",
    "GCSBackend",
    "GCSBucketBackend",
    "GCSOptions",
    "Layout",
    "register_backends",
    "split_path",
]

__version__ = "0.1.0"


@ckpt.hookimpl
def register_backends(register: Any) -> None:
    register(GCSBackend, schemes=("gs", "gcs"))
