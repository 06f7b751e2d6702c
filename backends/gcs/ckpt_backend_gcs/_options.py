"""The ``[backends.gs]`` options of the GCS backend, checked once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ckpt.config import positive_seconds
from ckpt.errors import ConfigError

__all__ = ["LAYOUTS", "GCSOptions"]

#: Values of the ``layout`` option.
LAYOUTS = ("auto", "flat", "hns")

_KEYS = {
    "endpoint_url": "URL of the GCS JSON API (an emulator); default: STORAGE_EMULATOR_HOST, "
    "else Google's",
    "project": "Google Cloud project id (optional)",
    "token": "credentials as gcsfs takes them: 'anon', 'google_default', 'cloud', a path "
    "to a service account JSON file, ...",
    "storage_control_endpoint": "host:port of the Storage Control gRPC API; "
    "'http://host:port' for a plaintext test server",
    "rename_timeout_s": "seconds to wait for a RenameFolder operation (default 120)",
    "rpc_timeout_s": "seconds for one Storage Control call (default 60)",
    "connect_timeout_s": "seconds to open a connection to the JSON API (default 30)",
    "read_timeout_s": "seconds without a byte of a JSON API answer before the attempt is "
    "given up and retried (default 60)",
    "layout": "'auto' (detect per bucket, the default), 'flat' or 'hns'",
}


def _emulator_host() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


@dataclasses.dataclass(frozen=True)
class GCSOptions:
    endpoint_url: str | None = None
    project: str | None = None
    token: Any = None
    storage_control_endpoint: str | None = None
    rename_timeout_s: float = 120.0
    rpc_timeout_s: float = 60.0
    #: JSON API requests (gcsfs): a connection not open after ``connect_timeout_s``, or an
    #: answer silent for ``read_timeout_s`` (a hanging request), is given up and retried.
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 60.0
    layout: str = "auto"
    #: True when the JSON API endpoint is not Google's (an emulator).
    emulator: bool = False

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> GCSOptions:
        unknown = sorted(set(options) - set(_KEYS))
        if unknown:
            known = "; ".join(f"{k}: {v}" for k, v in _KEYS.items())
            raise ConfigError(
                f"Unknown option(s) {', '.join(map(repr, unknown))} in the ckpt GCS backend "
                f"configuration ([backends.gs]). Known options: {known}."
            )
        endpoint = options.get("endpoint_url") or _emulator_host()
        if endpoint is not None and not isinstance(endpoint, str):
            raise ConfigError(f"[backends.gs] endpoint_url must be a string, got {endpoint!r}.")
        endpoint = endpoint.rstrip("/") if endpoint else None
        control = options.get("storage_control_endpoint")
        if control is not None and not isinstance(control, str):
            raise ConfigError(
                f"[backends.gs] storage_control_endpoint must be a string, got {control!r}."
            )
        layout = options.get("layout", "auto")
        if layout not in LAYOUTS:
            raise ConfigError(
                f"[backends.gs] layout must be one of {', '.join(LAYOUTS)}, got {layout!r}."
            )
        timeouts = {}
        for key in ("rename_timeout_s", "rpc_timeout_s", "connect_timeout_s", "read_timeout_s"):
            if key in options:
                timeouts[key] = positive_seconds(options[key], f"[backends.gs] {key}")
        emulator = endpoint is not None and not _is_google(endpoint)
        token = options.get("token")
        if token is None and emulator:
            token = "anon"  # emulators take no credentials; never probe the metadata server
        return cls(
            endpoint_url=endpoint,
            project=options.get("project"),
            token=token,
            storage_control_endpoint=control or None,
            layout=layout,
            emulator=emulator,
            **timeouts,
        )


def _is_google(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return host.endswith(".googleapis.com")
