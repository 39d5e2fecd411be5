"""Artifacts are folders with a ``manifest.json`` written last.

A reader trusts a folder only when its manifest exists: a crashed writer leaves no manifest, so the next
step refuses the folder with a message that says what to do instead of training on half a dataset.

How a step writes one (either way the manifest is the last write, and a crash leaves none):

    with storage.local_output(out_uri) as folder:      # markers at out_uri are cleared on entry
        ...write files into folder...
        artifacts.write_manifest(str(folder), {...})   # last act of the body; published last, create-only

or, writing straight to the URI: ``invalidate(out_uri)`` first, then the files, then
``write_manifest(out_uri, {...})``.

A folder the reader refuses is refused for the reason that is true, each a subclass of
:class:`IncompleteArtifactError`: it does not exist (:class:`ArtifactNotFoundError`), it exists but is not a
vlmtune artifact (:class:`NotAnArtifactError`: a raw source folder given to ``sft --dataset``), it holds an
artifact's files without a manifest (the step that wrote it did not finish: :class:`UnfinishedArtifactError`),
or its manifest is damaged or of another kind.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from components.common import storage
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND

MANIFEST = "manifest.json"


class IncompleteArtifactError(RuntimeError):
    """The folder is not a complete artifact of the kind asked for: missing, not an artifact, unfinished,
    damaged, or of another kind. The message says which, and what to do."""


class ArtifactNotFoundError(IncompleteArtifactError):
    """Nothing is at the URI."""


class NotAnArtifactError(IncompleteArtifactError):
    """Something is at the URI, but not a vlmtune artifact (no manifest and none of an artifact's files)."""


class UnfinishedArtifactError(IncompleteArtifactError):
    """The folder holds an artifact's files but no manifest: its writer crashed or is still running."""


@dataclass(frozen=True)
class Kind:
    """How to talk about one artifact kind: what it is, which command writes it, and the entries its writer
    puts in the folder (their presence without a manifest means the writer did not finish)."""

    noun: str
    written_by: str
    entries: tuple[str, ...]
    not_one_hint: str


KINDS: dict[str, Kind] = {
    DATASET_KIND: Kind("vlmtune dataset", "`vlmtune prepare-data`", ("train", "eval"),
                       "if it is source data, run prepare-data on it first: `vlmtune prepare-data --source {uri} "
                       "--output DIR` (add --task preference for chosen/rejected rows), then pass DIR"),
    MODEL_KIND: Kind("vlmtune model", "`vlmtune sft` or `vlmtune dpo`", ("adapter", "model", "processor", "config.yaml"),
                     "pass the output folder of `vlmtune sft` or `vlmtune dpo`"),
    EVAL_KIND: Kind("vlmtune evaluation", "`vlmtune evaluate`", ("metrics.json", "predictions.jsonl", "report.html"),
                    "pass the output folder of `vlmtune evaluate`"),
}
_ANY_ENTRIES = tuple(dict.fromkeys(e for k in KINDS.values() for e in k.entries))


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


def _local_entries(folder_uri: str) -> list[str] | None:
    """Top-level names in a local folder (folders with a trailing /), or None for gs:// (not listed: a raw
    source bucket can hold millions of objects)."""
    if storage.is_remote(folder_uri):
        return None
    path = storage.to_local_path(folder_uri)
    try:
        return sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(path))
    except NotADirectoryError:
        return []


def _staging_siblings(folder_uri: str) -> list[str]:
    """Hidden ``.NAME.partial-*`` folders beside a local target: ``storage.local_output`` writing it right now
    (or killed too hard to clean up)."""
    if storage.is_remote(folder_uri):
        return []
    path = storage.to_local_path(folder_uri)
    try:
        return sorted(n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.partial-"))
    except OSError:
        return []


def missing_manifest_error(folder_uri: str, kind: str | None = None) -> IncompleteArtifactError:
    """The true reason ``folder_uri`` has no manifest, as the error to raise: it does not exist; it exists but
    is not a vlmtune artifact (with the command that makes one); or a step began writing it and did not finish."""
    info = KINDS.get(kind or "")
    noun = info.noun if info else (f"{kind!r} artifact" if kind else "vlmtune artifact")
    source = f"the output folder of {info.written_by}" if info else "a step's output folder"
    if not storage.exists(folder_uri):
        staging = _staging_siblings(folder_uri)
        if staging:
            return UnfinishedArtifactError(
                f"{folder_uri!r} does not exist yet: a step is writing it now, or was killed while writing it (found "
                f"{staging[0]!r} beside it). Wait for that step, or re-run it; it did not finish.")
        return ArtifactNotFoundError(
            f"{folder_uri!r} does not exist; expected a {noun} ({source}). Check the path; if a step was to "
            f"write it, that step has not run or did not finish (it writes nothing without its {MANIFEST}).")
    entries = _local_entries(folder_uri)
    if entries == [] and not storage.is_remote(folder_uri) and storage.to_local_path(folder_uri).is_file():
        return NotAnArtifactError(f"{folder_uri!r} is a file; expected a {noun} folder ({source})")
    expected = info.entries if info else _ANY_ENTRIES
    if entries is None:
        partial = [e for e in expected if storage.exists(storage.join(folder_uri, e))]
    else:
        partial = [e for e in entries if e.rstrip("/") in expected]
    if partial:
        return UnfinishedArtifactError(
            f"{folder_uri!r} holds parts of a {noun} ({', '.join(partial)}) but no {MANIFEST}: the step that wrote it "
            f"did not finish (crashed or still running). Re-run that step; do not use a folder without its manifest.")
    if entries == []:
        return NotAnArtifactError(
            f"{folder_uri!r} is an empty folder, not a {noun} (no {MANIFEST}); expected {source}")
    shown = f" (it holds {', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''})" if entries else ""
    if info is None:  # no kind to recognise its files by: both readings are possible, so say both
        return IncompleteArtifactError(
            f"{folder_uri!r} exists but has no {MANIFEST}{shown}: either the step writing it did not finish (crashed "
            f"or still running: re-run it), or it is not a vlmtune artifact at all (pass {source})")
    return NotAnArtifactError(f"{folder_uri!r} exists but is not a {noun}: it has no {MANIFEST}{shown}; "
                              f"{info.not_one_hint.format(uri=folder_uri)}")


def read_manifest(folder_uri: str, *, kind: str | None = None) -> dict[str, Any]:
    """The manifest of the artifact at ``folder_uri``, checked to be of ``kind`` when given. Raises a subclass of
    :class:`IncompleteArtifactError` that says what is true of the folder (see :func:`missing_manifest_error`)."""
    uri = storage.join(folder_uri, MANIFEST)
    try:
        text = storage.read_text(uri)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise missing_manifest_error(folder_uri, kind) from e
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise IncompleteArtifactError(
            f"{uri!r} is not valid JSON ({e}): the artifact is damaged. Re-run the step that wrote it."
        ) from e
    if not isinstance(manifest, dict):
        raise IncompleteArtifactError(f"{uri!r} holds a JSON {type(manifest).__name__}, not an object: not a manifest.")
    if kind is not None and manifest.get("kind") != kind:
        info = KINDS.get(kind)
        raise IncompleteArtifactError(
            f"{folder_uri!r} holds a {manifest.get('kind')!r} artifact, but a {kind!r} artifact was expected. "
            f"Check which output you passed here" + (f": expected the output folder of {info.written_by}." if info else ".")
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
