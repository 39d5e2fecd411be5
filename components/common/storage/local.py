"""Local-filesystem backend of :mod:`components.common.storage` (plain paths and ``file://`` URIs).

Use it through ``storage``, which resolves each URI to a filesystem path first (:class:`Location`.path).

- Writes go to a temp sibling (pid + thread + random in its name) and are renamed into place, so a reader sees
  the old bytes or the new, never half.
- Create-only writes link the fully written temp file to the target (``os.link`` fails if it exists), or,
  on filesystems without hard links (some FUSE mounts), open it with ``O_EXCL``.
- ``local_output`` stages in a hidden sibling folder (``.NAME.partial-*``) on the same filesystem, so
  publishing is renames, not copies, and a crash leaves only that folder behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator

from components.common.storage.backend import Location
from components.common.storage.errors import StorageError


def _tmp_sibling(path: Path) -> Path:
    # pid + thread + random: concurrent writers (processes or threads) never share a temp file.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")


def _write_tmp(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _local_files(local_dir: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    excluded = {e.strip("/") for e in exclude}
    return sorted(
        p.relative_to(local_dir).as_posix()
        for p in local_dir.rglob("*")
        if p.is_file() and p.relative_to(local_dir).as_posix() not in excluded
    )


class LocalBackend:
    """The backend for local paths and ``file://`` URIs (see :class:`components.common.storage.backend.Backend`)."""

    def read_bytes(self, loc: Location) -> bytes:
        try:
            return Path(loc.path).read_bytes()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{loc.uri!r} does not exist") from e
        except IsADirectoryError as e:
            raise StorageError(f"{loc.uri!r} is a folder, not a file") from e

    def write_bytes(self, loc: Location, data: bytes) -> None:
        path = Path(loc.path)
        tmp = _write_tmp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_if_absent(self, loc: Location, data: bytes) -> bool:
        path = Path(loc.path)
        tmp = _write_tmp(path, data)
        try:
            os.link(tmp, path)  # atomic create-only with the full content: fails if path exists
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # Filesystems without hard links (some FUSE mounts): O_EXCL still gives create-only.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, loc: Location) -> bool:
        return Path(loc.path).exists()

    def delete(self, loc: Location) -> None:
        path = Path(loc.path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def list_files(self, loc: Location) -> list[str]:
        root = Path(loc.path)
        if not root.exists():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())

    def upload_dir(self, local_dir: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        dest = Path(loc.path)
        if dest.resolve() == local_dir.resolve():
            return
        for rel in _local_files(local_dir, exclude):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local_dir / rel, target)

    def download_dir(self, loc: Location, local_dir: Path) -> None:
        src = Path(loc.path)
        if not src.is_dir():
            raise FileNotFoundError(f"{loc.uri!r} is not a folder")
        shutil.copytree(src, local_dir, dirs_exist_ok=True)

    def download_files(self, pairs: list[tuple[Location, Path]]) -> None:
        for loc, target in pairs:
            src = Path(loc.path)
            if src.is_dir():
                raise StorageError(f"{loc.uri!r} is a folder, not a file")
            if not src.exists():
                raise FileNotFoundError(f"{loc.uri!r} does not exist")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and target.samefile(src):  # local_dir is the files' own folder
                continue
            shutil.copy2(src, target)

    @contextlib.contextmanager
    def local_input(self, loc: Location) -> Iterator[Path]:
        path = Path(loc.path)
        if not path.exists():
            raise FileNotFoundError(f"input {loc.uri!r} does not exist")
        yield path

    @contextlib.contextmanager
    def staging(self, loc: Location, stale: tuple[str, ...]) -> Iterator[Path]:
        dest = Path(loc.path)
        if dest.exists() and not dest.is_dir():
            raise StorageError(f"local_output({loc.uri!r}): the path exists and is a file, not a folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        for m in stale:
            (dest / m).unlink(missing_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name or 'out'}.partial-", dir=dest.parent))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, staging: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        """Rename the staged files into place (same filesystem: no copy); empty folders are recreated too."""
        dest = Path(loc.path)
        dest.mkdir(parents=True, exist_ok=True)
        for d in sorted(p for p in staging.rglob("*") if p.is_dir()):
            (dest / d.relative_to(staging)).mkdir(parents=True, exist_ok=True)
        for rel in _local_files(staging, exclude):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging / rel, target)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                shutil.copy2(staging / rel, target)
