"""Storage errors as the standard Python exceptions users already catch.

ckpt's own storage calls raise ``OSError`` subclasses already; tensorstore's array I/O
raises ``ValueError`` with an absl status (``RESOURCE_EXHAUSTED: ... No space left on
device [os_error_code='28']``). :func:`translate` turns both into an ``OSError`` of the
class Python picks for the errno (``PermissionError``, ``FileNotFoundError``, plain
``OSError`` for ``ENOSPC``/``EROFS``), with ``errno``, ``strerror`` and ``filename`` set and
a message that names the path, the backend and what to do.
"""

from __future__ import annotations

import errno as errno_lib
import os
import re
from typing import Any

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)'?")
_STATUS = re.compile(
    r"(?:^|: )(PERMISSION_DENIED|UNAUTHENTICATED|NOT_FOUND|RESOURCE_EXHAUSTED|"
    r"FAILED_PRECONDITION|UNKNOWN|INTERNAL|UNAVAILABLE|ABORTED|DEADLINE_EXCEEDED):"
)
_LOCAL_FILE = re.compile(r'local file "([^"]+)"')
#: absl status codes that mean one errno whatever the store.
_STATUS_ERRNO = {
    "PERMISSION_DENIED": errno_lib.EACCES,
    "UNAUTHENTICATED": errno_lib.EACCES,
    "NOT_FOUND": errno_lib.ENOENT,
}
#: The errnos translated (others pass through unchanged).
_HINTS = {
    errno_lib.ENOSPC: "free space on the store (or save elsewhere)",
    errno_lib.EDQUOT: "raise the disk quota or free space (or save elsewhere)",
    errno_lib.EACCES: "check the permissions of the directory, or the credentials",
    errno_lib.EPERM: "check the permissions of the directory, or the credentials",
    errno_lib.EROFS: "the file system is mounted read-only: save to a writable location",
    errno_lib.ENOENT: "check the path",
    errno_lib.ENOTDIR: "a file is in the way where a directory is needed: check the path",
}


def _errno_of(exc: BaseException) -> tuple[int, str | None] | None:
    """The errno (and file name, if known) an exception stands for, or None."""
    if isinstance(exc, FileExistsError):
        return None  # commit conflicts and existing destinations keep their own types
    if isinstance(exc, OSError):
        if exc.errno in _HINTS:
            filename = exc.filename if isinstance(exc.filename, str) else None
            return exc.errno, filename
        return None
    if not isinstance(exc, ValueError):
        return None
    text = str(exc)
    status = _STATUS.search(text)
    if status is None:
        return None
    local = _LOCAL_FILE.search(text)
    filename = local.group(1) if local else None
    code = _OS_ERROR_CODE.search(text)
    if code is not None and int(code.group(1)) in _HINTS:
        return int(code.group(1)), filename
    if status.group(1) in _STATUS_ERRNO:
        return _STATUS_ERRNO[status.group(1)], filename
    return None


def translate(exc: BaseException, *, action: str, path: Any, backend: Any) -> BaseException:
    """``exc`` as a standard ``OSError`` whose message names ``path``, the backend and the
    fix (the original is its ``__cause__``); ``exc`` itself if it is no storage error or
    already translated. ``action`` is e.g. ``"Saving"`` or ``"Restoring"``."""
    if getattr(exc, "_ckpt_translated", False):
        return exc
    found = _errno_of(exc)
    if found is None:
        return exc
    code, filename = found
    strerror = os.strerror(code)
    # A backend's own message (e.g. which bucket is missing, which credentials to set)
    # says more than the errno's name: keep it.
    own = exc.strerror if isinstance(exc, OSError) and isinstance(exc.strerror, str) else None
    if own and own.strip() and own != strerror:
        strerror = f"{strerror}: {own}"
    describe = backend.describe() if hasattr(backend, "describe") else str(backend)
    where = filename or str(path)
    # OSError's str() ends with ``: '<filename>'``: the path that failed is named there,
    # once; the checkpoint's path only if it is another one.
    subject = action if where == str(path) else f"{action} {path}"
    message = f"{subject} failed on the {describe} backend; {_HINTS[code]}. {strerror}"
    new = OSError(code, message, where)
    new._ckpt_translated = True  # type: ignore[attr-defined]
    new.__cause__ = exc
    for note in getattr(exc, "__notes__", ()):
        new.add_note(note)
    return new
