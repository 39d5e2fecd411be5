"""One storage module for every URI a step touches: local paths, ``file://`` and ``gs://``.

Every step reads and writes through these functions, so no step knows where it runs.

Interface (kept stable; backends may grow):
- ``is_remote(uri)``, ``join(uri, *parts)``, ``to_local_path(uri)`` (local/file:// only)
- ``read_bytes/read_text/write_bytes/write_text(uri)``; ``exists(uri)``; ``list_files(prefix_uri)``
- ``write_if_absent(uri, data) -> bool``: create-only write (GCS generation precondition 0 /
  O_EXCL locally). The primitive behind "manifest written last" and registry version allocation.
- ``upload_dir(local_dir, uri)``, ``download_dir(uri, local_dir)``: parallel tree copies.
- ``local_input(uri)``: context manager giving a local folder/file for a URI (downloaded if remote).
- ``local_output(uri)``: context manager giving a local folder that is uploaded to ``uri`` on clean exit
  (nothing uploaded if the body raises).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

GCS_SCHEME = "gs://"
FILE_SCHEME = "file://"


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report to the user."""


def is_remote(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def to_local_path(uri: str | os.PathLike) -> Path:
    uri = str(uri)
    if is_remote(uri):
        raise StorageError(f"{uri!r} is a gs:// URI, not a local path; use local_input()/local_output() for it.")
    if uri.startswith(FILE_SCHEME):
        uri = uri[len(FILE_SCHEME):]
    return Path(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(to_local_path(uri).joinpath(*parts))


def _split_gcs(uri: str) -> tuple[str, str]:
    if not is_remote(uri):
        raise StorageError(f"not a gs:// URI: {uri!r}")
    rest = uri[len(GCS_SCHEME):]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; expected gs://BUCKET/path")
    return bucket, name


def read_bytes(uri: str) -> bytes:
    if is_remote(uri):
        from components.common import gcs
        return gcs.read_bytes(*_split_gcs(uri))
    path = to_local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri!r} does not exist") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    if is_remote(uri):
        from components.common import gcs
        gcs.write_bytes(*_split_gcs(uri), data)
        return
    path = to_local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a sibling temp file and rename, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` with ``data`` only if it does not exist yet. Returns False if it already existed."""
    if is_remote(uri):
        from components.common import gcs
        return gcs.write_if_absent(*_split_gcs(uri), data)
    path = to_local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)  # atomic create-only: fails if path exists
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def exists(uri: str) -> bool:
    if is_remote(uri):
        from components.common import gcs
        return gcs.exists(*_split_gcs(uri))
    return to_local_path(uri).exists()


def delete(uri: str) -> None:
    if is_remote(uri):
        from components.common import gcs
        gcs.delete(*_split_gcs(uri))
        return
    path = to_local_path(uri)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def list_files(prefix_uri: str) -> list[str]:
    """All files under a folder URI, as full URIs, sorted."""
    if is_remote(prefix_uri):
        from components.common import gcs
        bucket, name = _split_gcs(prefix_uri)
        return sorted(f"{GCS_SCHEME}{bucket}/{n}" for n in gcs.list_names(bucket, name.rstrip("/") + "/" if name else ""))
    root = to_local_path(prefix_uri)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def upload_dir(local_dir: str | os.PathLike, uri: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Copy a local folder tree to ``uri``. Files named in ``exclude`` (relative paths) are skipped."""
    local_dir = Path(local_dir)
    if is_remote(uri):
        from components.common import gcs
        gcs.upload_dir(local_dir, *_split_gcs(uri), exclude=exclude)
        return
    dest = to_local_path(uri)
    if dest.resolve() == local_dir.resolve():
        return
    for src in sorted(local_dir.rglob("*")):
        rel = src.relative_to(local_dir).as_posix()
        if src.is_dir() or rel in exclude:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    local_dir = Path(local_dir)
    if is_remote(uri):
        from components.common import gcs
        gcs.download_dir(*_split_gcs(uri), local_dir)
        return local_dir
    src = to_local_path(uri)
    if not src.is_dir():
        raise FileNotFoundError(f"{uri!r} is not a folder")
    shutil.copytree(src, local_dir, dirs_exist_ok=True)
    return local_dir


@contextlib.contextmanager
def local_input(uri: str) -> Iterator[Path]:
    """A local path for an input URI: the path itself when local, else a temp download (file or folder)."""
    if not is_remote(uri):
        path = to_local_path(uri)
        if not path.exists():
            raise FileNotFoundError(f"input {uri!r} does not exist")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vlmtune-in-") as tmp:
        from components.common import gcs
        bucket, name = _split_gcs(uri)
        if gcs.exists(bucket, name):
            target = Path(tmp) / Path(name).name
            target.write_bytes(gcs.read_bytes(bucket, name))
            yield target
        else:
            files = list_files(uri)
            if not files:
                raise FileNotFoundError(f"input {uri!r} does not exist (no object and no objects under it)")
            yield download_dir(uri, Path(tmp) / "data")


@contextlib.contextmanager
def local_output(uri: str, *, last: tuple[str, ...] = ("manifest.json",)) -> Iterator[Path]:
    """A local folder whose contents end up at ``uri`` when the body finishes without error.

    Files named in ``last`` (the completion markers) are uploaded after everything else, so a reader that
    waits for the marker never sees a partial folder. Locally the folder is ``uri`` itself.
    """
    if not is_remote(uri):
        path = to_local_path(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vlmtune-out-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, uri, exclude=last)
        for name in last:
            src = Path(tmp) / name
            if src.exists():
                write_bytes(join(uri, name), src.read_bytes())
