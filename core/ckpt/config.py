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

import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt.errors import ConfigError

__all__ = ["AUTO", "Config", "load_config"]

AUTO = "auto"
ENV_ATOMICITY = "CKPT_ATOMICITY"
ENV_CONFIG = "CKPT_CONFIG"
ENV_VERIFY_CHECKSUMS = "CKPT_VERIFY_CHECKSUMS"
#: Keys of a ``[backends.<scheme>]`` table that configure ckpt itself, not the backend.
CORE_KEYS = ("atomicity", "verify_checksums")
#: The keys a config file may hold at its top level (others are refused: a typo such as
#: ``atomicty`` must not be ignored silently).
KNOWN_KEYS = ("atomicity", "backends", "verify_checksums")


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


def positive_seconds(value: Any, what: str) -> float:
    """``value`` as a positive, finite number of seconds (int or float, not bool);
    ConfigError naming ``what`` (e.g. ``[backends.s3] read_timeout_s``) otherwise. Shared by
    the backends' timeout options."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"Invalid {what}: expected a positive number of seconds, got {value!r}.")
    return float(value)


def _as_name(value: Any, source: str | None) -> str:
    """A strategy name as written in ``source``: surrounding blanks are dropped and ``auto``
    is case-insensitive (other names are matched by :func:`ckpt.registry.get_strategy`)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"Invalid 'atomicity' in {source}: expected a strategy name (a non-empty string "
            f'such as "auto", "rename" or "commit_file"), got {value!r}.'
        )
    value = value.strip()
    return AUTO if value.lower() == AUTO else value


def _check_keys(data: dict[str, Any], where: str) -> None:
    unknown = sorted(k for k in data if k not in KNOWN_KEYS)
    if unknown:
        close = [m for k in unknown for m in difflib.get_close_matches(k, KNOWN_KEYS, n=1)]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"Unknown ckpt config key(s) in {where}: {', '.join(map(repr, unknown))}. Known "
            f"keys: {', '.join(KNOWN_KEYS)} (backend options go in [backends.<scheme>]).{hint}"
        )


def _parse(path: Path, *, pyproject: bool) -> Config:
    where = f"{path}" + (" [tool.ckpt]" if pyproject else "")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Malformed ckpt config file {path}: {exc}") from exc
    if pyproject:
        tool = data.get("tool", {})
        data = tool.get("ckpt", {}) if isinstance(tool, dict) else {}
    if not isinstance(data, dict):
        raise ConfigError(f"Malformed ckpt config in {where}: expected a table.")
    _check_keys(data, where)
    backends = data.get("backends", {})
    if not isinstance(backends, dict) or not all(isinstance(v, dict) for v in backends.values()):
        raise ConfigError(
            f"Malformed ckpt config in {where}: 'backends' must hold one table per scheme, "
            "e.g. [backends.s3]."
        )
    tables: dict[str, dict[str, Any]] = {}
    for scheme, table in backends.items():
        key = scheme.strip().lower()  # URL schemes are case-insensitive: [backends.S3]
        if key in tables:
            raise ConfigError(
                f"Malformed ckpt config in {where}: two tables for the scheme {key!r} "
                f"(names differ only in case or blanks); merge them."
            )
        tables[key] = dict(table)
    values = {k: v for k, v in data.items() if k != "backends"}
    return Config(values=values, backends=tables, source=where)


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
        return _as_name(atomicity, "the atomicity= argument"), "atomicity= argument"
    env = os.environ.get(ENV_ATOMICITY, "")
    if env.strip():  # set but empty counts as unset, as for most variables
        return _as_name(env, f"${ENV_ATOMICITY}"), f"${ENV_ATOMICITY}"
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
    raise ConfigError(f"Invalid {key!r} in {where}: expected true or false, got {value!r}.")


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
