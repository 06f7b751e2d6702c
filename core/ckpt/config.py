"""Configuration: the ``atomicity`` key and per-backend options.

Precedence for ``atomicity`` (highest first): the ``atomicity=`` argument, the
``CKPT_ATOMICITY`` environment variable, a config file, the backend's default (``auto``).
In a config file a per-backend value (``[backends.<scheme>]``) beats the global one.

``verify_checksums`` (bool, default false): restores check the CRC32C of every file they
read against the checkpoint's integrity manifest. Precedence: the ``verify_checksums=``
argument, ``CKPT_VERIFY_CHECKSUMS`` (``1``/``true``/``0``/``false``), ``[backends.<scheme>]``,
the top level of the config file.

Config files follow ruff's convention: ``CKPT_CONFIG`` names a file; otherwise
``./ckpt.toml`` (top-level keys) or ``[tool.ckpt]`` in ``./pyproject.toml``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AUTO", "Config", "load_config"]

AUTO = "auto"
ENV_ATOMICITY = "CKPT_ATOMICITY"
ENV_CONFIG = "CKPT_CONFIG"
ENV_VERIFY_CHECKSUMS = "CKPT_VERIFY_CHECKSUMS"
#: Keys of a ``[backends.<scheme>]`` table that configure ckpt itself, not the backend.
CORE_KEYS = ("atomicity", "verify_checksums")


@dataclass(frozen=True)
class Config:
    """Parsed configuration (global keys and per-backend tables)."""

    values: dict[str, Any] = field(default_factory=dict)
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str | None = None

    def _tables(self, schemes: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
        return [(sc, self.backends[sc]) for sc in dict.fromkeys(schemes) if sc in self.backends]

    def backend_options(self, *schemes: str) -> dict[str, Any]:
        """Options of ``[backends.<scheme>]`` other than ``atomicity``. With several names
        of one backend (``gs``, ``gcs``), the tables are merged, the first name winning."""
        merged: dict[str, Any] = {}
        for _, table in reversed(self._tables(schemes)):
            merged.update(table)
        for key in CORE_KEYS:
            merged.pop(key, None)
        return merged

    def value(self, key: str, *schemes: str) -> tuple[Any, str]:
        """``(value, where)`` of ``key``: a backend table first, then the top level;
        ``(None, "")`` if unset."""
        for scheme, table in self._tables(schemes):
            if key in table:
                return table[key], f"{self.source} [backends.{scheme}]"
        if key in self.values:
            return self.values[key], f"{self.source}"
        return None, ""

    def atomicity(self, *schemes: str) -> tuple[str | None, str]:
        """``(value, where it came from)`` of the config-file atomicity for a backend known
        by ``schemes`` (the URL's scheme first)."""
        for scheme, table in self._tables(schemes):
            if "atomicity" in table:
                return _as_name(
                    table["atomicity"], self.source
                ), f"{self.source} [backends.{scheme}]"
        if "atomicity" in self.values:
            return _as_name(self.values["atomicity"], self.source), f"{self.source}"
        return None, ""


def _as_name(value: Any, source: str | None) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"Invalid 'atomicity' in {source}: expected a strategy name, got {value!r}."
        )
    return value


def _parse(path: Path, *, pyproject: bool) -> Config:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"Malformed ckpt config file {path}: {exc}") from exc
    if pyproject:
        data = data.get("tool", {}).get("ckpt", {})
    if not isinstance(data, dict):
        raise ValueError(f"Malformed ckpt config in {path}: expected a table.")
    backends = data.get("backends", {})
    if not isinstance(backends, dict) or not all(isinstance(v, dict) for v in backends.values()):
        raise ValueError(
            f"Malformed ckpt config in {path}: 'backends' must hold one table per scheme, "
            "e.g. [backends.s3]."
        )
    values = {k: v for k, v in data.items() if k != "backends"}
    where = f"{path}" + (" [tool.ckpt]" if pyproject else "")
    return Config(values=values, backends={k: dict(v) for k, v in backends.items()}, source=where)


def load_config(cwd: str | os.PathLike[str] | None = None) -> Config:
    """Find and parse the configuration file that applies in ``cwd`` (default: the CWD)."""
    explicit = os.environ.get(ENV_CONFIG)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_CONFIG}={explicit} does not name a file.")
        return _parse(path, pyproject=path.name == "pyproject.toml")
    base = Path(cwd) if cwd is not None else Path.cwd()
    ckpt_toml = base / "ckpt.toml"
    if ckpt_toml.is_file():
        return _parse(ckpt_toml, pyproject=False)
    pyproject = base / "pyproject.toml"
    if pyproject.is_file():
        config = _parse(pyproject, pyproject=True)
        if config.values or config.backends:
            return config
    return Config()


def resolve_atomicity(
    scheme: str | tuple[str, ...], atomicity: str | None = None, config: Config | None = None
) -> tuple[str, str]:
    """``(name, source)`` of the atomicity setting for ``scheme`` (may be ``auto``)."""
    if atomicity is not None:
        return atomicity, "atomicity= argument"
    env = os.environ.get(ENV_ATOMICITY)
    if env:
        return env, f"${ENV_ATOMICITY}"
    config = config if config is not None else load_config()
    schemes = (scheme,) if isinstance(scheme, str) else scheme
    value, where = config.atomicity(*schemes)
    if value is not None:
        return value, where
    return AUTO, "default"


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _as_bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"Invalid {key!r} in {where}: expected true or false, got {value!r}.")


def resolve_verify_checksums(
    schemes: tuple[str, ...], verify_checksums: bool | None = None, config: Config | None = None
) -> bool:
    """Whether restores check CRC32C (see the module docstring for the precedence)."""
    if verify_checksums is not None:
        return bool(verify_checksums)
    env = os.environ.get(ENV_VERIFY_CHECKSUMS)
    if env:
        return _as_bool(env, "verify_checksums", f"${ENV_VERIFY_CHECKSUMS}")
    config = config if config is not None else load_config()
    value, where = config.value("verify_checksums", *schemes)
    return False if value is None else _as_bool(value, "verify_checksums", where)
