"""The staging folders of ``local_output``, and removing those a dead writer left behind.

A writer stages an output ``NAME`` in a fresh folder ``.NAME.partial-TOKEN`` (next to the output locally; in
the temp folder, named after the URI, for gs://). A writer killed by SIGKILL (pre-emption, OOM) cannot remove
it, so the next writer of the same output does, on entry, but only folders whose writer is dead:

- Each writer holds an exclusive ``flock`` on a sibling lock file ``.NAME.partial-TOKEN.lock`` for as long as
  its folder lives. The kernel drops the lock when the process dies, however it dies, so "the lock can be
  taken" means "the writer is dead": no pid or host name is guessed (they mislead across containers that
  share a volume, pid namespaces and pid reuse). The file holds ``host pid`` for people reading the folder.
- The lock file is created under a claiming name (``.lock-claim``), locked, then renamed to ``.lock``, and the
  folder is made after that; a writer removes its folder first and its lock file last, still holding the
  lock. So a ``.lock`` name only ever exists locked by a live writer or left by a dead one.
- A cleaner takes a lock without waiting; a held lock means a live writer (left alone). Where the filesystem
  cannot lock (some FUSE mounts), nothing is removed: a folder of unknown liveness is never deleted. A lone
  ``.lock-claim`` (a writer killed between creating and renaming it) is removed once a minute old.
- Staging folders without a lock file (made before this scheme) are left alone.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

LOCK = ".lock"
CLAIM = ".lock-claim"
#: How old an unlocked claiming file must be before it is taken for a dead writer's (a live one locks it
#: microseconds after creating it).
CLAIM_GRACE_S = 60.0

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so nothing is ever judged dead
    fcntl = None  # type: ignore[assignment]


def _prefix(name: str, hidden: bool) -> str:
    return f"{'.' if hidden else ''}{name}.partial-"


def _pattern(name: str, hidden: bool) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(_prefix(name, hidden))}([0-9a-f]{{12}})({re.escape(LOCK)}|{re.escape(CLAIM)})?$")


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive lock of ``path``, or None if it is held, gone or cannot be locked here."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:  # still the file of that name (no rival cleaner)
            return fd
    except OSError:  # held (EWOULDBLOCK), no locks on this filesystem, or removed meanwhile
        pass
    os.close(fd)
    return None


def remove_dead(parent: Path, name: str, *, hidden: bool = True) -> list[Path]:
    """Remove the staging folders of output ``name`` in ``parent`` whose writer is dead; returns them."""
    pattern = _pattern(name, hidden)
    found: dict[str, set[str]] = {}
    try:
        entries = list(os.scandir(parent))
    except OSError:  # no such folder yet, or not readable: nothing to judge
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m:
            found.setdefault(m.group(1), set()).add(m.group(2) or "")
    removed = []
    for token, kinds in sorted(found.items()):
        folder = parent / f"{_prefix(name, hidden)}{token}"
        if LOCK in kinds:
            lock = folder.with_name(folder.name + LOCK)
        elif CLAIM in kinds:
            lock = folder.with_name(folder.name + CLAIM)
            with contextlib.suppress(OSError):
                if time.time() - lock.stat().st_mtime < CLAIM_GRACE_S:
                    continue
        else:
            continue  # a folder without a lock file: whose it is cannot be told
        fd = _try_lock(lock)
        if fd is None:
            continue  # a live writer (or a filesystem without locks): leave it
        try:
            try:
                writer = lock.read_text().strip() or "unknown writer"
            except OSError:
                writer = "unknown writer"
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists():
                log.warning("could not remove %s, the staging folder of a dead writer (%s)", folder, writer)
                continue
            lock.unlink(missing_ok=True)
            removed.append(folder)
            log.info("removed %s: the staging folder of a writer that died (%s)", folder, writer)
        finally:
            os.close(fd)
    return removed


def _hold(folder: Path) -> int:
    """Create and lock ``folder``'s lock file (see the module docstring); the fd keeps the lock."""
    claim = folder.with_name(folder.name + CLAIM)
    fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a cleaner that looked at it meanwhile
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.debug("no file locks at %s (%s): its staging folders are never judged dead", claim, e)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.rename(claim, folder.with_name(folder.name + LOCK))
    except BaseException:
        os.close(fd)
        claim.unlink(missing_ok=True)
        raise
    return fd


@contextlib.contextmanager
def staging_folder(parent: Path, name: str, *, hidden: bool = True) -> Iterator[Path]:
    """A fresh, empty folder ``parent/.NAME.partial-TOKEN`` held by this writer until the block ends, then
    removed with its lock file. On entry, the staging folders of ``name`` left by dead writers are removed."""
    remove_dead(parent, name, hidden=hidden)
    folder = parent / f"{_prefix(name, hidden)}{secrets.token_hex(6)}"
    lock = folder.with_name(folder.name + LOCK)
    fd = _hold(folder)
    try:
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not folder.exists():  # else keep the lock file: once we are gone, the next writer retries the removal
            lock.unlink(missing_ok=True)  # still locked: no cleaner can take it for a dead writer's
        os.close(fd)
