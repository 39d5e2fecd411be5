"""Local-filesystem backend of :mod:`components.common.storage` (plain paths and ``file://`` URIs).

Use it through ``storage``, which resolves each URI to a filesystem path first (:class:`Location`.path).

- Writes go to a temp sibling (pid + thread + random in its name) and are renamed into place, so a reader sees
  the old bytes or the new, never half.
- Create-only writes link the fully written temp file to the target (``os.link`` fails if it exists), or,
  on filesystems without hard links (some FUSE mounts), open it with ``O_EXCL``.
- ``local_output`` stages in a hidden sibling folder (``.NAME.partial-*``) on the same filesystem, so
  publishing is renames, not copies, and a crash leaves only that folder behind.
- Writes that the storage refuses (read-only, no permission, no space left, over quota) raise
  :class:`StorageError` naming the path, what failed and the fix (:func:`errors.local_storage_error`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Iterator

from components.common.storage.backend import Location
from components.common.storage.errors import StorageError, local_storage_error
from components.common.storage.staging import staging_folder


@contextlib.contextmanager
def _refused(action: str, path: str | os.PathLike, size: int | None = None) -> Iterator[None]:
    """Turn an OSError meaning "the storage refuses this write" into a StorageError naming ``path``."""
    try:
        yield
    except OSError as e:
        err = local_storage_error(e, action, path, size=size)
        if err is None:
            raise
        raise err from e


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _copy(src: str, dst: str) -> str:
    """shutil.copy2, with refused writes as StorageError (which copytree does not swallow into shutil.Error)."""
    with _refused(f"copy {src!r} to {dst!r}", dst, size=_file_size(src)):
        return shutil.copy2(src, dst)


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

    def operation(self, op: str, loc: Location) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # local calls do not retry: nothing to bound

    def read_bytes(self, loc: Location) -> bytes:
        try:
            return Path(loc.path).read_bytes()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{loc.uri!r} does not exist") from e
        except IsADirectoryError as e:
            raise StorageError(f"{loc.uri!r} is a folder, not a file") from e

    def write_bytes(self, loc: Location, data: bytes) -> None:
        path = Path(loc.path)
        with _refused(f"write {loc.uri!r}", path, size=len(data)):
            tmp = _write_tmp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def write_if_absent(self, loc: Location, data: bytes) -> bool:
        with _refused(f"create-only write {loc.uri!r}", loc.path, size=len(data)):
            return self._write_if_absent(Path(loc.path), data)

    @staticmethod
    def _write_if_absent(path: Path, data: bytes) -> bool:
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
        with _refused(f"delete {loc.uri!r}", path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def list_files(self, loc: Location) -> list[str]:
        # os.walk, not Path.rglob: rglob raises FileNotFoundError when a folder under the prefix is deleted while
        # it walks (a registration retracting its copy while another lists versions/), os.walk skips the folder.
        # A listing is a snapshot either way: what vanished mid-walk is simply not in it.
        files = []
        for folder, _, names in os.walk(loc.path):
            files.extend(os.path.join(folder, n) for n in names)
        return sorted(str(Path(f)) for f in files if os.path.isfile(f))

    def upload_dir(self, local_dir: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        dest = Path(loc.path)
        if dest.resolve() == local_dir.resolve():
            return
        for rel in _local_files(local_dir, exclude):
            target = dest / rel
            with _refused(f"upload_dir({str(local_dir)!r}, {loc.uri!r})", target):
                target.parent.mkdir(parents=True, exist_ok=True)
            _copy(str(local_dir / rel), str(target))

    def download_dir(self, loc: Location, local_dir: Path) -> None:
        src = Path(loc.path)
        if not src.is_dir():
            raise FileNotFoundError(f"{loc.uri!r} is not a folder")
        with _refused(f"download_dir({loc.uri!r}, {str(local_dir)!r})", local_dir):
            shutil.copytree(src, local_dir, dirs_exist_ok=True, copy_function=_copy)

    def download_files(self, pairs: list[tuple[Location, Path]]) -> None:
        for loc, target in pairs:
            src = Path(loc.path)
            if src.is_dir():
                raise StorageError(f"{loc.uri!r} is a folder, not a file")
            if not src.exists():
                raise FileNotFoundError(f"{loc.uri!r} does not exist")
            with _refused(f"download {loc.uri!r} to {str(target)!r}", target):
                target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and target.samefile(src):  # local_dir is the files' own folder
                continue
            _copy(str(src), str(target))

    @contextlib.contextmanager
    def local_input(self, loc: Location) -> Iterator[Path]:
        path = Path(loc.path)
        if not path.exists():
            raise FileNotFoundError(f"input {loc.uri!r} does not exist")
        yield path

    @contextlib.contextmanager
    def staging(self, loc: Location, stale: tuple[str, ...]) -> Iterator[Path]:
        """A hidden sibling ``.NAME.partial-TOKEN`` of the output (staging.py: the next writer removes it if
        this one is killed); first the stale markers go, and so do the staging folders of dead writers."""
        dest = Path(loc.path)
        if dest.exists() and not dest.is_dir():
            raise StorageError(f"local_output({loc.uri!r}): the path exists and is a file, not a folder")
        with _refused(f"local_output({loc.uri!r})", dest), contextlib.ExitStack() as stack:
            dest.parent.mkdir(parents=True, exist_ok=True)
            for m in stale:
                (dest / m).unlink(missing_ok=True)
            folder = stack.enter_context(staging_folder(dest.parent, dest.name or "out"))
            stack = stack.pop_all()  # keep the folder past this block: refused writes above, the body's below
        with stack:
            yield folder

    def publish(self, staging: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        """Rename the staged files into place (same filesystem: no copy); empty folders are recreated too."""
        dest = Path(loc.path)
        with _refused(f"publish local_output({loc.uri!r})", dest):
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
                    _copy(str(staging / rel), str(target))
