"""google-cloud-storage backend for :mod:`components.common.storage` (gs:// URIs).

Honours ``STORAGE_EMULATOR_HOST`` (fake-gcs-server in tests) with anonymous credentials.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.lru_cache(maxsize=1)
def client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"), credentials=AnonymousCredentials())
    return storage.Client()


def read_bytes(bucket: str, name: str) -> bytes:
    from google.api_core.exceptions import NotFound
    try:
        return client().bucket(bucket).blob(name).download_as_bytes()
    except NotFound as e:
        raise FileNotFoundError(f"gs://{bucket}/{name} does not exist") from e


def write_bytes(bucket: str, name: str, data: bytes) -> None:
    client().bucket(bucket).blob(name).upload_from_string(data)


def write_if_absent(bucket: str, name: str, data: bytes) -> bool:
    from google.api_core.exceptions import PreconditionFailed
    try:
        client().bucket(bucket).blob(name).upload_from_string(data, if_generation_match=0)
        return True
    except PreconditionFailed:
        return False


def exists(bucket: str, name: str) -> bool:
    return bool(name) and client().bucket(bucket).blob(name).exists()


def delete(bucket: str, name: str) -> None:
    for blob in client().list_blobs(bucket, prefix=name):
        blob.delete()


def list_names(bucket: str, prefix: str) -> list[str]:
    return [b.name for b in client().list_blobs(bucket, prefix=prefix)]


def upload_dir(local_dir: Path, bucket: str, prefix: str, *, exclude: tuple[str, ...] = ()) -> None:
    b = client().bucket(bucket)
    for src in sorted(local_dir.rglob("*")):
        rel = src.relative_to(local_dir).as_posix()
        if src.is_dir() or rel in exclude:
            continue
        b.blob(f"{prefix.rstrip('/')}/{rel}" if prefix else rel).upload_from_filename(str(src))


def download_dir(bucket: str, prefix: str, local_dir: Path) -> None:
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    for blob in client().list_blobs(bucket, prefix=prefix):
        rel = blob.name[len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
