"""Artifacts are folders with a ``manifest.json`` written last.

A reader trusts a folder only when its manifest exists: a crashed writer leaves no manifest, so the next
step refuses the folder with a message that says what to do instead of training on half a dataset.

How a step writes one (either way the manifest is the last write, and a crash leaves none):

    with storage.local_output(out_uri) as folder:      # markers at out_uri are cleared on entry
        ...write files into folder...
        artifacts.write_manifest(str(folder), {...})   # last act of the body; published last, create-only

or, writing straight to the URI: ``invalidate(out_uri)`` first, then the files, then
``write_manifest(out_uri, {...})``.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from components.common import storage

MANIFEST = "manifest.json"


class IncompleteArtifactError(RuntimeError):
    """The folder has no manifest (its writer crashed or is still running) or the wrong kind of manifest."""


def write_manifest(folder_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest as the final act of a step. Adds ``created_at``; returns what was written.

    The write is atomic (temp file + rename locally, one single-request upload on gs://): a reader sees no
    manifest or all of it. Call it only after every other file of the artifact is written.
    """
    manifest = {**manifest, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    storage.write_text(storage.join(folder_uri, MANIFEST), text)
    return manifest


def invalidate(folder_uri: str) -> None:
    """Remove the manifest of a folder about to be rewritten, so it is not trusted while half-new."""
    storage.delete(storage.join(folder_uri, MANIFEST))


def read_manifest(folder_uri: str, *, kind: str | None = None) -> dict[str, Any]:
    uri = storage.join(folder_uri, MANIFEST)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as e:
        raise IncompleteArtifactError(
            f"{folder_uri!r} has no {MANIFEST}: the step that wrote it did not finish (crashed or still running). "
            f"Re-run that step to produce a complete artifact; do not use a folder without its manifest."
        ) from e
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise IncompleteArtifactError(
            f"{uri!r} is not valid JSON ({e}): the artifact is damaged. Re-run the step that wrote it."
        ) from e
    if not isinstance(manifest, dict):
        raise IncompleteArtifactError(f"{uri!r} holds a JSON {type(manifest).__name__}, not an object: not a manifest.")
    if kind is not None and manifest.get("kind") != kind:
        raise IncompleteArtifactError(
            f"{folder_uri!r} holds a {manifest.get('kind')!r} artifact, but a {kind!r} artifact was expected. "
            f"Check which output you passed here."
        )
    return manifest


def is_complete(folder_uri: str) -> bool:
    return storage.exists(storage.join(folder_uri, MANIFEST))


def hash_files(uris: list[str]) -> str:
    """sha256 over the contents of files (in the given order): an artifact's content fingerprint."""
    digest = hashlib.sha256()
    for uri in uris:
        digest.update(storage.read_bytes(uri))
    return digest.hexdigest()
