"""One storage module for every URI a step touches: local paths, ``file://`` and ``gs://``.

Every step reads and writes through these functions, so no step knows where it runs.

Interface (kept stable; backends may grow):
- ``is_remote(uri)``, ``join(uri, *parts)``, ``to_local_path(uri)`` (local/file:// only)
- ``read_bytes/read_text/write_bytes/write_text(uri)``; ``exists(uri)``; ``list_files(prefix_uri)``;
  ``delete(uri)`` (a file/object, or a folder and everything under it)
- ``write_if_absent(uri, data) -> bool``: create-only write (GCS generation precondition 0 /
  ``link()`` locally). The primitive behind "manifest written last" and registry version allocation.
  Exactly one of several racing writers gets ``True``, also when a lost response makes the client retry.
- ``upload_dir(local_dir, uri)``, ``download_dir(uri, local_dir)``: parallel tree copies (the GCS transfer
  manager with threads); every file is checked, retried, or reported: none is dropped silently.
- ``local_input(uri)``: context manager giving a local folder/file for a URI (downloaded if remote).
- ``local_output(uri)``: context manager giving a local folder whose contents are published to ``uri`` on
  clean exit, the completion markers (``manifest.json``) last and create-only. Nothing is published and
  nothing is marked complete if the body raises.

Errors: a bad URI, a missing bucket, missing permissions or credentials, and transfers that still fail after
retrying raise :class:`StorageError` with a message naming the URI and the fix (a missing bucket:
:class:`BucketNotFoundError`, a subclass). A missing file/object raises
``FileNotFoundError`` (``artifacts.read_manifest`` turns that into ``IncompleteArtifactError``).

Retries (gs://): every request is retried with exponential backoff on 408/429/5xx and connection errors
(google-cloud-storage's ``DEFAULT_RETRY`` predicate). Tunable by environment, read at call time:
``VLMTUNE_GCS_RETRY_INITIAL_S`` (1.0), ``VLMTUNE_GCS_RETRY_MAX_S`` (32), ``VLMTUNE_GCS_RETRY_DEADLINE_S``
(300), ``VLMTUNE_GCS_TIMEOUT_S`` (60, per request), ``VLMTUNE_GCS_MAX_WORKERS`` (8 parallel transfers),
``VLMTUNE_GCS_SLICED_MIN_BYTES`` (256 MiB: objects this big download as parallel byte ranges) and
``VLMTUNE_GCS_SLICE_BYTES`` (32 MiB). Uploads of big files are one resumable stream each (parallel across
files): the XML multipart API that ``upload_chunks_concurrently`` needs is missing from fake-gcs-server.

Why local_output stages locally too: a crashed writer must leave nothing a reader would take, on every
backend. The body writes into a hidden sibling folder (``.NAME.partial-*``, same filesystem); on success its
files are renamed into place (cheap, no copy) and the markers are linked in last. On a crash the staging
folder is the only trace, and the target carries no marker.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator

GCS_SCHEME = "gs://"
FILE_SCHEME = "file://"
MANIFEST = "manifest.json"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# https://cloud.google.com/storage/docs/buckets#naming (dotted names up to 222 chars, each part <= 63)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{1,220}[a-z0-9]$")


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report to the user."""


class BucketNotFoundError(StorageError):
    """The gs:// bucket a URI names does not exist (or the account cannot see it)."""


# ----------------------------------------------------------------------------------------------- URIs

