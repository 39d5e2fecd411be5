"""google-cloud-storage backend for :mod:`components.common.storage` (gs:// URIs).

Use it through ``storage``: it validates every URI and calls :class:`GcsBackend`, whose methods unpack the
:class:`Location` into the ``(bucket, name)`` functions of this module.

- Credentials: ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server in tests) -> ``AnonymousCredentials`` against it;
  otherwise Application Default Credentials (the service account on Vertex/Kubeflow). One client per
  emulator host, cached: :func:`client` follows ``STORAGE_EMULATOR_HOST`` changes; ``client.cache_clear()``
  drops cached clients.
- Retries and the deadline: every public function here is one *operation* (a read, a tree upload, a
  list+delete, ...; the facade's ``local_output`` makes its whole publish one, :func:`operation`), and every
  request of an operation shares one deadline, ``VLMTUNE_GCS_RETRY_DEADLINE_S``: it runs from the operation's
  start and is renewed by each request that succeeds, so the operation gives up once none of its requests has
  succeeded for that long. A dead endpoint thus fails a 20-file upload after the deadline, not after 20 (or
  ``files / workers``) deadlines; a healthy transfer that takes longer than the deadline is not cut off at its
  first transient error. Each request is retried (the library's ``DEFAULT_RETRY`` predicate: 408/429/5xx,
  connection resets, timeouts; exponential backoff with jitter) only while time is left, and its own timeout
  is what is left, capped at ``VLMTUNE_GCS_TIMEOUT_S`` (:class:`_OperationRetry`, :class:`_DeadlineAdapter`).
  Create-only uploads are retried too: they carry ``if_generation_match=0``, so a retry cannot overwrite, and
  a 412 after a lost response is resolved by a per-write token in the object's metadata. Plain overwrites
  (``write_bytes``, tree uploads) are retried unconditionally, as the library does for uploads by default:
  re-sending the same bytes is idempotent for a single writer; concurrent writers of one name should use
  ``write_if_absent``.
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
import contextvars
import functools
import hashlib
import logging
import mimetypes
import os
import random
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, ContextManager, Iterator, TypeVar

from components.common.storage.backend import Location
from components.common.storage.errors import BucketNotFoundError, StorageError, local_storage_error
from components.common.storage.staging import staging_folder

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


DEADLINE_ENV = "VLMTUNE_GCS_RETRY_DEADLINE_S"


def retry_deadline_s() -> float:
    return _env_float(DEADLINE_ENV, 300.0)


def request_timeout() -> float:
    return _env_float("VLMTUNE_GCS_TIMEOUT_S", 60.0)


def max_workers() -> int:
    return max(1, int(_env_float("VLMTUNE_GCS_MAX_WORKERS", 8)))


# -------------------------------------------------------------------------------------------- deadline

class _Deadline:
    """The one deadline every request of an operation shares (see the module docstring).

    Shared across threads: the transfer manager's workers retry with it, and their successes renew it.
    """

    def __init__(self, op: str, uri: str, seconds: float):
        self.op, self.uri, self.seconds = op, uri, seconds
        self.started = self._last_success = time.monotonic()

    def succeeded(self) -> None:
        self._last_success = time.monotonic()

    def remaining(self) -> float:
        return self._last_success + self.seconds - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def request_timeout(self) -> float:
        """The timeout of a request started now: what is left, at most ``VLMTUNE_GCS_TIMEOUT_S``."""
        return max(0.05, min(request_timeout(), self.remaining()))

    def explain(self) -> str:
        """Why the operation gave up, naming the deadline, the operation and how to raise the deadline."""
        now = time.monotonic()
        since = ("its start" if self._last_success == self.started
                 else f"its last successful request, {now - self._last_success:.1f}s before")
        return (f"gave up {now - self.started:.1f}s after `{self.op} {self.uri}` started: no request succeeded within "
                f"its deadline of {self.seconds:g}s ({DEADLINE_ENV}={self.seconds:g}, one deadline for the whole "
                f"operation, counted from {since})")

    def fix(self) -> str:
        return (f"The storage service or network is unavailable: re-run the step once it is back, or raise "
                f"{DEADLINE_ENV} (now {self.seconds:g}) to wait longer.")


#: The operation open in this context (None: each call opens its own). Thread pools get it via _bind.
_CURRENT: contextvars.ContextVar[_Deadline | None] = contextvars.ContextVar("vlmtune_gcs_operation", default=None)
#: The deadline of the request a thread is running (set by _OperationRetry, read by _DeadlineAdapter).
_THREAD = threading.local()


@contextlib.contextmanager
def operation(op: str, uri: str) -> Iterator[_Deadline]:
    """Run the block as one operation: all its requests share one deadline (an open one is joined)."""
    current = _CURRENT.get()
    if current is not None:
        yield current
        return
    deadline = _Deadline(op, uri, retry_deadline_s())
    token = _CURRENT.set(deadline)
    try:
        yield deadline
    finally:
        _CURRENT.reset(token)


def _current() -> _Deadline:
    """The open operation's deadline; outside any operation (direct library use), a fresh one per call."""
    return _CURRENT.get() or _Deadline("request", "gs://", retry_deadline_s())


