"""Step metadata: the ``_CHECKPOINT_METADATA`` JSON file of a checkpoint (Orbax keys)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from upath import UPath

from ckpt.backend import Backend
from ckpt.layout import METADATA_FILE

__all__ = ["MAX_METADATA_BYTES", "StepMetadata", "read_step_metadata", "write_step_metadata"]

#: Largest ``_CHECKPOINT_METADATA`` ckpt reads or writes (a larger file is refused with a
#: clear error instead of being parsed into memory).
MAX_METADATA_BYTES = 64 * 1024 * 1024

_KNOWN = (
    "item_handlers",
    "item_metadata",
    "metrics",
    "performance_metrics",
    "init_timestamp_nsecs",
    "commit_timestamp_nsecs",
    "custom_metadata",
)


@dataclasses.dataclass
class StepMetadata:
    """Contents of ``_CHECKPOINT_METADATA``. Unknown keys read from a file are folded into
    ``custom_metadata`` (as Orbax does)."""

    item_handlers: Any = None
    item_metadata: Any = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    performance_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_timestamp_nsecs: int | None = None
    commit_timestamp_nsecs: int | None = None
    custom_metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> bytes:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        try:
            out = json.dumps(data, sort_keys=True).encode()
        except TypeError as exc:
            raise ValueError(f"Checkpoint metadata must be JSON-serializable: {exc}") from exc
        except RecursionError:
            raise ValueError(
                "Checkpoint metadata is nested too deeply to store as JSON; flatten it."
            ) from None
        if len(out) > MAX_METADATA_BYTES:
            raise ValueError(
                f"Checkpoint metadata is {len(out)} bytes as JSON, more than the "
                f"{MAX_METADATA_BYTES} bytes ckpt stores in {METADATA_FILE}; store large data "
                "in the checkpoint's tree instead."
            )
        return out

    @classmethod
    def from_json(cls, data: bytes, where: object = "<bytes>") -> StepMetadata:
        if len(data) > MAX_METADATA_BYTES:
            raise ValueError(
                f"Malformed checkpoint metadata in {where}: {len(data)} bytes, more than the "
                f"{MAX_METADATA_BYTES} bytes of a {METADATA_FILE} ckpt reads."
            )
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"Malformed checkpoint metadata in {where}: {exc}") from exc
        except RecursionError:
            raise ValueError(
                f"Malformed checkpoint metadata in {where}: JSON nested too deeply to read."
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(f"Malformed checkpoint metadata in {where}: expected a JSON object.")
        known = {k: raw[k] for k in _KNOWN if k in raw}
        custom = known.get("custom_metadata")
        custom = {} if custom is None else custom
        if not isinstance(custom, dict):
            raise ValueError(f"Malformed checkpoint metadata in {where}: custom_metadata.")
        custom = dict(custom)
        for key, value in raw.items():
            if key not in _KNOWN:
                custom[key] = value
        for key in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
            value = known.get(key)
            if value is not None and not isinstance(value, int):
                raise ValueError(f"Malformed checkpoint metadata in {where}: {key}={value!r}.")
        for key in ("metrics", "performance_metrics"):
            if not isinstance(known.get(key) if known.get(key) is not None else {}, dict):
                raise ValueError(f"Malformed checkpoint metadata in {where}: {key}.")
        known["custom_metadata"] = custom
        known["metrics"] = known.get("metrics") or {}
        known["performance_metrics"] = known.get("performance_metrics") or {}
        return cls(**known)


async def read_step_metadata(backend: Backend, directory: UPath) -> StepMetadata | None:
    """The step metadata in ``directory``, or None if it has none."""
    path = directory / METADATA_FILE
    try:
        data = await backend.read_bytes(path)
    except FileNotFoundError:
        return None
    return StepMetadata.from_json(data, path)


async def write_step_metadata(backend: Backend, directory: UPath, metadata: StepMetadata) -> None:
    """Write ``metadata`` as ``directory``/``_CHECKPOINT_METADATA`` (JSON, replacing)."""
    await backend.write_bytes(directory / METADATA_FILE, metadata.to_json())
