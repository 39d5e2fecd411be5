"""The errors storage raises, apart from the facade so that the backends can raise them without importing it.

:func:`local_storage_error` turns the OSErrors that mean "this local storage cannot take the write" (read-only,
no permission, full, over quota) into a :class:`StorageError` naming the path, what failed and the fix, so a
step's CLI prints one line and exits 2 (``common.cli.run_main``) instead of a traceback; the full-disk error of
a plain ``write()`` carries no file name at all, so the caller's path is named instead.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report to the user."""


class BucketNotFoundError(StorageError):
    """The gs:// bucket a URI names does not exist (or the account cannot see it)."""


#: The OSErrors that mean the storage itself refuses the write, and what each means in words.
STORAGE_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what a failed write can still be asked about)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path``: the longest one in /proc/self/mountinfo that holds
    it (bind mounts of one device included, which ``os.path.ismount`` does not see), else by device numbers."""
    path = Path(os.path.realpath(_existing(path)))
    try:
        points = [Path(line.split()[4].encode().decode("unicode_escape"))
                  for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except (OSError, IndexError, UnicodeDecodeError):
        points = []
    held = [m for m in points if path == m or path.is_relative_to(m)]
    if held:
        return max(held, key=lambda m: len(m.parts))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def free_space(path: str | os.PathLike) -> str:
    """"X free of Y on the file system mounted at M", for the file system holding ``path``."""
    where = _existing(Path(path))
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return f"free space unknown at {str(where)!r}"
    return f"{_size(usage.free)} free of {_size(usage.total)} on the file system mounted at {str(_mount_point(where))!r}"


def _needed(size: int | None) -> str:
    return f"writing {_size(size)}; " if size is not None else ""


def local_storage_error(exc: OSError, action: str, path: str | os.PathLike, *, fix: str | None = None,
                        size: int | None = None) -> StorageError | None:
    """A StorageError for ``exc`` if it means the storage refused the write (see STORAGE_ERRNOS), else None.

    ``action`` says what was being done ("write '/out/a.bin'"); ``path`` is the file or folder it was done to,
    named always (a full disk fails ``write()`` with no file name at all), with the OSError's own file name
    beside it when that differs (a temp sibling, the source of a copy). ``fix`` replaces the usual advice
    (e.g. "set TMPDIR" for a temp folder); ``size`` is how many bytes were being written, when known.
    """
    what = STORAGE_ERRNOS.get(exc.errno) if isinstance(exc, OSError) else None
    if what is None:
        return None
    where = str(path)
    failing = next((str(f) for f in (exc.filename, exc.filename2) if f is not None and str(f) != where), None)
    at = f" (the failing call was on {failing!r})" if failing else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        detail = f"{what} on the device holding {where!r} ({_needed(size)}{free_space(where)}){at}"
        fix = fix or "Free space there, or write the output to a bigger volume (or a gs:// URI), then re-run the step."
    elif exc.errno == errno.EROFS:
        detail = f"{where!r} is on a {what} (mounted at {str(_mount_point(Path(where)))!r}){at}"
        fix = fix or ("Mount that volume read-write, or write the output to a writable location (or a gs:// URI), "
                      "then re-run the step.")
    else:
        uid = os.geteuid() if hasattr(os, "geteuid") else "?"
        folder = _existing(Path(where))
        detail = f"{what} on {where!r}{at} (running as uid {uid})"
        fix = fix or (f"Give that user write access to {str(folder)!r} (on Kubernetes: the volume's owner or the "
                      f"pod's fsGroup), or write the output to a location it can write, then re-run the step.")
    return StorageError(f"{action}: {detail}. {fix}")
