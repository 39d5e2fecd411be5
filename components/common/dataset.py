"""The prepared dataset on disk: the contract between prepare-data (the writer) and sft, dpo and evaluate
(the readers). No step owns it.

A dataset artifact is a folder::

    <uri>/train/part-00000.parquet ...   <uri>/eval/part-00000.parquet ...   <uri>/manifest.json (written last)

Rows follow ``components.common.schema`` (SFT or preference layout); images are stored in the `datasets`
``Image`` encoding, so the shards load with ``datasets.load_dataset("parquet")`` as PIL images and with plain
pyarrow as bytes. The manifest records the task, the splits and their files, the content hash of all shards
and the processor settings the images were sized for.

Writing: :class:`ShardWriter` streams one split into shards; :func:`content_hash` fingerprints them.
Reading: :func:`open_dataset` reads the manifest once (a folder without one is refused), then
:meth:`PreparedDataset.split` loads a split; :func:`load_split` does both in one call.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.common import artifacts, schema, storage


# ----------------------------------------------------------------------------------------------------------
# Schema with `datasets` feature metadata.


def dataset_features(task: str):
    """The `datasets` Features of a shard: the schema.py layout with images as ``Image`` (decoded to PIL)."""
    from datasets import Features, Image, List, Value

    message = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    if task == "sft":
        return Features({"id": Value("string"), "images": List(Image()), "messages": message,
                         "answers": List(Value("string")), "category": Value("string")})
    return Features({"id": Value("string"), "images": List(Image()), "prompt": message, "chosen": message,
                     "rejected": message, "category": Value("string")})


def arrow_schema(task: str) -> pa.Schema:
    """schema.SCHEMAS[task] plus the `datasets` feature metadata, so load_dataset('parquet') yields PIL images."""
    features_schema = dataset_features(task).arrow_schema
    base = schema.SCHEMAS[task]
    assert features_schema.remove_metadata().equals(base), "dataset_features() drifted from components.common.schema"
    return base.with_metadata(features_schema.metadata)


# ----------------------------------------------------------------------------------------------------------
# Writing.


class ShardWriter:
    """Writes one split as ``<split>/part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows."""

    def __init__(self, out_dir: Path, split: str, schema_: pa.Schema, rows_per_shard: int, row_group_rows: int):
        self.dir = out_dir / split
        self.split = split
        self.schema = schema_
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.buffer: list[dict] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_file = 0
        self.rows = 0
        self.files: list[str] = []

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        rel = f"{self.split}/part-{len(self.files):05d}.parquet"
        # No dictionary encoding: it would hash every image blob only to give up; zstd is cheap on JPEG/PNG bytes.
        self.writer = pq.ParquetWriter(self.dir.parent / rel, self.schema, compression="zstd", use_dictionary=False)
        self.files.append(rel)
        self.rows_in_file = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.row_group_rows or self.rows_in_file + len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            if self.writer is None:
                self._open()
            take = min(len(self.buffer), self.rows_per_shard - self.rows_in_file)
            chunk, self.buffer = self.buffer[:take], self.buffer[take:]
            self.writer.write_table(pa.Table.from_pylist(chunk, schema=self.schema), row_group_size=self.row_group_rows)
            self.rows_in_file += take
            self.rows += take
            if self.rows_in_file >= self.rows_per_shard:
                self.writer.close()
                self.writer = None

    def close(self) -> list[str]:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if not self.files:  # an empty split still gets one (empty) file, so readers need no special case
            self._open()
            self.writer.close()
            self.writer = None
        return self.files


def content_hash(paths: list[Path]) -> str:
    """The dataset's fingerprint (manifest ``content_hash``): sha256 over each shard's name and bytes, in order.

    Scheduled runs compare it with the champion's to skip retraining on unchanged data."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Reading.


@dataclass(frozen=True)
class PreparedDataset:
    """A complete dataset artifact: its URI and its manifest (read once, when opened)."""

    uri: str
    manifest: dict[str, Any]

    @property
    def task(self) -> str | None:
        return self.manifest.get("task")

    @property
    def processor_settings(self) -> dict[str, Any] | None:
        return self.manifest.get("processor_settings")

    @property
    def content_hash(self) -> str | None:
        return self.manifest.get("content_hash")

    def split(self, split: str, *, cache_dir: str | None = None):
        """One split as a ``datasets.Dataset`` (images decode to PIL)."""
        import datasets

        if split not in self.manifest["splits"]:
            raise ValueError(f"{self.uri!r} has splits {sorted(self.manifest['splits'])}, not {split!r}")
        files = [storage.join(self.uri, f) for f in self.manifest["splits"][split]["files"]]
        features = dataset_features(self.manifest["task"])

        def load(local_files: list[str]):
            return datasets.load_dataset("parquet", data_files={split: local_files}, split=split, features=features,
                                         cache_dir=cache_dir)

        if storage.is_remote(self.uri):
            # load_dataset copies the rows into its own Arrow cache, so the downloaded shards can go right after.
            with tempfile.TemporaryDirectory(prefix="vlmtune-dataset-") as tmp:
                return load([str(path) for path in storage.download_files(files, tmp)])
        files = [str(storage.to_local_path(f)) for f in files]
        missing = [f for f in files if not Path(f).exists()]
        if missing:
            raise artifacts.IncompleteArtifactError(
                f"{self.uri!r}: its manifest lists {missing[0]!r}, which is missing. The folder was modified "
                f"after prepare-data finished; re-run prepare-data."
            )
        return load(files)


def open_dataset(uri: str) -> PreparedDataset:
    """The dataset at ``uri``. Reads the manifest first: a folder without one (crashed or running writer) is
    refused with ``artifacts.IncompleteArtifactError``."""
    return PreparedDataset(uri, artifacts.read_manifest(uri, kind=schema.DATASET_KIND))


def load_split(dataset_uri: str, split: str, *, cache_dir: str | None = None):
    """One split of a prepared dataset as a ``datasets.Dataset`` (see :func:`open_dataset`)."""
    return open_dataset(dataset_uri).split(split, cache_dir=cache_dir)
