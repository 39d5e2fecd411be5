"""The ``prepare-data`` step: a source dataset in, train/eval Parquet shards + ``manifest.json`` out.

``run(config, source, output)`` reads rows in any supported layout (``sources.py``), turns each into the
SmolVLM chat form of ``components.common.schema`` (``rows.py``), fixes and token-aware-resizes its images in
a process pool (``images.py``, ``parallel.py``), splits rows by a hash of their id, and streams them into
sharded Parquet (``components.common.dataset``). Every rejected row is counted with its reason in the
manifest and listed with its source position and a human detail in ``rejects.jsonl`` beside it
(``stats.py``); ``manifest.json`` is written last, so a crashed run leaves a folder that readers refuse.

Reads top to bottom: validate the config -> read the processor's settings -> open the source (notes about
files it does not read go to stderr and the manifest's warnings) -> clear the old output -> stream rows
(normalise, process images, dedupe, split, write; reject lines to ``rejects.jsonl``) -> check the share of
invalid rows -> write the manifest last.

When the run gives up on too many invalid rows there is no manifest, by design; the message shows the first
rejected rows in full, and the whole list is left at ``OUTPUT/rejects.jsonl`` (a folder without a manifest,
so no later step takes it for a dataset).

    vlmtune prepare-data --source DIR_OR_URI --output DIR_OR_URI [--processor MODEL] [--set key=value]
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from components.common import artifacts, schema, storage
from components.common.config import ConfigError, to_dict
from components.common.dataset import ShardWriter, arrow_schema, content_hash
from components.common.processor_settings import load_processor_settings
from components.prepare_data import images as imagelib
from components.prepare_data.config import PrepareDataConfig
from components.prepare_data.parallel import ImagePool, available_cpus
from components.prepare_data.rows import PendingRow, RowIdentity, RowRejected, image_names, normalize_row, split_of
from components.prepare_data.sources import iter_rows, open_source
from components.prepare_data.stats import ImageStats, Rejects, describe_reject

EARLY_ROWS = 1000  # if this many rows in a row are all invalid, stop: the column mapping is wrong
REJECTS_FILE = "rejects.jsonl"  # one JSON line per rejected row, beside manifest.json


class TooManyInvalidRowsError(RuntimeError):
    """More rows were invalid than ``max_invalid_fraction`` allows. Carries the would-be manifest summary,
    the first rejected rows in full, and where the whole list was left (``rejects_file``), if anywhere."""

    def __init__(self, message: str, summary: dict[str, Any], first_rejects: list[dict[str, Any]] = ()):
        super().__init__(message)
        self.message = message
        self.summary = summary
        self.first_rejects = list(first_rejects)
        self.rejects_file: str | None = None

    def __str__(self) -> str:
        lines = [self.message]
        if self.first_rejects:
            lines.append("First rejected rows:")
            lines.extend(f"  {describe_reject(r)}" for r in self.first_rejects)
        if self.rejects_file:
            lines.append(f"Every rejected row ({self.summary['counts'].get('rejected', '?')}) is listed in "
                         f"{self.rejects_file}.")
        return "\n".join(lines)


@dataclasses.dataclass
class Tally:
    """Rows read, rows written and rows rejected (by reason) so far. ``stopped_early``: the run gave up, no more
    rows are read; rows already read are still counted (their images may still be in the workers)."""

    rows_in: int = 0
    rows_out: int = 0
    rejects: Rejects = dataclasses.field(default_factory=Rejects)
    stopped_early: bool = False


def run(config: PrepareDataConfig, source: str, output: str) -> dict[str, Any]:
    """Prepare ``source`` into a dataset artifact at ``output``; returns the manifest that was written.

    Raises ConfigError (bad config/processor), SourceError / FileNotFoundError (unreadable source) and
    TooManyInvalidRowsError (share of invalid rows above ``max_invalid_fraction``); none of them leave a
    manifest behind.
    """
    cfg = config.resolved()
    problems = cfg.validate()
    if problems:
        raise ConfigError("invalid PrepareDataConfig:\n  - " + "\n  - ".join(problems))
    started = time.time()
    processor_settings = load_processor_settings(cfg.processor, cfg.longest_edge, cfg.image_sizing) if cfg.processor else None
    target_edge = processor_settings["size"]["longest_edge"] if processor_settings else cfg.longest_edge
    settings = imagelib.ImageSettings(target_edge, cfg.max_image_pixels, cfg.image_format, cfg.jpeg_quality)

    with storage.local_input(source) as src_path:
        src = open_source(Path(src_path), cfg.source_split, cfg.image_column)
        for note in src.notes:  # now, not only in the manifest: the run may still fail for another reason
            print(f"prepare-data: note: {note}", file=sys.stderr)
        if not storage.is_remote(output):
            out_path = storage.to_local_path(output).resolve()
            if out_path == src.root.resolve() or out_path in src.root.resolve().parents:
                raise ConfigError(
                    f"output {output!r} is the source folder or holds it; writing there would overwrite the "
                    f"source. Pass a separate --output folder."
                )
        _clear_output(output)
        # local_output stages into a fresh folder and publishes it (manifest last) only if the body succeeds.
        with storage.local_output(output) as out_dir:
            # rejects.jsonl is staged with the shards: published before the manifest, never complete alone.
            rejects_path = Path(out_dir) / REJECTS_FILE
            try:
                with open(rejects_path, "w", encoding="utf-8") as rejects_log:
                    manifest = _process(cfg, src, Path(out_dir), settings, processor_settings, source, rejects_log)
            except TooManyInvalidRowsError as e:
                e.rejects_file = _leave_rejects_list(rejects_path, output)
                raise
            manifest["seconds"] = round(time.time() - started, 2)
            manifest["source"] = source
            manifest = artifacts.write_manifest(str(out_dir), manifest)  # last act: the folder is now complete
    return manifest


def _leave_rejects_list(staged: Path, output: str) -> str | None:
    """On a failed run, copy the staged rejects list to ``OUTPUT/rejects.jsonl`` (the staging folder is about to
    be removed) and return where it is. The output has no manifest, so it still reads as "not a dataset"."""
    if not staged.is_file() or staged.stat().st_size == 0:
        return None
    target = storage.join(output, REJECTS_FILE)
    try:
        storage.write_bytes(target, staged.read_bytes())
    except (OSError, storage.StorageError) as e:  # the first rows are in the message anyway
        print(f"prepare-data: could not leave the rejects list at {target}: {e}", file=sys.stderr)
        return None
    return target


def _clear_output(output: str) -> None:
    """Remove a previous run's manifest, then its shards and rejects list, so nothing stale can pass for this
    run's output."""
    artifacts.invalidate(output)
    storage.delete(storage.join(output, REJECTS_FILE))
    for split in schema.SPLITS:
        if storage.is_remote(output):
            for uri in storage.list_files(storage.join(output, split)):
                storage.delete(uri)
        else:
            shutil.rmtree(storage.to_local_path(output) / split, ignore_errors=True)


