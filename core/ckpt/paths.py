"""Turning user input (str, os.PathLike, URL, UPath) into path objects.

Every path ckpt is given goes through :func:`to_path`, which refuses what it cannot use as
written instead of guessing (see :class:`ckpt.errors.InvalidPathError`):

- a URL of a storage scheme without ``//`` (``s3:/bucket/run``, ``gs:bucket/run``), which
  would otherwise be a local directory named ``s3:``;
- ``.`` or ``..`` segments, or empty segments (``a//b``), inside a URL: object stores take
  them literally while tensorstore normalises them, so one checkpoint would be split over
  two prefixes;
- an empty path, or one holding a NUL character.

Schemes are case-insensitive (``S3://b/x`` is ``s3://b/x``); a scheme that no installed
backend serves raises :class:`ckpt.errors.BackendNotInstalledError`. Local paths are made
absolute (``..`` resolved, ``~`` expanded) so that names and parents behave predictably.
"""

from __future__ import annotations

import os
import re
from typing import Any

from upath import UPath

from ckpt.errors import InvalidPathError

__all__ = ["split_scheme", "to_path"]

#: Scheme names of the local filesystem.
LOCAL_SCHEMES = frozenset({"", "file", "local", "posix"})

# RFC 3986 scheme; two characters at least, so that a Windows drive ("C:") is not one.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]+):(.*)", re.DOTALL)


def split_scheme(text: str) -> tuple[str, str] | None:
    """``(lower-case scheme, rest after the colon)`` of a URL-like string, or None."""
    match = _SCHEME.fullmatch(text)
    if match is None:
        return None
    return match.group(1).lower(), match.group(2)


def _known_schemes() -> set[str]:
    """Schemes that name a storage backend: installed ones and well-known ones."""
    from ckpt.plugins import KNOWN_BACKEND_PACKAGES, manager

    return set(manager.registry().backends) | set(KNOWN_BACKEND_PACKAGES) | set(LOCAL_SCHEMES)


def _check_url(url: str, scheme: str, original: Any) -> None:
    """Refuse ``.``, ``..`` and empty segments in the path part of ``url``."""
    rest = url.split("://", 1)[1]
    netloc, _, key = rest.partition("/")
    if not netloc:
        raise InvalidPathError(
            f"Path {original!s} names no bucket or host: expected {scheme}://BUCKET/PATH."
        )
    segments = key.rstrip("/").split("/") if key.strip("/") else []
    bad = [s for s in segments if s in (".", "..", "")]
    if bad:
        fixed = _normalised(segments)
        suggestion = f"{scheme}://{netloc}/{'/'.join(fixed)}".rstrip("/")
        shown = ", ".join(sorted({"empty ('//')" if b == "" else repr(b) for b in bad}))
        raise InvalidPathError(
            f"Path {original!s} ({scheme} backend) holds {shown} segment(s). Object "
            "stores keep such segments literally while tensorstore normalises them, so the "
            f"checkpoint would be split over two prefixes. Write the path without them, "
            f"e.g. {suggestion}."
        )


def _normalised(segments: list[str]) -> list[str]:
    out: list[str] = []
    for s in segments:
        if s in ("", "."):
            continue
        if s == "..":
            if out:
                out.pop()
            continue
        out.append(s)
    return out


def to_path(location: Any) -> UPath:
    """A pathlib-like path for a str, ``os.PathLike``, URL string or ``UPath``.

    Local paths are made absolute so that names and parents behave predictably.

    Raises:
        InvalidPathError: the path cannot be used as written (see the module docstring);
            the message says how to write it.
        BackendNotInstalledError: no installed backend (nor upath) knows the URL's scheme.
    """
    if isinstance(location, UPath):
        protocol = location.protocol
        if isinstance(protocol, tuple):
            protocol = protocol[0]
        if protocol not in LOCAL_SCHEMES:
            _check_url(str(location), str(protocol), location)
        return location
    if location is None:
        raise InvalidPathError("A checkpoint path is required, got None.")
    try:
        text = os.fspath(location)
    except TypeError:
        raise InvalidPathError(
            f"A checkpoint path must be a str, os.PathLike or UPath, got "
            f"{type(location).__qualname__} {location!r}."
        ) from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise InvalidPathError(f"A checkpoint path is required, got {text!r}.")
    if "\x00" in text:
        raise InvalidPathError(f"Path {text!r} holds a NUL character.")
    parts = split_scheme(text)
    if parts is not None:
        scheme, rest = parts
        if scheme in LOCAL_SCHEMES:
            if rest.startswith("//"):
                host, slash, local = rest[2:].partition("/")
                if host not in ("", "localhost"):
                    raise InvalidPathError(
                        f"Path {text!r} names the host {host!r}: a file URL names a local "
                        "path (file:///PATH); mount remote storage, or use its backend's URL."
                    )
                return UPath(os.path.abspath(os.path.expanduser(slash + local)))
            if rest.startswith("/"):  # RFC 8089's file:/PATH
                return UPath(os.path.abspath(rest))
            raise InvalidPathError(
                f"Path {text!r} is a relative {scheme}: URL; write file:///ABSOLUTE/PATH or "
                "a plain path."
            )
        if rest.startswith("//"):
            url = f"{scheme}://{rest[2:]}"
            _check_url(url, scheme, text)
            try:
                return UPath(url)
            except ValueError as exc:  # upath: "Unsupported filesystem"
                from ckpt.plugins import backend_not_installed

                raise backend_not_installed(scheme, text) from exc
        if scheme in _known_schemes():
            fixed = f"{scheme}://{rest.lstrip('/')}"
            raise InvalidPathError(
                f"Path {text!r} looks like a {scheme} URL without '//': did you mean "
                f"{fixed!r}? (As written it would be a local directory named "
                f"'{text.split('/', 1)[0]}'; for that, write ./{text}.)"
            )
    return UPath(os.path.abspath(os.path.expanduser(text)))
