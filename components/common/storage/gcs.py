"""google-cloud-storage backend for :mod:`components.common.storage` (gs:// URIs).

Use it through ``storage``: it validates every URI and calls :class:`GcsBackend`, whose methods unpack the
:class:`Location` into the ``(bucket, name)`` functions of this module.

- Credentials: ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server in tests) -> ``AnonymousCredentials`` against it;
  otherwise Application Default Credentials (the service account on Vertex/Kubeflow). One client per
  emulator host, cached: :func:`client` follows ``STORAGE_EMULATOR_HOST`` changes; ``client.cache_clear()``
  drops cached clients.
- Retries: every call passes :func:`retry_policy` (the library's ``DEFAULT_RETRY`` predicate: 408/429/5xx,
  connection resets, timeouts; exponential backoff with jitter, bounded by a deadline). Create-only uploads
  are retried too: they carry ``if_generation_match=0``, so a retry cannot overwrite, and a 412 after a lost
  response is resolved by a per-write token in the object's metadata. Plain overwrites (``write_bytes``,
  tree uploads) are retried unconditionally, as the library does for uploads by default: re-sending the same
  bytes is idempotent for a single writer; concurrent writers of one name should use ``write_if_absent``.
- Trees: :func:`upload_dir` / :func:`download_dir` use ``transfer_manager`` with thread workers. The transfer
  manager hands back one result per file and never retries a failed file as a whole; we check every
  result, re-run transient failures in rounds with backoff, and raise :class:`StorageError` naming the
  files that still failed. A file is never dropped silently (path-escaping names included). Big objects
  download as generation-pinned parallel byte ranges (``download_chunks_concurrently``), crc32c-checked.
- Checksums: downloads are md5/crc32c-checked by the library; a mismatch (``DataCorruption``) is not retried
  by the library, so we re-run it (single objects in :func:`_call`, trees in :func:`_run_rounds`).

It is one module, longer than most, on purpose: every function shares the client, the retry settings and the
error translation above, and splitting them would only spread one backend over several files.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import mimetypes
import os
import random
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from components.common.storage.backend import Location
from components.common.storage.errors import BucketNotFoundError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Custom-metadata key holding the random token of the write that created an object (see write_if_absent).
WRITER_TOKEN_KEY = "vlmtune-writer-token"
#: Uploads at most this big go as one multipart request (preconditions honoured everywhere, emulator too).
MULTIPART_LIMIT = 8 * 1024 * 1024
#: Rounds a tree transfer re-runs its transiently failed files (each file also retried per request).
TRANSFER_ROUNDS = 4


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise StorageError(f"{name}={raw!r} is not a number") from e


def retry_deadline_s() -> float:
    return _env_float("VLMTUNE_GCS_RETRY_DEADLINE_S", 300.0)


def retry_policy():
    """DEFAULT_RETRY's predicate with our backoff and deadline (read from the environment at call time)."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(
        initial=_env_float("VLMTUNE_GCS_RETRY_INITIAL_S", 1.0),
        maximum=_env_float("VLMTUNE_GCS_RETRY_MAX_S", 32.0),
        multiplier=2.0,
    ).with_timeout(retry_deadline_s())


def request_timeout() -> float:
    return _env_float("VLMTUNE_GCS_TIMEOUT_S", 60.0)


def max_workers() -> int:
    return max(1, int(_env_float("VLMTUNE_GCS_MAX_WORKERS", 8)))


# ---------------------------------------------------------------------------------------------- client

@functools.lru_cache(maxsize=8)
def _client_for(emulator_host: str | None, project: str | None):
    from google.cloud import storage

    if emulator_host:
        from google.auth.credentials import AnonymousCredentials
        return _size_pool(storage.Client(project=project or "test", credentials=AnonymousCredentials()))
    try:
        return _size_pool(storage.Client(project=project) if project else storage.Client())
    except Exception as e:  # google.auth.exceptions.DefaultCredentialsError and friends
        raise StorageError(
            f"cannot create a Google Cloud Storage client: {e}. On a workstation run "
            f"`gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS); on Vertex AI / "
            f"Kubeflow give the step's service account access to the bucket. For tests set STORAGE_EMULATOR_HOST."
        ) from e