def _process(cfg, src, out_dir: Path, settings, processor_settings, source_uri: str, rejects_log) -> dict[str, Any]:
    """Stream every source row into the shards; return the manifest (not yet written)."""
    from tqdm.auto import tqdm

    out_schema = arrow_schema(cfg.task)
    writers = {s: ShardWriter(out_dir, s, out_schema, cfg.rows_per_shard, cfg.row_group_rows) for s in schema.SPLITS}
    tally = Tally(rejects=Rejects(rejects_log))
    identity = RowIdentity(reject_duplicate_content=cfg.duplicates == "reject")
    image_stats = ImageStats(processor_settings)
    hopeless = functools.partial(_hopeless, cfg, src.total_rows, tally)
    workers = available_cpus() if cfg.num_workers is None else cfg.num_workers

    bar = tqdm(total=src.total_rows, unit="row", desc="prepare-data", disable=not cfg.progress, mininterval=1.0)
    try:
        with ImagePool(workers, settings) as pool:
            # Giving up early only stops the reading (tally.stopped_early): the chunks still in the workers come
            # back and are counted, so the message's counts are exact.
            for chunk, results in pool.process(_normalised_rows(src, cfg, tally, hopeless)):
                for pending, (_, images) in zip(chunk, results):
                    row = _accept(pending, images, cfg, tally, identity, image_stats)
                    if row is not None and not tally.stopped_early:
                        writers[split_of(row["id"], cfg.eval_fraction, cfg.seed)].add(row)
                bar.update(len(chunk))
                if tally.rejects.by_reason:
                    bar.set_postfix_str(f"rejected={tally.rejects.count()}", refresh=False)
                if not tally.stopped_early and hopeless():
                    tally.stopped_early = True
    finally:
        bar.close()
    if tally.stopped_early:
        raise _too_many_invalid(cfg, source_uri, tally, early=True)

    split_files = {s: writers[s].close() for s in schema.SPLITS}
    _check_enough_valid_rows(cfg, tally, source_uri)
    invalid = tally.rejects.invalid()
    invalid_fraction = invalid / tally.rows_in
    all_files = [out_dir / f for s in schema.SPLITS for f in split_files[s]]
    return {
        "kind": schema.DATASET_KIND,
        "schema_version": 1,
        "task": cfg.task,
        "splits": {s: {"rows": writers[s].rows, "files": split_files[s]} for s in schema.SPLITS},
        "content_hash": content_hash(all_files),
        "counts": {
            "rows_in": tally.rows_in,
            "rows_out": tally.rows_out,
            "rejected": tally.rejects.count(),
            "invalid": invalid,
            "invalid_fraction": round(invalid_fraction, 6),
            "images_reencoded": image_stats.reencoded,
            "images_passed_through": image_stats.passed_through,
        },
        "rejects": tally.rejects.as_dict(),
        "rejects_file": REJECTS_FILE,
        "processor_settings": processor_settings,
        "images": image_stats.images_summary(settings.longest_edge),
        "tokens_per_image": image_stats.tokens_per_image(),
        "tokens_per_sample": image_stats.tokens_per_sample(),
        "schema": {name: str(out_schema.field(name).type) for name in out_schema.names},
        "config": to_dict(cfg),
        "warnings": [
            *src.notes,
            *([f"{invalid} of {tally.rows_in} rows invalid ({invalid_fraction:.1%}), within max_invalid_fraction="
               f"{cfg.max_invalid_fraction:.1%}; see rejects (every one in {REJECTS_FILE})"] if invalid else []),
            *image_stats.warnings(),
        ],
    }


