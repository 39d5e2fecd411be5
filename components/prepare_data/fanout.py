"""prepare-data as plan -> parts -> finalize: the mechanics both shapes of the step share.

- :func:`make_plan` lists the work items: contiguous ranges of the source's rows (in the order the source
  readers yield them), plus what every item needs (the resolved config, the processor's settings, the
  total row count). It reads row files only; no image is decoded.
- :func:`process_item` turns one item's rows into a *part* folder: ``train/`` and ``eval/`` shards (the split
  is a pure function of the row id), ``rows.jsonl`` (per written row: its source index, id, content key and
  the facts of its images, what finalize needs to dedupe and to count), ``rejects.jsonl`` (per rejected row,
  with its source index) and ``part.json``, written LAST: a part without it is unfinished and never taken.
- :func:`merge_parts` is finalize: it checks every item of the plan has a finished part, replays dedup
  (``rows.RowIdentity``) and the image/token statistics (``stats.ImageStats.add_row`` on the recorded facts)
  over all parts in source order, orders the rejects by source position, and writes the final shards in
  source order with the same ``ShardWriter``. Shards, split and content hash therefore do not depend on how
  many items the plan had: ``shards=3`` writes the bytes ``shards=1`` writes.

``core.run`` is plan + every item in one process + finalize; the KFP pipeline runs the same functions as
three components with a ``dsl.ParallelFor`` over the items (``core.plan`` / ``core.part`` / ``core.finalize``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import IO, Any, Iterator

from components.common import schema
from components.common.config import to_dict
from components.common.dataset import ShardWriter, arrow_schema, content_hash
from components.prepare_data import images as imagelib
from components.prepare_data.config import PrepareDataConfig
from components.prepare_data.parallel import ImagePool, available_cpus
from components.prepare_data.rows import PendingRow, RowIdentity, RowRejected, image_names, normalize_row, row_keys, split_of
from components.prepare_data.sources import Where, iter_rows
from components.prepare_data.stats import ImageStats, Rejects, describe_reject

PLAN_KIND = "vlmtune.prepare_plan"
PART_KIND = "vlmtune.prepare_part"
PART_MANIFEST = "part.json"  # written last: a part folder without it is unfinished
ROWS_FILE = "rows.jsonl"
REJECTS_FILE = "rejects.jsonl"
EARLY_ROWS = 1000  # if this many rows in a row are all invalid, stop: the column mapping is wrong


class FanoutError(RuntimeError):
    """The parts handed to finalize do not complete the plan (an item unfinished or missing, a part of another
    plan). The message names the items and what to rerun."""


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


# ----------------------------------------------------------------------------------------------------------
# Plan.


def make_plan(cfg: PrepareDataConfig, source_uri: str, src, processor_settings: dict | None, shards: int) -> dict[str, Any]:
    """The plan of a run: ``shards`` contiguous row ranges of ``src`` (fewer when it has fewer rows; at least
    one), with everything a part needs. ``cfg`` is resolved and valid."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"shards={shards!r}: the number of work items must be an integer >= 1 (1 = one container)")
    total = src.total_rows if src.total_rows is not None else sum(1 for _ in iter_rows(src))
    n_items = max(1, min(shards, total))
    bounds = [total * i // n_items for i in range(n_items + 1)]
    plan = {
        "kind": PLAN_KIND,
        "source": source_uri,
        "config": to_dict(cfg),
        "processor_settings": processor_settings,
        "total_rows": total,
        "notes": list(src.notes),
        "items": [{"item": i, "start": bounds[i], "stop": bounds[i + 1]} for i in range(n_items)],
    }
    plan["plan_id"] = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return plan


def check_plan(plan: Any, where: str) -> dict[str, Any]:
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or not plan.get("items"):
        raise FanoutError(f"{where} is not a prepare-data plan (kind {PLAN_KIND!r} with items); pass the file "
                          f"`vlmtune prepare-data plan --plan ...` wrote")
    return plan


def plan_config(plan: dict[str, Any]) -> PrepareDataConfig:
    """The plan's config (already resolved from its preset when the plan was made)."""
    return PrepareDataConfig(**plan["config"])


def image_settings(cfg: PrepareDataConfig, processor_settings: dict | None) -> imagelib.ImageSettings:
    target_edge = processor_settings["size"]["longest_edge"] if processor_settings else cfg.longest_edge
    return imagelib.ImageSettings(target_edge, cfg.max_image_pixels, cfg.image_format, cfg.jpeg_quality)


# ----------------------------------------------------------------------------------------------------------
# Part: one item's rows.


class PartRejects:
    """A part's rejected rows: counted (a ``Rejects`` without a log, for the give-up checks) and written to the
    part's ``rejects.jsonl`` with their source index, so finalize can put every part's in source order."""

    def __init__(self, log: IO[str]):
        self.log = log
        self.counts = Rejects()

    def add(self, index: int, reason: str, example: str, *, detail: str | None = None, row_id: str | None = None,
            where: Where | None = None) -> None:
        self.counts.add(reason, example, detail=detail, row_id=row_id, where=where)
        self.log.write(json.dumps({"i": index, "reason": reason, "example": example, "detail": detail or None,
                                   "row_id": row_id, "where": dataclasses.asdict(where) if where else None},
                                  ensure_ascii=False) + "\n")


@dataclasses.dataclass
class Tally:
    """Rows read and rows written so far; ``stopped_early``: the part gave up, no more rows are read."""

    rejects: PartRejects
    rows_in: int = 0
    rows_out: int = 0
    stopped_early: bool = False


def process_item(plan: dict[str, Any], item: int, src, out_dir: Path) -> dict[str, Any]:
    """Write the part of ``item`` into ``out_dir`` (its shards, rows.jsonl, rejects.jsonl); return the part
    manifest, which the caller writes last (``PART_MANIFEST``)."""
    from tqdm.auto import tqdm

    cfg = plan_config(plan)
    entry = next((e for e in plan["items"] if e["item"] == item), None)
    if entry is None:
        raise FanoutError(f"item {item} is not in the plan (its items are 0..{len(plan['items']) - 1})")
    settings = image_settings(cfg, plan["processor_settings"])
    out_schema = arrow_schema(cfg.task)
    writers = {s: ShardWriter(out_dir, s, out_schema, cfg.rows_per_shard, cfg.row_group_rows) for s in schema.SPLITS}
    workers = available_cpus() if cfg.num_workers is None else cfg.num_workers
    start, stop = entry["start"], entry["stop"]
    with open(out_dir / REJECTS_FILE, "w", encoding="utf-8") as rejects_log, \
            open(out_dir / ROWS_FILE, "w", encoding="utf-8") as rows_log:
        tally = Tally(PartRejects(rejects_log))
        hopeless = functools.partial(_hopeless, cfg, plan["total_rows"], tally)
        bar = tqdm(total=stop - start, unit="row", desc=f"prepare-data item {item}", disable=not cfg.progress,
                   mininterval=1.0)
        try:
            with ImagePool(workers, settings) as pool:
                # Giving up early only stops the reading: the chunks still in the workers come back and are
                # counted, so the message's counts are exact.
                for chunk, results in pool.process(_normalised_rows(src, cfg, start, stop, tally, hopeless)):
                    for pending, (_, images) in zip(chunk, results):
                        _accept(pending, images, tally, writers, rows_log, cfg)
                    bar.update(len(chunk))
                    if not tally.stopped_early and hopeless():
                        tally.stopped_early = True
        finally:
            bar.close()
    if tally.stopped_early:
        raise too_many_invalid(cfg, plan["source"], tally.rows_in, tally.rows_out, tally.rejects.counts, early=True)
    files = {s: writers[s].close() for s in schema.SPLITS}
    return {
        "kind": PART_KIND,
        "plan_id": plan["plan_id"],
        "item": item,
        "start": start,
        "stop": stop,
        "counts": {"rows_in": tally.rows_in, "rows_out": tally.rows_out, "rejected": tally.rejects.counts.count(),
                   "invalid": tally.rejects.counts.invalid()},
        "rejects": tally.rejects.counts.as_dict(),
        "splits": {s: {"rows": writers[s].rows, "files": files[s]} for s in schema.SPLITS},
        "rows_file": ROWS_FILE,
        "rejects_file": REJECTS_FILE,
    }


def _normalised_rows(src, cfg, start: int, stop: int, tally: Tally, hopeless) -> Iterator[PendingRow]:
    """The item's source rows (indices start..stop-1) in the chat form, images not yet processed; unreadable and
    unmappable rows are counted as rejects and skipped. Stops reading once the part gives up."""
    root = src.root
    root_resolved = root.resolve()
    root_prefix = os.path.join(str(root_resolved), "")
    # fetch_images: a gs:// source downloads the images these rows name, a batch ahead of the reading (the
    # rows are still counted here, one by one, so the counts are those of a local source); locally a no-op.
    for index, raw in enumerate(src.fetch_images(itertools.islice(iter_rows(src), start, stop)), start=start):
        if tally.stopped_early:
            return
        tally.rows_in += 1
        label = raw.where.label
        if raw.row is None:
            tally.rejects.add(index, raw.reason, label, detail=raw.detail, where=raw.where)
        else:
            try:
                source_id, text, category, refs = normalize_row(raw.row, cfg, root, root_resolved)
            except RowRejected as e:
                found = raw.row.get(cfg.id_column) if cfg.id_column else None
                row_id = None if found is None or found == "" else str(found)
                tally.rejects.add(index, e.reason, row_id or label, detail=e.detail, row_id=row_id, where=raw.where)
            else:
                yield PendingRow(index, label, source_id, text, category, refs, image_names(refs, root_prefix), raw.where)
                continue
        if hopeless():
            tally.stopped_early = True
            return


def _accept(pending: PendingRow, images: list, tally: Tally, writers: dict, rows_log: IO[str], cfg) -> None:
    """Write a row whose images all came through (else count its reject). Dedup is finalize's: it needs every
    part's rows, so the row goes to its split's shard with its keys in rows.jsonl."""
    example = pending.source_id or pending.label
    for name, image in zip(pending.image_names, images):
        if isinstance(image, tuple):  # (reason, detail): the image was rejected
            reason, detail = image
            tally.rejects.add(pending.index, reason, example, detail=f"{name}: {detail}" if detail else name,
                              row_id=pending.source_id, where=pending.where)
            return
    tally.rows_out += 1
    if tally.stopped_early:  # counted (the failure's counts are exact), not written: the part is failing
        return
    content_key, row_id = row_keys(pending, images)
    split = split_of(row_id, cfg.eval_fraction, cfg.seed)
    rows_log.write(json.dumps({
        "i": pending.index, "split": split, "id": row_id, "content": content_key, "example": example,
        "source_id": pending.source_id, "where": dataclasses.asdict(pending.where) if pending.where else None,
        # Every fact of the image but its bytes: finalize replays ImageStats.add_row on them, so fields added to
        # ProcessedImage reach the statistics without this module knowing them.
        "images": [{k: v for k, v in dataclasses.asdict(image).items() if k != "data"} for image in images],
    }, ensure_ascii=False) + "\n")
    writers[split].add({
        "id": row_id,
        "images": [{"bytes": image.data, "path": None} for image in images],
        **pending.text,
        "category": pending.category,
    })


def _hopeless(cfg, total_rows: int | None, tally: Tally) -> bool:
    """Don't grind through a dataset that is bound to fail: give up when this part's invalid rows already exceed
    the limit for the whole source (so the whole run must fail), or the first EARLY_ROWS rows all failed (a
    wrong column mapping)."""
    invalid = tally.rejects.counts.invalid()
    return bool((total_rows and invalid > cfg.max_invalid_fraction * total_rows) or (
        tally.rows_in >= EARLY_ROWS and invalid == tally.rows_in and cfg.max_invalid_fraction < 1.0
    ))


# ----------------------------------------------------------------------------------------------------------
# Finalize: every part into one dataset.


def read_part_manifest(part_dir: Path) -> dict[str, Any] | None:
    """The part manifest of a part folder, or None when the item did not finish (no part.json)."""
    path = part_dir / PART_MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("kind") != PART_KIND:
        raise FanoutError(f"{path} is not a prepare-data part manifest (kind {manifest.get('kind')!r})")
    return manifest


def match_parts(plan: dict[str, Any], part_dirs: list[Path], shown: list[str]) -> list[tuple[dict, Path]]:
    """(part manifest, folder) for every plan item, in item order. Raises FanoutError naming every item without
    a finished part of this plan: a folder without part.json (killed mid-write) is never taken."""
    by_item: dict[int, tuple[dict, Path]] = {}
    unfinished, foreign = [], []
    for part_dir, name in zip(part_dirs, shown):
        manifest = read_part_manifest(part_dir)
        if manifest is None:
            unfinished.append(name)
        elif manifest.get("plan_id") != plan["plan_id"]:
            foreign.append(f"{name} (item {manifest.get('item')} of plan {manifest.get('plan_id')})")
        else:
            by_item[manifest["item"]] = (manifest, part_dir)
    missing = [e["item"] for e in plan["items"] if e["item"] not in by_item]
    if missing or foreign:
        lines = [f"finalize needs one finished part per plan item (plan {plan['plan_id']}, "
                 f"{len(plan['items'])} items); item(s) {missing or 'none'} have none."]
        if unfinished:
            lines.append(f"Unfinished parts (no {PART_MANIFEST}: the item was killed mid-write): {', '.join(unfinished)}.")
        if foreign:
            lines.append(f"Parts of another plan, not taken: {', '.join(foreign)}.")
        lines.append("Rerun each missing item (`vlmtune prepare-data part --plan PLAN --item N --output PART`; in the "
                     "pipeline KFP retries the item), then finalize again.")
        raise FanoutError(" ".join(lines))
    return [by_item[e["item"]] for e in plan["items"]]


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def merge_parts(plan: dict[str, Any], parts: list[tuple[dict, Path]], out_dir: Path, rejects_log: IO[str], *,
                move: bool = False) -> dict[str, Any]:
    """Finalize: the parts (from :func:`match_parts`) into ``out_dir``'s train/eval shards and ``rejects_log``;
    returns the dataset manifest (not yet written). ``move``: the part folders may be consumed (one process)."""
    cfg = plan_config(plan)
    processor_settings = plan["processor_settings"]
    identity = RowIdentity(reject_duplicate_content=cfg.duplicates == "reject")
    image_stats = ImageStats(processor_settings)
    events: list[dict[str, Any]] = []
    keep: list[dict[str, list[bool]]] = []
    rows_in = rows_out = 0
    # Source order across parts: items are contiguous ranges, in item order, so the first of two repeats is
    # the first kept, exactly as in one pass.
    for manifest, part_dir in parts:
        rows_in += manifest["counts"]["rows_in"]
        events.extend(_jsonl(part_dir / manifest["rejects_file"]))
        masks: dict[str, list[bool]] = {s: [] for s in schema.SPLITS}
        for rec in _jsonl(part_dir / manifest["rows_file"]):
            try:
                identity.check(rec["content"], rec["id"])
            except RowRejected as e:
                events.append({"i": rec["i"], "reason": e.reason, "example": rec["example"], "detail": e.detail,
                               "row_id": rec["source_id"], "where": rec["where"]})
                masks[rec["split"]].append(False)
                continue
            image_stats.add_row([types.SimpleNamespace(**facts) for facts in rec["images"]])
            rows_out += 1
            masks[rec["split"]].append(True)
        keep.append(masks)
    rejects = replay_rejects(events, rejects_log)

    _check_enough_valid_rows(cfg, plan["source"], rows_in, rows_out, rejects)
    out_schema = arrow_schema(cfg.task)
    split_info = {}
    for split in schema.SPLITS:
        split_info[split] = _write_split(cfg, out_schema, split, parts, [m[split] for m in keep], out_dir, move)
    invalid = rejects.invalid()
    invalid_fraction = invalid / rows_in
    all_files = [out_dir / f for s in schema.SPLITS for f in split_info[s]["files"]]
    return {
        "kind": schema.DATASET_KIND,
        "schema_version": 1,
        "task": cfg.task,
        "splits": split_info,
        "content_hash": content_hash(all_files),
        "counts": {
            "rows_in": rows_in,
            "rows_out": rows_out,
            "rejected": rejects.count(),
            "invalid": invalid,
            "invalid_fraction": round(invalid_fraction, 6),
            "images_reencoded": image_stats.reencoded,
            "images_passed_through": image_stats.passed_through,
        },
        "rejects": rejects.as_dict(),
        "rejects_file": REJECTS_FILE,
        "processor_settings": processor_settings,
        "images": image_stats.images_summary(image_settings(cfg, processor_settings).longest_edge),
        "tokens_per_image": image_stats.tokens_per_image(),
        "tokens_per_sample": image_stats.tokens_per_sample(),
        "schema": {name: str(out_schema.field(name).type) for name in out_schema.names},
        "config": to_dict(cfg),
        "items": len(parts),
        "warnings": [
            *plan["notes"],
            *([f"{invalid} of {rows_in} rows invalid ({invalid_fraction:.1%}), within max_invalid_fraction="
               f"{cfg.max_invalid_fraction:.1%}; see rejects (every one in {REJECTS_FILE})"] if invalid else []),
            *image_stats.warnings(),
        ],
    }


def replay_rejects(events: list[dict[str, Any]], log: IO[str] | None) -> Rejects:
    """Reject events of parts (and finalize's own) in source order into a ``Rejects``: counts, examples and
    ``rejects.jsonl`` lines come out the same however many parts the rows went through."""
    rejects = Rejects(log)
    for e in sorted(events, key=lambda e: e["i"]):  # stable: a row has at most one reject
        rejects.add(e["reason"], e["example"], detail=e["detail"], row_id=e["row_id"],
                    where=Where(**e["where"]) if e["where"] else None)
    return rejects


def part_reject_events(part_dir: Path) -> list[dict[str, Any]]:
    """The reject events a part wrote so far (also of a part that gave up, for the failure's rejects list)."""
    path = part_dir / REJECTS_FILE
    return list(_jsonl(path)) if path.is_file() else []


def _write_split(cfg, out_schema, split: str, parts: list[tuple[dict, Path]], masks: list[list[bool]],
                 out_dir: Path, move: bool) -> dict[str, Any]:
    """One split of the dataset from the parts' shards of that split, in source order, minus the rows finalize
    rejected. One part with nothing dropped already holds exactly these shards (same writer, same settings):
    they are moved (or copied) instead of rewritten."""
    import pyarrow.parquet as pq

    if len(parts) == 1 and all(masks[0]):
        manifest, part_dir = parts[0]
        files = manifest["splits"][split]["files"]
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for rel in files:
            (shutil.move if move else shutil.copyfile)(part_dir / rel, out_dir / rel)
        return {"rows": manifest["splits"][split]["rows"], "files": files}
    writer = ShardWriter(out_dir, split, out_schema, cfg.rows_per_shard, cfg.row_group_rows)
    for (manifest, part_dir), mask in zip(parts, masks):
        kept = iter(mask)
        for rel in manifest["splits"][split]["files"]:
            for batch in pq.ParquetFile(part_dir / rel).iter_batches(batch_size=cfg.row_group_rows):
                for row in batch.to_pylist():
                    if next(kept):
                        writer.add(row)
        if next(kept, None) is not None:
            raise FanoutError(f"part {part_dir}: rows.jsonl lists more {split} rows than its shards hold; the part is "
                              f"damaged, rerun item {manifest['item']}")
    files = writer.close()
    return {"rows": writer.rows, "files": files}


# ----------------------------------------------------------------------------------------------------------
# Giving up on too many invalid rows (parts and finalize).


def _check_enough_valid_rows(cfg, source_uri: str, rows_in: int, rows_out: int, rejects: Rejects) -> None:
    if rows_in == 0:
        summary = {"rows_in": 0, "rows_out": 0, "rejected": 0, "invalid": 0, "invalid_fraction": 0.0,
                   "images_reencoded": 0, "images_passed_through": 0}
        raise TooManyInvalidRowsError(f"source {source_uri!r} has no rows; nothing to prepare", {"counts": summary, "rejects": {}})
    if rejects.invalid() / rows_in > cfg.max_invalid_fraction or rows_out == 0:
        raise too_many_invalid(cfg, source_uri, rows_in, rows_out, rejects, early=False)


def too_many_invalid(cfg, source_uri: str, rows_in: int, rows_out: int, rejects: Rejects,
                     early: bool) -> TooManyInvalidRowsError:
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
        {"counts": {"rows_in": rows_in, "rows_out": rows_out, "rejected": rejects.count(), "invalid": invalid},
         "rejects": rejects.as_dict()},
        rejects.first,
    )


def progress_note(message: str) -> None:
    print(f"prepare-data: {message}", file=sys.stderr)