def _check_scheme(uri: str) -> None:
    m = _SCHEME_RE.match(uri)
    if not m:
        return
    scheme = m.group(1)
    if scheme in ("gs", "file"):
        return
    hint = " Did you mean gs://?" if scheme.lower() in ("gcs", "gc", "gs", "google") else ""
    raise StorageError(
        f"{uri!r}: unsupported URI scheme {scheme + '://'!r}. vlmtune reads and writes local paths, file:// and gs:// "
        f"URIs.{hint}"
    )


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def to_local_path(uri: str | os.PathLike) -> Path:
    uri = str(uri)
    if is_remote(uri):
        raise StorageError(f"{uri!r} is a gs:// URI, not a local path; use local_input()/local_output() for it.")
    _check_scheme(uri)
    if uri.startswith(FILE_SCHEME):
        rest = uri[len(FILE_SCHEME):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            raise StorageError(
                f"{uri!r}: a file:// URI must hold an absolute path (file:///abs/path); "
                f"for a relative path drop the file:// prefix."
            )
        uri = rest
    if not uri:
        raise StorageError("empty path/URI given where a local path or gs:// URI was expected")
    return Path(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        segments = [p.strip("/") for p in parts if p and p.strip("/")]
        return "/".join([uri.rstrip("/"), *segments])
    # Parts are relative on every backend: a leading "/" must not escape the folder (Path semantics would).
    return str(to_local_path(uri).joinpath(*[p.lstrip("/") for p in parts if p]))


def _split_gcs(uri: str) -> tuple[str, str]:
    uri = str(uri)
    if not is_remote(uri):
        raise StorageError(f"not a gs:// URI: {uri!r}")
    rest = uri[len(GCS_SCHEME):]
    bucket, _, name = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; expected gs://BUCKET/path (for example gs://my-bucket/data).")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise StorageError(
            f"{uri!r}: {bucket!r} is not a valid bucket name (3-63 characters of lowercase letters, digits, '-', '_' "
            f"and '.', starting and ending with a letter or digit). Fix the URI."
        )
    segments = name.split("/")
    if "" in segments[:-1] or any(seg in (".", "..") for seg in segments) or "\n" in name or "\r" in name:
        raise StorageError(
            f"{uri!r}: object path has an empty, '.' or '..' segment or a line break; GCS would store it literally. "
            f"Fix the URI."
        )
    return bucket, name


def _gcs():
    from components.common import gcs
    return gcs


# ------------------------------------------------------------------------------------------ read / write

def read_bytes(uri: str) -> bytes:
    if is_remote(uri):
        return _gcs().read_bytes(*_split_gcs(uri))
    path = to_local_path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri!r} does not exist") from e
    except IsADirectoryError as e:
        raise StorageError(f"{uri!r} is a folder, not a file") from e


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


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