def _size_pool(c):
    """One HTTP connection per parallel transfer: requests' default pool (10) would throw connections away."""
    try:
        from requests.adapters import HTTPAdapter

        size = max(10, max_workers() + 2)
        session = c._http
        for scheme in ("https://", "http://"):
            if type(session.adapters.get(scheme)) is HTTPAdapter:  # leave special adapters (mTLS) alone
                session.mount(scheme, HTTPAdapter(pool_connections=size, pool_maxsize=size))
    except Exception:  # private attribute: best effort only
        log.debug("could not resize the storage client's connection pool", exc_info=True)
    return c


def client():
    """The storage client for the current environment (emulator when ``STORAGE_EMULATOR_HOST`` is set)."""
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST") or None, os.environ.get("GOOGLE_CLOUD_PROJECT") or None)


client.cache_clear = _client_for.cache_clear  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- errors

def _uri(bucket: str, name: str = "") -> str:
    return f"gs://{bucket}/{name}" if name else f"gs://{bucket}"


def _bucket_missing_msg(bucket: str, uri: str) -> str:
    return (
        f"{uri}: bucket gs://{bucket} does not exist (or this account cannot see it). Create it (`gcloud storage "
        f"buckets create gs://{bucket}`, or `terraform apply` in infra/), or fix the bucket name in the URI."
    )


def _bucket_missing(bucket: str, exc: Exception) -> bool:
    """Tell "no such bucket" from "no such object" after a 404 on an object request."""
    if "bucket does not exist" in str(exc).lower():
        return True
    from google.api_core.exceptions import Forbidden, NotFound
    try:
        return not client().bucket(bucket).exists(retry=retry_policy(), timeout=request_timeout())
    except (Forbidden, NotFound):  # no storage.buckets.get permission: assume the bucket is there
        return False
    except Exception:
        return False


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request is worth repeating (429/5xx/timeouts/connection errors, corrupt download)."""
    from google.api_core.exceptions import RetryError
    from google.cloud.storage.exceptions import DataCorruption
    from google.cloud.storage.retry import _should_retry

    if isinstance(exc, (RetryError, DataCorruption)):
        return True
    try:
        return bool(_should_retry(exc))
    except Exception:
        return False


def _translate(exc: Exception, bucket: str, name: str, op: str) -> Exception:
    """Map a client exception to what storage's callers handle: FileNotFoundError or StorageError."""
    from google.api_core.exceptions import Forbidden, NotFound, RetryError, Unauthorized

    uri = _uri(bucket, name)
    if isinstance(exc, (StorageError, FileNotFoundError)):
        return exc
    if isinstance(exc, NotFound):
        if _bucket_missing(bucket, exc):
            return BucketNotFoundError(_bucket_missing_msg(bucket, uri))
        return FileNotFoundError(f"{uri} does not exist")
    if isinstance(exc, (Forbidden, Unauthorized)):
        return StorageError(
            f"{op} {uri}: permission denied ({exc.code}). Grant the account running this step "
            f"roles/storage.objectAdmin on gs://{bucket} (see infra/), or check the credentials in use."
        )
    if isinstance(exc, RetryError) or is_transient(exc):
        return StorageError(
            f"{op} {uri} still failed after retrying for up to {retry_deadline_s():.0f}s "
            f"(VLMTUNE_GCS_RETRY_DEADLINE_S): {exc}. The storage service or network is unavailable; re-run the step."
        )
    return StorageError(f"{op} {uri} failed: {type(exc).__name__}: {exc}")


def _call(op: str, bucket: str, name: str, fn: Callable[[], T]) -> T:
    """Run one request (the library retries it); re-run checksum failures, which the library does not retry;
    translate what still fails."""
    from google.cloud.storage.exceptions import DataCorruption

    for attempt in range(TRANSFER_ROUNDS):
        try:
            return fn()
        except DataCorruption as e:
            if attempt + 1 < TRANSFER_ROUNDS:
                log.warning("%s %s: checksum mismatch (%s); retrying", op, _uri(bucket, name), e)
                _sleep_backoff(attempt)
                continue
            raise StorageError(f"{op} {_uri(bucket, name)}: data corrupted in transit {TRANSFER_ROUNDS} times "
                               f"in a row: {e}") from e
        except Exception as e:
            translated = _translate(e, bucket, name, op)
            if translated is e:
                raise
            raise translated from e
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------- single objects

