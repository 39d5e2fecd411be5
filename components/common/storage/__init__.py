"""One storage facade for every URI a step touches: local paths, ``file://`` and ``gs://``.

Every step reads and writes through these functions, so no step knows where it runs.

The package: this facade parses and validates every URI (one place for URI rules) and dispatches by scheme to
a backend, ``local.py`` (local paths and file://) or ``gcs.py`` (gs://, google-cloud-storage). Both satisfy
the ``Backend`` protocol of ``backend.py``; ``errors.py`` holds the errors. Backends import only those two,
never this facade.

Interface (kept stable; backends may grow):
- ``is_remote(uri)``, ``join(uri, *parts)``, ``to_local_path(uri)`` (local/file:// only)
- ``read_bytes/read_text/write_bytes/write_text(uri)``; ``exists(uri)``; ``list_files(prefix_uri)``;
  ``delete(uri)`` (a file/object, or a folder and everything under it)
- ``write_if_absent(uri, data) -> bool``: create-only write (GCS generation precondition 0 /
  ``link()`` locally). The primitive behind "manifest written last" and registry version allocation.
  Exactly one of several racing writers gets ``True``, also when a lost response makes the client retry.
- ``upload_dir(local_dir, uri)``, ``download_dir(uri, local_dir)``: parallel tree copies (the GCS transfer
  manager with threads); every file is checked, retried, or reported: none is dropped silently.
- ``download_files(uris, local_dir)``: a list of files into ``local_dir``, named relative to their common
  parent folder (parallel and checked per file on gs://, like ``download_dir``).
- ``local_input(uri)``: context manager giving a local folder/file for a URI (downloaded if remote).
- ``local_output(uri)``: context manager giving a local folder whose contents are published to ``uri`` on
  clean exit, the completion markers (``manifest.json``) last and create-only. Nothing is published and
  nothing is marked complete if the body raises.

Errors: a bad URI, a missing bucket, missing permissions or credentials, and transfers that still fail after
retrying raise :class:`StorageError` with a message naming the URI and the fix (a missing bucket:
:class:`BucketNotFoundError`, a subclass). So do local writes the disk refuses (read-only, no permission, no
space left, over quota: ``errors.local_storage_error``), including those of ``local_output``'s body into its
folder (pyarrow's full-disk error names no file; the staging folder and the output are named for it). A
missing file/object raises ``FileNotFoundError`` (``artifacts.read_manifest`` turns that into
``IncompleteArtifactError``). Step CLIs print a StorageError as one line and exit 2 (``common.cli.run_main``).

Retries (gs://): every facade call is one operation (``local_output``'s publish, files and markers, is one
too), and all its requests share one deadline, ``VLMTUNE_GCS_RETRY_DEADLINE_S`` (300): counted from the
operation's start and renewed by each request that succeeds, so a dead endpoint fails an operation of any
number of files once, after the deadline, with an error naming the deadline, the operation, the URI and the
variable. Each request is retried with exponential backoff on 408/429/5xx and connection errors
(google-cloud-storage's ``DEFAULT_RETRY`` predicate) while time is left, and waits at most what is left.
Tunable by environment, read at call time: ``VLMTUNE_GCS_RETRY_INITIAL_S`` (1.0), ``VLMTUNE_GCS_RETRY_MAX_S``
(32), ``VLMTUNE_GCS_RETRY_DEADLINE_S`` (300), ``VLMTUNE_GCS_TIMEOUT_S`` (60, the most one request waits),
``VLMTUNE_GCS_MAX_WORKERS`` (8 parallel transfers), ``VLMTUNE_GCS_SLICED_MIN_BYTES`` (256 MiB: objects this big
download as parallel byte ranges) and ``VLMTUNE_GCS_SLICE_BYTES`` (32 MiB). Uploads of big files are one
resumable stream each (parallel across files): the XML multipart API that ``upload_chunks_concurrently`` needs
is missing from fake-gcs-server.

Why local_output stages locally too: a crashed writer must leave nothing a reader would take, on every
backend. The body writes into a hidden sibling folder (``.NAME.partial-*``, same filesystem; for gs:// in the
temp folder, named after the URI); on success its files are renamed into place (cheap, no copy) and the
markers are linked in last. On a crash the staging folder is the only trace, and the target carries no
marker; a writer killed outright (SIGKILL) cannot remove it, so the next writer of the same output does,
judging by a lock the dead writer no longer holds (``staging.py``); a live writer's folder is never touched.
"""
from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import tempfile
from pathlib import Path
from typing import Iterator