def write_bytes(uri: str, data: bytes) -> None:
    """Write (or overwrite) a file/object atomically: a reader sees the old bytes or the new, never half."""
    if is_remote(uri):
        _gcs().write_bytes(*_split_gcs(uri), bytes(data))
        return
    path = to_local_path(uri)
    tmp = _write_tmp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` with ``data`` only if it does not exist yet. Returns False if it already existed.

    Atomic and create-only on every backend: of several racing writers exactly one gets True, and the object
    holds that writer's bytes in full. On gs:// this is an upload with ``if_generation_match=0`` (simple or
    multipart: keep ``data`` under 8 MiB so no resumable upload is used; the emulator ignores preconditions on
    those); a retried request that meets its own earlier success is recognised as a win.
    """
    if is_remote(uri):
        return _gcs().write_if_absent(*_split_gcs(uri), bytes(data))
    path = to_local_path(uri)
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


def exists(uri: str) -> bool:
    """True for an existing file/object, or a folder (locally a directory; on gs:// any object under it)."""
    if is_remote(uri):
        bucket, name = _split_gcs(uri)
        return _gcs().exists(bucket, name)
    return to_local_path(uri).exists()


def delete(uri: str) -> None:
    """Delete a file/object, or a folder and everything under it. Deleting what is not there is fine.

    On gs:// ``gs://b/run1`` deletes the object ``run1`` and objects under ``run1/``, never ``run10/...``.
    """
    if is_remote(uri):
        bucket, name = _split_gcs(uri)
        _gcs().delete(bucket, name)
        return
    path = to_local_path(uri)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def list_files(prefix_uri: str) -> list[str]:
    """All files under a folder URI, as full URIs (plain paths locally), sorted."""
    if is_remote(prefix_uri):
        bucket, name = _split_gcs(prefix_uri)
        prefix = name.rstrip("/") + "/" if name.strip("/") else ""
        return sorted(f"{GCS_SCHEME}{bucket}/{n}" for n in _gcs().list_names(bucket, prefix))
    root = to_local_path(prefix_uri)
    if not root.exists():
        return []
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------- trees

def _local_files(local_dir: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    excluded = {e.strip("/") for e in exclude}
    return sorted(
        p.relative_to(local_dir).as_posix()
        for p in local_dir.rglob("*")
        if p.is_file() and p.relative_to(local_dir).as_posix() not in excluded
    )


def upload_dir(local_dir: str | os.PathLike, uri: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Copy a local folder tree to ``uri``. Files named in ``exclude`` (relative paths) are skipped."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{str(local_dir)!r} is not a folder")
    if is_remote(uri):
        bucket, name = _split_gcs(uri)
        _gcs().upload_dir(local_dir, bucket, name, exclude=exclude)
        return
    dest = to_local_path(uri)
    if dest.resolve() == local_dir.resolve():
        return
    for rel in _local_files(local_dir, exclude):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local_dir / rel, target)


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy the folder at ``uri`` into ``local_dir`` (created if needed). Returns ``local_dir``."""
    local_dir = Path(local_dir)
    if is_remote(uri):
        bucket, name = _split_gcs(uri)
        _gcs().download_dir(bucket, name, local_dir)
        return local_dir
    src = to_local_path(uri)
    if not src.is_dir():
        raise FileNotFoundError(f"{uri!r} is not a folder")
    shutil.copytree(src, local_dir, dirs_exist_ok=True)
    return local_dir


@contextlib.contextmanager
def local_input(uri: str) -> Iterator[Path]:
    """A local path for an input URI: the path itself when local, else a temp download (file or folder).

    The temp copy is removed when the block ends.
    """
    if not is_remote(uri):
        path = to_local_path(uri)
        if not path.exists():
            raise FileNotFoundError(f"input {uri!r} does not exist")
        yield path
        return
    bucket, name = _split_gcs(uri)
    gcs = _gcs()
    with tempfile.TemporaryDirectory(prefix="vlmtune-in-") as tmp:
        if name and not name.endswith("/") and gcs.object_exists(bucket, name):
            target = Path(tmp) / Path(name).name
            gcs.download_file(bucket, name, target)
            yield target
        else:
            prefix = name.rstrip("/") + "/" if name.strip("/") else ""
            if not gcs.list_names(bucket, prefix, max_results=1):
                raise FileNotFoundError(f"input {uri!r} does not exist (no object and no objects under it)")
            yield download_dir(uri, Path(tmp) / "data")


def _check_markers(uri: str, last: tuple[str, ...]) -> tuple[str, ...]:
    markers = tuple(m.strip("/") for m in last)
    for m in markers:
        if not m or any(seg in ("", ".", "..") for seg in m.split("/")):
            raise StorageError(f"local_output({uri!r}): bad marker name {m!r} in last=")
    return markers


def _publish_local(staging: Path, dest: Path, markers: tuple[str, ...]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for d in sorted(p for p in staging.rglob("*") if p.is_dir()):
        (dest / d.relative_to(staging)).mkdir(parents=True, exist_ok=True)
    for rel in _local_files(staging, markers):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging / rel, target)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copy2(staging / rel, target)
    for m in markers:  # last, create-only
        src = staging / m
        if src.is_file() and not write_if_absent(str(dest / m), src.read_bytes()):
            raise StorageError(_marker_conflict(str(dest), m))


def _marker_conflict(uri: str, marker: str) -> str:
    return (
        f"{join(uri, marker)!r} appeared while local_output({uri!r}) was open: another writer is producing the same "
        f"artifact, or the body wrote the marker to the URI itself. Write {marker} into the local folder that "
        f"local_output yields (or after the with-block), and give concurrent runs distinct output URIs."
    )


@contextlib.contextmanager
def local_output(uri: str, *, last: tuple[str, ...] = (MANIFEST,)) -> Iterator[Path]:
    """A local folder whose contents end up at ``uri`` when the body finishes without error.

    - On entry, completion markers already at ``uri`` (files named in ``last``, e.g. a previous run's
      ``manifest.json``) are deleted, so old markers never vouch for new, half-written files.
    - The body writes into a fresh local folder (locally: a hidden sibling of ``uri`` on the same filesystem;
      for gs://: a temp folder). ``uri`` is not touched while the body runs.
    - On clean exit, everything except the markers is published (renamed into place / uploaded in parallel
      with retries), then the markers, create-only (``write_if_absent``). A marker that appeared meanwhile
      raises :class:`StorageError` rather than being overwritten.
    - If the body raises, or publishing fails, no marker is written and the staging folder is removed.

    Write the manifest into the yielded folder (``artifacts.write_manifest(folder, ...)``) as the body's last
    act, or call ``artifacts.write_manifest(uri, ...)`` after the with-block.
    """
    uri = str(uri)
    markers = _check_markers(uri, last)
    if is_remote(uri):
        _split_gcs(uri)
        for m in markers:  # fails fast on a missing bucket or missing permissions, before any work
            _gcs().delete_object(*_split_gcs(join(uri, m)))
        with tempfile.TemporaryDirectory(prefix="vlmtune-out-") as tmp:
            yield Path(tmp)
            upload_dir(tmp, uri, exclude=markers)
            for m in markers:
                src = Path(tmp) / m
                if src.is_file() and not write_if_absent(join(uri, m), src.read_bytes()):
                    raise StorageError(_marker_conflict(uri, m))
        return
    dest = to_local_path(uri)
    if dest.exists() and not dest.is_dir():
        raise StorageError(f"local_output({uri!r}): the path exists and is a file, not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for m in markers:
        (dest / m).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name or 'out'}.partial-", dir=dest.parent))
    try:
        yield staging
        _publish_local(staging, dest, markers)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