def _blob(bucket: str, name: str):
    blob = client().bucket(bucket).blob(name)
    blob.chunk_size = None  # multipart (one request) up to MULTIPART_LIMIT
    return blob


def _content_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def read_bytes(bucket: str, name: str) -> bytes:
    if not name or name.endswith("/"):
        raise StorageError(f"{_uri(bucket, name)} names a folder, not an object; give the object's full path")
    return _call("read", bucket, name, lambda: _blob(bucket, name).download_as_bytes(
        retry=retry_policy(), timeout=request_timeout()))


def download_file(bucket: str, name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _call("download", bucket, name, lambda: _blob(bucket, name).download_to_filename(
        str(target), retry=retry_policy(), timeout=request_timeout()))


def write_bytes(bucket: str, name: str, data: bytes) -> None:
    if not name or name.endswith("/"):
        raise StorageError(f"{_uri(bucket, name)} names a folder, not an object; give the object's full path")
    _call("write", bucket, name, lambda: _blob(bucket, name).upload_from_string(
        data, content_type=_content_type(name), retry=retry_policy(), timeout=request_timeout()))


def write_if_absent(bucket: str, name: str, data: bytes) -> bool:
    """Create-only upload (``if_generation_match=0``). True if this call created the object.

    Retried like any request. If a create succeeded but its response was lost, the retry gets 412: we then
    read the object's metadata, and the write token tells our own object from a rival's.
    """
    from google.api_core.exceptions import PreconditionFailed

    if not name or name.endswith("/"):
        raise StorageError(f"{_uri(bucket, name)} names a folder, not an object; give the object's full path")
    if len(data) > MULTIPART_LIMIT:
        log.warning("write_if_absent(%s): %d bytes goes as a resumable upload; fake-gcs-server ignores "
                    "preconditions on those (real GCS honours them)", _uri(bucket, name), len(data))
    token = uuid.uuid4().hex
    blob = _blob(bucket, name)
    blob.metadata = {WRITER_TOKEN_KEY: token}

    def create() -> bool:
        try:
            blob.upload_from_string(data, content_type=_content_type(name), if_generation_match=0,
                                    retry=retry_policy(), timeout=request_timeout())
            return True
        except PreconditionFailed:
            existing = client().bucket(bucket).get_blob(name, retry=retry_policy(), timeout=request_timeout())
            return existing is not None and (existing.metadata or {}).get(WRITER_TOKEN_KEY) == token

    return _call("create-only write", bucket, name, create)


def object_exists(bucket: str, name: str) -> bool:
    if not name or name.endswith("/"):
        return False

    def check() -> bool:
        from google.api_core.exceptions import NotFound
        try:
            if _blob(bucket, name).exists(retry=retry_policy(), timeout=request_timeout()):
                return True
        except NotFound:
            pass
        if _bucket_missing(bucket, Exception()):
            raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, name)))
        return False

    return _call("check", bucket, name, check)


def exists(bucket: str, name: str) -> bool:
    """An object named ``name``, or any object under ``name/`` (a "folder"; the whole bucket if name is empty)."""
    if object_exists(bucket, name):
        return True
    prefix = name.rstrip("/") + "/" if name.strip("/") else ""
    return bool(list_names(bucket, prefix, max_results=1))


def list_names(bucket: str, prefix: str, *, max_results: int | None = None) -> list[str]:
    """Object names under ``prefix`` (folder placeholder objects ending in '/' left out)."""
    from google.api_core.exceptions import NotFound

    def do() -> list[str]:
        try:
            blobs = client().list_blobs(bucket, prefix=prefix or None, max_results=max_results,
                                        retry=retry_policy(), timeout=request_timeout())
            return [b.name for b in blobs if not b.name.endswith("/")]
        except NotFound as e:  # listing an existing bucket never 404s
            raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, prefix))) from e

    return _call("list", bucket, prefix, do)