def _normalised_rows(src, cfg, tally: Tally, hopeless) -> Iterator[PendingRow]:
    """Source rows in the chat form, their images not yet processed; unreadable and unmappable rows are
    counted as rejects and skipped. Stops reading once the run gives up (``tally.stopped_early``)."""
    root = src.root
    root_resolved = root.resolve()
    root_prefix = os.path.join(str(root_resolved), "")
    for index, raw in enumerate(iter_rows(src)):
        if tally.stopped_early:
            return
        tally.rows_in += 1
        label = raw.where.label
        if raw.row is None:
            tally.rejects.add(raw.reason, label, detail=raw.detail, where=raw.where)
        else:
            try:
                source_id, text, category, refs = normalize_row(raw.row, cfg, root, root_resolved)
            except RowRejected as e:
                found = raw.row.get(cfg.id_column) if cfg.id_column else None
                row_id = None if found is None or found == "" else str(found)
                tally.rejects.add(e.reason, row_id or label, detail=e.detail, row_id=row_id, where=raw.where)
            else:
                yield PendingRow(index, label, source_id, text, category, refs, image_names(refs, root_prefix), raw.where)
                continue
        if hopeless():
            tally.stopped_early = True
            return


def _accept(pending: PendingRow, images: list, cfg, tally: Tally, identity: RowIdentity,
            image_stats: ImageStats) -> dict[str, Any] | None:
    """The output row for a pending row and its processed images, or None when it is rejected (counted)."""
    example = pending.source_id or pending.label
    for name, image in zip(pending.image_names, images):
        if isinstance(image, tuple):  # (reason, detail): the image was rejected
            reason, detail = image
            tally.rejects.add(reason, example, detail=f"{name}: {detail}" if detail else name,
                              row_id=pending.source_id, where=pending.where)
            return None
    try:
        row_id = identity.assign(pending, images)
    except RowRejected as e:
        tally.rejects.add(e.reason, example, detail=e.detail, row_id=pending.source_id, where=pending.where)
        return None
    image_stats.add_row(images)
    tally.rows_out += 1
    return {
        "id": row_id,
        "images": [{"bytes": image.data, "path": None} for image in images],
        **pending.text,
        "category": pending.category,
    }


def _hopeless(cfg, total_rows: int | None, tally: Tally) -> bool:
    """Don't grind through a whole dataset that is bound to fail: give up when the invalid rows already exceed
    the limit for the known total, or the first EARLY_ROWS rows all failed (a wrong column mapping)."""
    invalid = tally.rejects.invalid()
    return bool((total_rows and invalid > cfg.max_invalid_fraction * total_rows) or (
        tally.rows_in >= EARLY_ROWS and invalid == tally.rows_in and cfg.max_invalid_fraction < 1.0
    ))


def _check_enough_valid_rows(cfg, tally: Tally, source_uri: str) -> None:
    if tally.rows_in == 0:
        summary = {"rows_in": 0, "rows_out": 0, "rejected": 0, "invalid": 0, "invalid_fraction": 0.0,
                   "images_reencoded": 0, "images_passed_through": 0}
        raise TooManyInvalidRowsError(f"source {source_uri!r} has no rows; nothing to prepare", {"counts": summary, "rejects": {}})
    if tally.rejects.invalid() / tally.rows_in > cfg.max_invalid_fraction or tally.rows_out == 0:
        raise _too_many_invalid(cfg, source_uri, tally, early=False)


def _too_many_invalid(cfg, source_uri: str, tally: Tally, early: bool) -> TooManyInvalidRowsError:
    rows_in, rejects = tally.rows_in, tally.rejects
    invalid = rejects.invalid()
    fraction = invalid / rows_in if rows_in else 0.0
    where = f"after the first {rows_in} rows (stopped early) " if early else ""
    reasons = ", ".join(
        f"{r}={e['count']} (e.g. {', '.join(e['examples'][:3])})" for r, e in rejects.as_dict().items()
    )
    hint = ""
    if any(r.startswith("column_not_found:") for r in rejects.by_reason):
        hint = " Some columns named by the config are not in the source: set the column mapping (--preset NAME or --set question_column=...)."
    return TooManyInvalidRowsError(
        f"{where}{invalid} of {rows_in} rows of {source_uri!r} are invalid ({fraction:.1%}), above "
        f"max_invalid_fraction={cfg.max_invalid_fraction:.1%}. Rejects by reason: {reasons}.{hint} Fix the source, "
        "check the column mapping (--preset / --set image_column=...), or raise --max-invalid-fraction to accept the loss.",
        {"counts": {"rows_in": rows_in, "rows_out": tally.rows_out, "rejected": rejects.count(), "invalid": invalid},
         "rejects": rejects.as_dict()},
        rejects.first,
    )