from components.common.storage.backend import Backend, Location
from components.common.storage.errors import BucketNotFoundError, StorageError, free_space, local_storage_error
from components.common.storage.gcs import GcsBackend
from components.common.storage.local import LocalBackend

__all__ = [
    "BucketNotFoundError", "FILE_SCHEME", "GCS_SCHEME", "MANIFEST", "StorageError", "delete", "download_dir",
    "download_files", "exists", "is_remote", "join", "list_files", "local_input", "local_output", "read_bytes",
    "read_text", "to_local_path", "upload_dir", "write_bytes", "write_if_absent", "write_text",
]

GCS_SCHEME = "gs://"
FILE_SCHEME = "file://"
MANIFEST = "manifest.json"

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# https://cloud.google.com/storage/docs/buckets#naming (dotted names up to 222 chars, each part <= 63)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]{1,220}[a-z0-9]$")

#: The backend of each scheme; local paths and file:// URIs are both "file".
_BACKENDS: dict[str, Backend] = {"gs": GcsBackend(), "file": LocalBackend()}


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


def _locate(uri: str | os.PathLike) -> tuple[str, Location]:
    """Validate ``uri`` and split it for its backend: ``(scheme, location)``, the scheme a key of _BACKENDS."""
    uri = str(uri)
    if is_remote(uri):
        bucket, name = _split_gcs(uri)
        return "gs", Location(uri, bucket, name)
    return "file", Location(uri, "", str(to_local_path(uri)))


def _resolve(uri: str | os.PathLike) -> tuple[Backend, Location]:
    scheme, loc = _locate(uri)
    return _BACKENDS[scheme], loc


# ------------------------------------------------------------------------------------------ read / write