def delete_object(bucket: str, name: str) -> None:
    """Delete one object; absent is fine (also when a retried delete meets its own earlier success)."""
    from google.api_core.exceptions import NotFound

    def do() -> None:
        try:
            _blob(bucket, name).delete(retry=retry_policy(), timeout=request_timeout())
        except NotFound:
            if _bucket_missing(bucket, Exception()):
                raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, name)))

    _call("delete", bucket, name, do)


def delete(bucket: str, name: str) -> None:
    """Delete the object ``name`` and every object under ``name/`` (never ``name10/...``)."""
    if not name.strip("/"):
        raise StorageError(f"refusing to delete everything in gs://{bucket}: give a folder path under the bucket")
    names = list_names(bucket, name.rstrip("/") + "/")
    if not name.endswith("/"):
        names.append(name)
    with ThreadPoolExecutor(max_workers=max_workers()) as pool:
        list(pool.map(lambda n: delete_object(bucket, n), names))


# ----------------------------------------------------------------------------------------------- trees

def _sleep_backoff(round_no: int) -> None:
    initial = _env_float("VLMTUNE_GCS_RETRY_INITIAL_S", 1.0)
    cap = _env_float("VLMTUNE_GCS_RETRY_MAX_S", 32.0)
    time.sleep(random.uniform(0, min(cap, initial * (2 ** round_no))))


def _run_rounds(op: str, bucket: str, prefix: str, items: list[str], run: Callable[[list[str]], list], *,
                missing_raises: bool = False) -> None:
    """Run ``run(items)`` (one result per item: None, an Exception or a UserWarning), re-running transient
    failures in rounds; raise StorageError naming every file that still failed. Nothing is dropped.

    With ``missing_raises`` a missing object raises FileNotFoundError (the caller named the files itself),
    as a missing bucket always raises BucketNotFoundError."""
    pending = list(items)
    failures: dict[str, BaseException] = {}
    give_up_at = time.monotonic() + retry_deadline_s()
    for round_no in range(TRANSFER_ROUNDS):
        results = run(pending)
        if len(results) != len(pending):  # defensive: the transfer manager promises one result per item
            raise StorageError(f"{op} {_uri(bucket, prefix)}: transfer manager returned {len(results)} results "
                               f"for {len(pending)} files")
        failures = {}
        for item, result in zip(pending, results):
            if isinstance(result, BaseException):
                failures[item] = result
            elif isinstance(result, Warning):  # e.g. a name escaping the target folder: never skip silently
                raise StorageError(f"{op} {_uri(bucket, prefix)}: {item!r} was not transferred: {result}")
        if not failures:
            return
        permanent = {k: v for k, v in failures.items() if not is_transient(v)}
        if permanent:
            item, exc = next(iter(permanent.items()))
            translated = _translate(exc, bucket, f"{prefix.rstrip('/')}/{item}" if prefix else item, op)
            if isinstance(translated, BucketNotFoundError) or (
                    missing_raises and isinstance(translated, FileNotFoundError)):
                raise translated from exc
            raise StorageError(
                f"{op} {_uri(bucket, prefix)}: {len(permanent)} of {len(items)} files failed, e.g. {item!r}: "
                f"{translated}"
            ) from exc
        if time.monotonic() >= give_up_at:
            break
        log.warning("%s %s: %d of %d files failed transiently (round %d); retrying them", op,
                    _uri(bucket, prefix), len(failures), len(items), round_no + 1)
        pending = list(failures)
        _sleep_backoff(round_no)
    item, exc = next(iter(failures.items()))
    raise StorageError(
        f"{op} {_uri(bucket, prefix)}: {len(failures)} of {len(items)} files still failed after "
        f"retrying (VLMTUNE_GCS_RETRY_DEADLINE_S={retry_deadline_s():.0f}s), e.g. {item!r}: {exc}. "
        f"The storage service or network is unavailable; re-run the step."
    ) from exc