def _bind(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` running in the caller's operation from any thread (contextvars do not follow thread pools)."""
    deadline = _current()

    def bound(*args, **kwargs):
        token = _CURRENT.set(deadline)
        try:
            return fn(*args, **kwargs)
        finally:
            _CURRENT.reset(token)

    return bound


class _OperationRetry:
    """A ``retry=`` for google-cloud-storage calls that retries while the operation's deadline lasts.

    The library calls ``retry(func)()`` around each request, in the thread doing it (a transfer manager
    worker too), so the time left is read at every attempt rather than fixed when the kwargs were built.
    A success renews the deadline; no attempt starts once it is spent (the error then is a ``RetryError``
    whose message names the deadline). Backoff as api_core's: full jitter, doubling up to the maximum.
    """

    def __init__(self, deadline: _Deadline):
        self.deadline = deadline
        self.initial = _env_float("VLMTUNE_GCS_RETRY_INITIAL_S", 1.0)
        self.maximum = _env_float("VLMTUNE_GCS_RETRY_MAX_S", 32.0)

    def __call__(self, func: Callable[..., T], on_error: Callable[[Exception], None] | None = None) -> Callable[..., T]:
        from google.api_core.exceptions import RetryError
        from google.api_core.retry import exponential_sleep_generator
        from google.cloud.storage.retry import _should_retry

        deadline = self.deadline

        @functools.wraps(func)
        def with_retry(*args, **kwargs):
            sleeps = exponential_sleep_generator(self.initial, self.maximum, multiplier=2.0)
            last: Exception | None = None
            outer = getattr(_THREAD, "deadline", None)
            _THREAD.deadline = deadline
            try:
                while True:
                    if deadline.expired():
                        raise RetryError(f"{deadline.explain()}; last error: {last}", last)
                    try:
                        result = func(*args, **kwargs)
                    except Exception as exc:
                        if not _should_retry(exc):
                            raise
                        last = exc
                        if on_error is not None:
                            on_error(exc)
                        time.sleep(max(0.0, min(next(sleeps), deadline.remaining())))
                        continue
                    deadline.succeeded()
                    return result
            finally:
                _THREAD.deadline = outer

        return with_retry


def retry_policy() -> _OperationRetry:
    """The ``retry=`` of a request: the library's predicate, our backoff, the open operation's deadline."""
    return _OperationRetry(_current())


def _timeout() -> float:
    """The ``timeout=`` of a request built now: the open operation's time left, at most VLMTUNE_GCS_TIMEOUT_S."""
    return _current().request_timeout()


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


def _capped_timeout(timeout, left: float):
    """A requests ``timeout`` (None, seconds, or (connect, read)) no longer than ``left`` seconds."""
    if isinstance(timeout, tuple):
        return tuple(left if t is None else min(t, left) for t in timeout)
    return left if timeout is None else min(timeout, left)


def _deadline_adapter(size: int):
    """An HTTPAdapter whose requests wait no longer than their operation has left (see :class:`_OperationRetry`).

    The timeout kwarg of a tree transfer is built once per round, but its requests start whenever a worker gets
    to them: the cap is applied here, when each request is sent, from the deadline of the thread sending it.
    """
    from requests.adapters import HTTPAdapter

    class _DeadlineAdapter(HTTPAdapter):
        def send(self, request, stream=False, timeout=None, **kwargs):
            deadline = getattr(_THREAD, "deadline", None)
            if deadline is not None:
                timeout = _capped_timeout(timeout, max(0.05, deadline.remaining()))
            return super().send(request, stream=stream, timeout=timeout, **kwargs)

    return _DeadlineAdapter(pool_connections=size, pool_maxsize=size)


def _size_pool(c):
    """One HTTP connection per parallel transfer (requests' default pool of 10 would throw connections away),
    and request timeouts capped by the operation's deadline (:func:`_deadline_adapter`)."""
    try:
        from requests.adapters import HTTPAdapter

        size = max(10, max_workers() + 2)
        session = c._http
        for scheme in ("https://", "http://"):
            if type(session.adapters.get(scheme)) is HTTPAdapter:  # leave special adapters (mTLS) alone
                session.mount(scheme, _deadline_adapter(size))
    except Exception:  # private attribute: best effort only (retries still stop at the deadline)
        log.debug("could not replace the storage client's HTTP adapter", exc_info=True)
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
        return not client().bucket(bucket).exists(retry=retry_policy(), timeout=_timeout())
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


def _translate(exc: Exception, bucket: str, name: str, op: str, local: Path | None = None) -> Exception:
    """Map a client exception to what storage's callers handle: FileNotFoundError or StorageError.

    ``local`` is the local file or folder the request read or wrote, named when the local disk refused it."""
    from google.api_core.exceptions import Forbidden, NotFound, RetryError, Unauthorized

    uri = _uri(bucket, name)
    if isinstance(exc, (StorageError, FileNotFoundError)):
        return exc
    if isinstance(exc, OSError):  # the local side: a full or read-only disk while downloading, say
        refused = local_storage_error(exc, f"{op} {uri}", local if local is not None else tempfile.gettempdir())
        if refused is not None:
            return refused
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
        deadline = _current()
        why = deadline.explain() if deadline.expired() else "a transient error outside the retried requests"
        return StorageError(f"{op} {uri} still failed after retrying: {why}; last error: {_last_error(exc)}. "
                            f"{deadline.fix()}")
    return StorageError(f"{op} {uri} failed: {type(exc).__name__}: {exc}")


def _last_error(exc: BaseException) -> str:
    """The request error behind a failure (a RetryError of _OperationRetry carries it as its cause)."""
    from google.api_core.exceptions import RetryError

    if isinstance(exc, RetryError):
        return f"{type(exc.cause).__name__}: {exc.cause}" if exc.cause else "none: no time was left to send it"
    return f"{type(exc).__name__}: {exc}"


def _call(op: str, bucket: str, name: str, fn: Callable[[], T], local: Path | None = None) -> T:
    """Run one request (the library retries it); re-run checksum failures, which the library does not retry;
    translate what still fails."""
    from google.cloud.storage.exceptions import DataCorruption

    with operation(op, _uri(bucket, name)) as deadline:
        for attempt in range(TRANSFER_ROUNDS):
            try:
                return fn()
            except DataCorruption as e:
                if attempt + 1 < TRANSFER_ROUNDS and not deadline.expired():
                    log.warning("%s %s: checksum mismatch (%s); retrying", op, _uri(bucket, name), e)
                    _sleep_backoff(attempt)
                    continue
                raise StorageError(f"{op} {_uri(bucket, name)}: data corrupted in transit {attempt + 1} times "
                                   f"in a row: {e}") from e
            except Exception as e:
                translated = _translate(e, bucket, name, op, local)
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
        retry=retry_policy(), timeout=_timeout()))


def download_file(bucket: str, name: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    _call("download", bucket, name, lambda: _blob(bucket, name).download_to_filename(
        str(target), retry=retry_policy(), timeout=_timeout()), local=target)


def write_bytes(bucket: str, name: str, data: bytes) -> None:
    if not name or name.endswith("/"):
        raise StorageError(f"{_uri(bucket, name)} names a folder, not an object; give the object's full path")
    _call("write", bucket, name, lambda: _blob(bucket, name).upload_from_string(
        data, content_type=_content_type(name), retry=retry_policy(), timeout=_timeout()))


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
                                    retry=retry_policy(), timeout=_timeout())
            return True
        except PreconditionFailed:
            existing = client().bucket(bucket).get_blob(name, retry=retry_policy(), timeout=_timeout())
            return existing is not None and (existing.metadata or {}).get(WRITER_TOKEN_KEY) == token

    return _call("create-only write", bucket, name, create)


def object_exists(bucket: str, name: str) -> bool:
    if not name or name.endswith("/"):
        return False

    def check() -> bool:
        from google.api_core.exceptions import NotFound
        try:
            if _blob(bucket, name).exists(retry=retry_policy(), timeout=_timeout()):
                return True
        except NotFound:
            pass
        if _bucket_missing(bucket, Exception()):
            raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, name)))
        return False

    return _call("check", bucket, name, check)


def exists(bucket: str, name: str) -> bool:
    """An object named ``name``, or any object under ``name/`` (a "folder"; the whole bucket if name is empty)."""
    with operation("check", _uri(bucket, name)):
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
                                        retry=retry_policy(), timeout=_timeout())
            return [b.name for b in blobs if not b.name.endswith("/")]
        except NotFound as e:  # listing an existing bucket never 404s
            raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, prefix))) from e

    return _call("list", bucket, prefix, do)


def delete_object(bucket: str, name: str) -> None:
    """Delete one object; absent is fine (also when a retried delete meets its own earlier success)."""
    from google.api_core.exceptions import NotFound

    def do() -> None:
        try:
            _blob(bucket, name).delete(retry=retry_policy(), timeout=_timeout())
        except NotFound:
            if _bucket_missing(bucket, Exception()):
                raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, name)))

    _call("delete", bucket, name, do)


def delete(bucket: str, name: str) -> None:
    """Delete the object ``name`` and every object under ``name/`` (never ``name10/...``): one operation, the
    listing and the parallel deletes sharing its deadline."""
    if not name.strip("/"):
        raise StorageError(f"refusing to delete everything in gs://{bucket}: give a folder path under the bucket")
    with operation("delete", _uri(bucket, name)):
        names = list_names(bucket, name.rstrip("/") + "/")
        if not name.endswith("/"):
            names.append(name)
        delete_one = _bind(lambda n: delete_object(bucket, n))
        with ThreadPoolExecutor(max_workers=max_workers()) as pool:
            list(pool.map(delete_one, names))


# ----------------------------------------------------------------------------------------------- trees

def _sleep_backoff(round_no: int) -> None:
    """Backoff before re-running a round, never past the operation's deadline."""
    initial = _env_float("VLMTUNE_GCS_RETRY_INITIAL_S", 1.0)
    cap = _env_float("VLMTUNE_GCS_RETRY_MAX_S", 32.0)
    time.sleep(max(0.0, min(random.uniform(0, min(cap, initial * (2 ** round_no))), _current().remaining())))


def _run_rounds(op: str, bucket: str, prefix: str, items: list[str], run: Callable[[list[str]], list], *,
                missing_raises: bool = False, local: Callable[[str], Path] | None = None) -> None:
    """Run ``run(items)`` (one result per item: None, an Exception or a UserWarning), re-running transient
    failures in rounds; raise StorageError naming every file that still failed. Nothing is dropped.

    With ``missing_raises`` a missing object raises FileNotFoundError (the caller named the files itself),
    as a missing bucket always raises BucketNotFoundError."""
    pending = list(items)
    failures: dict[str, BaseException] = {}
    deadline = _current()
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
            translated = _translate(exc, bucket, f"{prefix.rstrip('/')}/{item}" if prefix else item, op,
                                    local(item) if local else None)
            if isinstance(translated, BucketNotFoundError) or (
                    missing_raises and isinstance(translated, FileNotFoundError)):
                raise translated from exc
            raise StorageError(
                f"{op} {_uri(bucket, prefix)}: {len(permanent)} of {len(items)} files failed, e.g. {item!r}: "
                f"{translated}"
            ) from exc
        if deadline.expired():
            break
        log.warning("%s %s: %d of %d files failed transiently (round %d); retrying them", op,
                    _uri(bucket, prefix), len(failures), len(items), round_no + 1)
        pending = list(failures)
        _sleep_backoff(round_no)
    item, exc = next(iter(failures.items()))
    why = deadline.explain() if deadline.expired() else f"{TRANSFER_ROUNDS} rounds of transient errors"
    raise StorageError(
        f"{op} {_uri(bucket, prefix)}: {len(failures)} of {len(items)} files still failed after retrying: {why}; "
        f"e.g. {item!r}: {_last_error(exc)}. {deadline.fix()}"
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
            upload_kwargs={"retry": retry_policy(), "timeout": _timeout()},
            worker_type=transfer_manager.THREAD, max_workers=max_workers(), raise_exception=False,
        )

    with operation("upload", _uri(bucket, prefix)):
        _run_rounds("upload", bucket, prefix, files, run, local=lambda rel: local_dir / rel)


def sliced_min_bytes() -> int:
    return int(_env_float("VLMTUNE_GCS_SLICED_MIN_BYTES", 256 * 1024 * 1024))


def slice_bytes() -> int:
    return max(256 * 1024, int(_env_float("VLMTUNE_GCS_SLICE_BYTES", 32 * 1024 * 1024)))


def _list_blobs(bucket: str, prefix: str) -> list:
    from google.api_core.exceptions import NotFound

    def do() -> list:
        try:
            blobs = client().list_blobs(bucket, prefix=prefix or None, retry=retry_policy(), timeout=_timeout())
            return [b for b in blobs if not b.name.endswith("/")]
        except NotFound as e:
            raise BucketNotFoundError(_bucket_missing_msg(bucket, _uri(bucket, prefix))) from e

    return _call("list", bucket, prefix, do)


def download_dir(bucket: str, prefix: str, local_dir: Path) -> None:
    """Download every object under ``gs://bucket/prefix/`` into ``local_dir`` in parallel.

    Objects of at least ``VLMTUNE_GCS_SLICED_MIN_BYTES`` (256 MiB) are fetched one at a time in parallel
    byte ranges of ``VLMTUNE_GCS_SLICE_BYTES`` (32 MiB) (``download_chunks_concurrently``: model weights),
    pinned to the generation listed and checked against the object's crc32c; the rest many at a time.
    The listing and every transfer are one operation (one deadline).
    """
    with operation("download", _uri(bucket, prefix)):
        _download_dir(bucket, prefix, local_dir)


def _download_dir(bucket: str, prefix: str, local_dir: Path) -> None:
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
                    download_kwargs={"retry": retry_policy(), "timeout": _timeout(),
                                     "if_generation_match": blob.generation},
                    worker_type=transfer_manager.THREAD, max_workers=max_workers(),
                )
                results.append(None)
            except Exception as e:
                results.append(e)
        return results

    for rel in sorted(large):
        _run_rounds("download", bucket, prefix, [rel], run_large, local=lambda rel: local_dir / rel)
    if not rel_names:
        return
    b = client().bucket(bucket)

    def run(batch: list[str]) -> list:
        return transfer_manager.download_many_to_path(
            b, batch, destination_directory=str(local_dir), blob_name_prefix=blob_prefix,
            download_kwargs={"retry": retry_policy(), "timeout": _timeout()},
            worker_type=transfer_manager.THREAD, max_workers=max_workers(), raise_exception=False,
            create_directories=True,
        )

    _run_rounds("download", bucket, prefix, rel_names, run, local=lambda rel: local_dir / rel)


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
            download_kwargs={"retry": retry_policy(), "timeout": _timeout()},
            worker_type=transfer_manager.THREAD, max_workers=max_workers(), raise_exception=False,
        )

    with operation("download", _uri(bucket)):
        _run_rounds("download", bucket, "", sorted(targets), run, missing_raises=True, local=targets.__getitem__)


# ------------------------------------------------------------------------------------------- backend

def _folder_prefix(name: str) -> str:
    """The object-name prefix of everything under the folder ``name`` ("" for the whole bucket)."""
    return name.rstrip("/") + "/" if name.strip("/") else ""


class GcsBackend:
    """The gs:// backend (see :class:`components.common.storage.backend.Backend`).

    Each method unpacks the :class:`Location` for the module function of the same name, as one operation
    named after it and the URI the caller gave (the deadline's error quotes both).
    """

    def operation(self, op: str, loc: Location) -> ContextManager[_Deadline]:
        return operation(op, loc.uri)

    def read_bytes(self, loc: Location) -> bytes:
        with operation("read", loc.uri):
            return read_bytes(loc.bucket, loc.path)

    def write_bytes(self, loc: Location, data: bytes) -> None:
        with operation("write", loc.uri):
            write_bytes(loc.bucket, loc.path, bytes(data))

    def write_if_absent(self, loc: Location, data: bytes) -> bool:
        with operation("create-only write", loc.uri):
            return write_if_absent(loc.bucket, loc.path, bytes(data))

    def exists(self, loc: Location) -> bool:
        with operation("check", loc.uri):
            return exists(loc.bucket, loc.path)

    def delete(self, loc: Location) -> None:
        with operation("delete", loc.uri):
            delete(loc.bucket, loc.path)

    def list_files(self, loc: Location) -> list[str]:
        with operation("list", loc.uri):
            return sorted(f"gs://{loc.bucket}/{n}" for n in list_names(loc.bucket, _folder_prefix(loc.path)))

    def upload_dir(self, local_dir: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        with operation("upload", loc.uri):
            upload_dir(local_dir, loc.bucket, loc.path, exclude=exclude)

    def download_dir(self, loc: Location, local_dir: Path) -> None:
        with operation("download", loc.uri):
            download_dir(loc.bucket, loc.path, local_dir)

    def download_files(self, pairs: list[tuple[Location, Path]]) -> None:
        by_bucket: dict[str, dict[str, Path]] = {}
        for loc, target in pairs:
            by_bucket.setdefault(loc.bucket, {})[loc.path] = target
        shown = pairs[0][0].uri if len(pairs) == 1 else f"{len(pairs)} files like {pairs[0][0].uri}"
        with operation("download", shown):  # every bucket's files: one deadline
            for bucket, targets in by_bucket.items():
                download_files(bucket, targets)

    @contextlib.contextmanager
    def local_input(self, loc: Location) -> Iterator[Path]:
        """A temp download of the object, or of the folder if there is no object by that name.

        The download is one operation; the block that uses it is not timed."""
        bucket, name = loc.bucket, loc.path
        with tempfile.TemporaryDirectory(prefix="vlmtune-in-") as tmp:
            with operation("download", loc.uri):
                if name and not name.endswith("/") and object_exists(bucket, name):
                    target = Path(tmp) / Path(name).name
                    download_file(bucket, name, target)
                else:
                    if not list_names(bucket, _folder_prefix(name), max_results=1):
                        raise FileNotFoundError(f"input {loc.uri!r} does not exist (no object and no objects under it)")
                    target = Path(tmp) / "data"
                    download_dir(bucket, name, target)
            yield target

    @contextlib.contextmanager
    def staging(self, loc: Location, stale: tuple[str, ...]) -> Iterator[Path]:
        with operation("clear the completion markers of", loc.uri):
            for m in stale:  # fails fast on a missing bucket or missing permissions, before any work
                delete_object(loc.bucket, f"{_folder_prefix(loc.path)}{m}")
        # In the temp folder, named after the URI: a writer killed here leaves a folder the next writer of the
        # same output removes (staging.py), as next to a local output.
        name = f"vlmtune-out-{hashlib.sha256(loc.uri.encode()).hexdigest()[:12]}"
        with staging_folder(Path(tempfile.gettempdir()), name, hidden=False) as folder:
            yield folder

    def publish(self, staging: Path, loc: Location, exclude: tuple[str, ...]) -> None:
        with operation("publish", loc.uri):
            upload_dir(staging, loc.bucket, loc.path, exclude=exclude)