def read_bytes(uri: str) -> bytes:
    backend, loc = _resolve(uri)
    return backend.read_bytes(loc)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write (or overwrite) a file/object atomically: a reader sees the old bytes or the new, never half."""
    backend, loc = _resolve(uri)
    backend.write_bytes(loc, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_if_absent(uri: str, data: bytes) -> bool:
    """Create ``uri`` with ``data`` only if it does not exist yet. Returns False if it already existed.

    Atomic and create-only on every backend: of several racing writers exactly one gets True, and the object
    holds that writer's bytes in full. On gs:// this is an upload with ``if_generation_match=0`` (simple or
    multipart: keep ``data`` under 8 MiB so no resumable upload is used; the emulator ignores preconditions on
    those); a retried request that meets its own earlier success is recognised as a win.
    """
    backend, loc = _resolve(uri)
    return backend.write_if_absent(loc, data)


def exists(uri: str) -> bool:
    """True for an existing file/object, or a folder (locally a directory; on gs:// any object under it)."""
    backend, loc = _resolve(uri)
    return backend.exists(loc)


def delete(uri: str) -> None:
    """Delete a file/object, or a folder and everything under it. Deleting what is not there is fine.

    On gs:// ``gs://b/run1`` deletes the object ``run1`` and objects under ``run1/``, never ``run10/...``.
    """
    backend, loc = _resolve(uri)
    backend.delete(loc)


def list_files(prefix_uri: str) -> list[str]:
    """All files under a folder URI, as full URIs (plain paths locally), sorted."""
    backend, loc = _resolve(prefix_uri)
    return backend.list_files(loc)


# ----------------------------------------------------------------------------------------------- trees

def upload_dir(local_dir: str | os.PathLike, uri: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Copy a local folder tree to ``uri``. Files named in ``exclude`` (relative paths) are skipped."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{str(local_dir)!r} is not a folder")
    backend, loc = _resolve(uri)
    backend.upload_dir(local_dir, loc, exclude)


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy the folder at ``uri`` into ``local_dir`` (created if needed). Returns ``local_dir``."""
    local_dir = Path(local_dir)
    backend, loc = _resolve(uri)
    backend.download_dir(loc, local_dir)
    return local_dir


def download_files(uris: list[str], local_dir: str | os.PathLike) -> list[Path]:
    """Copy files into ``local_dir``, each named by its path relative to the files' common parent folder.

    ``gs://b/ds/train/0.parquet`` and ``gs://b/ds/eval/0.parquet`` land as ``train/0.parquet`` and
    ``eval/0.parquet``; a single file lands as ``local_dir/NAME``; files of different buckets keep the bucket
    as their first folder. Returns the local paths in the order given (a file given twice is copied once).
    On gs:// the files download in parallel (the transfer manager), every file checked and transient failures
    retried, as in :func:`download_dir`; locally they are plain copies. All URIs must be on one backend (all
    gs://, or all local paths / file://). A missing file raises ``FileNotFoundError``, a folder
    :class:`StorageError`.
    """
    local_dir = Path(local_dir)
    located = [_locate(u) for u in uris]
    if not located:
        return []
    schemes = {scheme for scheme, _ in located}
    if len(schemes) > 1:
        remote = next(loc.uri for scheme, loc in located if scheme == "gs")
        local = next(loc.uri for scheme, loc in located if scheme != "gs")
        raise StorageError(
            f"download_files: the list mixes gs:// URIs and local paths (e.g. {remote!r} and {local!r}); "
            f"download each backend's files in a call of its own."
        )
    # Each file as a "/"-separated key whose folders are its parents: bucket/name on gs://, the absolute,
    # normalised path locally (so "a/../b" can never name a file outside local_dir).
    keys = [f"{loc.bucket}/{loc.path}" if loc.bucket else os.path.abspath(loc.path) for _, loc in located]
    common = posixpath.commonpath([posixpath.dirname(k) for k in keys])
    targets = [local_dir / k[len(common):].lstrip("/") for k in keys]
    pairs: dict[Path, Location] = {}
    for (_, loc), target in zip(located, targets):
        pairs.setdefault(target, loc)
    _BACKENDS[schemes.pop()].download_files([(loc, target) for target, loc in pairs.items()])
    return targets


@contextlib.contextmanager
def local_input(uri: str) -> Iterator[Path]:
    """A local path for an input URI: the path itself when local, else a temp download (file or folder).

    The temp copy is removed when the block ends.
    """
    backend, loc = _resolve(uri)
    with backend.local_input(loc) as path:
        yield path


def _check_markers(uri: str, last: tuple[str, ...]) -> tuple[str, ...]:
    markers = tuple(m.strip("/") for m in last)
    for m in markers:
        if not m or any(seg in ("", ".", "..") for seg in m.split("/")):
            raise StorageError(f"local_output({uri!r}): bad marker name {m!r} in last=")
    return markers


def _marker_conflict(uri: str, marker: str) -> str:
    return (
        f"{join(uri, marker)!r} appeared while local_output({uri!r}) was open: another writer is producing the same "
        f"artifact, or the body wrote the marker to the URI itself. Write {marker} into the local folder that "
        f"local_output yields (or after the with-block), and give concurrent runs distinct output URIs."
    )


def _refused_in_body(exc: OSError, shown: str, staging: Path, *, remote: bool) -> StorageError | None:
    """A StorageError for a write the disk refused in local_output's body (full, read-only; no permission
    inside the staging folder), naming the file, or the staging folder when the OSError names none."""
    inside = exc.filename is not None and Path(os.path.abspath(exc.filename)).is_relative_to(staging)
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and not inside:
        return None  # e.g. a permission error on something the body reads: not the output's storage
    fix = None
    if remote:
        fix = (f"{shown} is staged in the temp folder before it is uploaded: set TMPDIR to a folder on a disk "
               f"with room for the whole output, then re-run the step.")
    action = f"local_output({shown!r}): writing the output into its staging folder {str(staging)!r}"
    refused = local_storage_error(exc, action, exc.filename if exc.filename is not None else staging, fix=fix)
    if refused is not None and exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # The OSError names no file: the write may also have gone elsewhere; say what the temp folder has too.
        tmp = tempfile.gettempdir()
        refused = StorageError(f"{refused} (The error named no file; the temp folder {tmp!r} has {free_space(tmp)}.)")
    return refused


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
    backend, loc = _resolve(uri)
    marker_locs = [_resolve(join(uri, m))[1] for m in markers]
    # Locally the conflict message names the folder on disk (file:// stripped), on gs:// the URI as given.
    shown = uri if is_remote(uri) else loc.path
    with backend.staging(loc, markers) as staging:
        try:
            yield staging
        except OSError as e:  # the body's own writes into the folder: a full or read-only disk is ours to explain
            refused = _refused_in_body(e, shown, staging, remote=is_remote(uri))
            if refused is None:
                raise
            raise refused from e
        with backend.operation("publish", loc):  # the files and the markers: one deadline
            backend.publish(staging, loc, markers)
            for m, marker_loc in zip(markers, marker_locs):  # last, create-only
                src = staging / m
                if src.is_file() and not backend.write_if_absent(marker_loc, src.read_bytes()):
                    raise StorageError(_marker_conflict(shown, m))