def upload_dir(local_dir: Path, bucket: str, prefix: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Upload every file under ``local_dir`` to ``gs://bucket/prefix/...`` in parallel."""
    from google.cloud.storage import transfer_manager

    local_dir = Path(local_dir)
    excluded = {e.strip("/") for e in exclude}
    files = sorted(
        p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*")
        if p.is_file() and p.relative_to(local_dir).as_posix() not in excluded
    )
    if not files:
        return
    blob_prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    b = client().bucket(bucket)

    def run(batch: list[str]) -> list:
        return transfer_manager.upload_many_from_filenames(
            b, batch, source_directory=str(local_dir), blob_name_prefix=blob_prefix,
            upload_kwargs={"retry": retry_policy(), "timeout": request_timeout()},
            worker_type=transfer_manager.THREAD, max_workers=max_workers(), raise_exception=False,
        )

    _run_rounds("upload", bucket, prefix, files, run)


def sliced_min_bytes() -> int:
    return int(_env_float("VLMTUNE_GCS_SLICED_MIN_BYTES", 256 * 1024 * 1024))


def slice_bytes() -> int:
    return max(256 * 1024, int(_env_float("VLMTUNE_GCS_SLICE_BYTES", 32 * 1024 * 1024)))


def _list_blobs(bucket: str, prefix: str) -> list:
    from google.api_core.exceptions import NotFound

    def do() -> list:
        try:
            blobs = client().list_blobs(bucket, prefix=prefix or None, retry=retry_policy(), timeout=request_timeout())
            return [b for b in blobs if not b.name.endswith("/")]
        except NotFound as e:
            raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, prefix))) from e

    return _call("list", bucket, prefix, do)


