"""Rename a directory without ever replacing an existing destination; swap two directories.

POSIX ``rename`` silently replaces an *empty* destination directory, so two writers could
both "commit" one step. Linux has ``renameat2(RENAME_NOREPLACE)``; where the kernel or the
filesystem lacks it, fall back to a check plus ``rename`` (documented race window).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2():  # type: ignore[no-untyped-def]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; raise ``FileExistsError`` if ``dst`` exists."""
    if _renameat2 is not None:
        result = _renameat2(
            _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE
        )
        if result == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src)
    # Fallback: not atomic against a concurrent creator of dst (see docs/layout.md).
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def exchange(a: str, b: str) -> None:
    """Swap the names of ``a`` and ``b`` atomically (``renameat2(RENAME_EXCHANGE)``).

    Raises ``NotImplementedError`` where the kernel or the filesystem cannot."""
    if _renameat2 is None:
        raise NotImplementedError("renameat2 is not available on this system.")
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise NotImplementedError(f"RENAME_EXCHANGE is not supported here: {os.strerror(err)}")
    raise OSError(err, os.strerror(err), a)