def download_dir(bucket: str, prefix: str, local_dir: Path) -> None:
    """Download every object under ``gs://bucket/prefix/`` into ``local_dir`` in parallel.

    Objects of at least ``VLMTUNE_GCS_SLICED_MIN_BYTES`` (256 MiB) are fetched one at a time in parallel
    byte ranges of ``VLMTUNE_GCS_SLICE_BYTES`` (32 MiB) (``download_chunks_concurrently``: model weights),
    pinned to the generation listed and checked against the object's crc32c; the rest many at a time.
    """
    from google.cloud.storage import transfer_manager

    blob_prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    blobs = _list_blobs(bucket, blob_prefix)
    if not blobs:
        raise FileNotFoundError(f"{_uri(bucket, prefix)} is not a folder (no objects under it)")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    threshold = sliced_min_bytes()
    large = {b.name[len(blob_prefix):]: b for b in blobs if (b.size or 0) >= threshold and b.crc32c}
    rel_names = [b.name[len(blob_prefix):] for b in blobs if b.name[len(blob_prefix):] not in large]
    root = local_dir.resolve()

    def run_large(batch: list[str]) -> list:
        results: list = []
        for rel in batch:
            target = (local_dir / rel).resolve()
            if not target.is_relative_to(root):
                results.append(UserWarning(f"{rel!r} would land outside {str(local_dir)!r}"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = large[rel]
            try:
                transfer_manager.download_chunks_concurrently(
                    blob, str(target), chunk_size=slice_bytes(),
                    download_kwargs={"retry": retry_policy(), "timeout": request_timeout(),
                                     "if_generation_match": blob.generation},
                    worker_type=transfer_manager.THREAD, max_workers=max_workers(),
                )
                results.append(None)
            except Exception as e:
                results.append(e)
        return results

    for rel in sorted(large):
        _run_rounds("download", bucket, prefix, [rel], run_large)
    if not rel_names:
        return
    b = client().bucket(bucket)

    def run(batch: list[str]) -> list:
        return transfer_manager.download_many_to_path(
            b, batch, destination_directory=str(local_dir), blob_name_prefix=blob_prefix,
            download_kwargs={"retry": retry_policy(), "timeout": request_timeout()},
            worker_type=transfer_manager.THREAD, max_workers=max_workers(), raise_exception=False,
            create_directories=True,
        )

    _run_rounds("download", bucket, prefix, rel_names, run)


def download_files(bucket: str, targets: dict[str, Path]) -> None:
    """Download the objects ``name -> local file`` of one bucket in parallel (the transfer manager, threads).

    Every file is checked and transient failures re-run in rounds, as in :func:`download_dir`; a missing object
    raises FileNotFoundError. No sliced downloads here: the sizes that choose them would cost a request each.
    """
    from google.cloud.storage import transfer_manager

    for name in targets:
        if not name or name.endswith("/"):
            raise StorageError(f"{_uri(bucket, name)} names a folder, not an object; give the object's full path")
    if not targets:
        return
    for target in targets.values():
        target.parent.mkdir(parents=True, exist_ok=True)
    b = client().bucket(bucket)

    def run(batch: list[str]) -> list:
        return transfer_manager.download_many(
            [(b.blob(name), str(targets[name])) for name in batch],
            download_kwargs={"retry": retry_policy(), "timeout": request_timeout()},
            worker_type=transfer_manager.THREAD, max_workers=max_workers(), raise_exception=False,
        )

    _run_rounds("download", bucket, "", sorted(targets), run, missing_raises=True)


# ------------------------------------------------------------------------------------------- backend

def _folder_prefix(name: str) -> str:
    """The object-name prefix of everything under the folder ``name`` ("" for the whole bucket)."""
    return name.rstrip("/") + "/" if name.strip("/") else ""


class GcsBackend:
    """The gs:// backend (see :class:`components.common.storage.backend.Backend`).

    Each method unpacks the :class:`Location` for the module function of the same name.
    """

    def read_bytes(self, loc: Location) -> bytes:
        return read_bytes(loc.bucket, loc.path)

    def write_bytes(self, loc: Location, data: bytes) -> None:
        write_bytes(loc.bucket, loc.path, bytes(data))

    def write_if_absent(self, loc: Location, data: bytes) -> bool:
        return write_if_absent(loc.bucket, loc.path, bytes(data))

    def exists(self, loc: Location) -> bool:
        return exists(loc.bucket, loc.path)

    def delete(self, loc: Location) -> None:
        delete(loc.bucket, loc.path)

    def list_files(self, loc: Location) -> list[str]:
        return sorted(f"gs://{loc.bucket}/{n}" for n in list_names(loc.bucket, _folder_prefix(loc.path)))

    def upload_dir(self, local_dir: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        upload_dir(local_dir, loc.bucket, loc.path, exclude=exclude)

    def download_dir(self, loc: Location, local_dir: Path) -> None:
        download_dir(loc.bucket, loc.path, local_dir)

    def download_files(self, pairs: list[tuple[Location, Path]]) -> None:
        by_bucket: dict[str, dict[str, Path]] = {}
        for loc, target in pairs:
            by_bucket.setdefault(loc.bucket, {})[loc.path] = target
        for bucket, targets in by_bucket.items():
            download_files(bucket, targets)

    @contextlib.contextmanager
    def local_input(self, loc: Location) -> Iterator[Path]:
        """A temp download of the object, or of the folder if there is no object by that name."""
        bucket, name = loc.bucket, loc.path
        with tempfile.TemporaryDirectory(prefix="vlmtune-in-") as tmp:
            if name and not name.endswith("/") and object_exists(bucket, name):
                target = Path(tmp) / Path(name).name
                download_file(bucket, name, target)
                yield target
            else:
                if not list_names(bucket, _folder_prefix(name), max_results=1):
                    raise FileNotFoundError(f"input {loc.uri!r} does not exist (no object and no objects under it)")
                download_dir(bucket, name, Path(tmp) / "data")
                yield Path(tmp) / "data"

    @contextlib.contextmanager
    def staging(self, loc: Location, stale: tuple[str, ...]) -> Iterator[Path]:
        for m in stale:  # fails fast on a missing bucket or missing permissions, before any work
            delete_object(loc.bucket, f"{_folder_prefix(loc.path)}{m}")
        with tempfile.TemporaryDirectory(prefix="vlmtune-out-") as tmp:
            yield Path(tmp)

    def publish(self, staging: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        upload_dir(staging, loc.bucket, loc.path, exclude=exclude)
