"""The ``prepare-data`` step: a source dataset in, train/eval Parquet shards + ``manifest.json`` out.

``run(config, source, output)`` reads rows in any supported layout (``sources.py``), turns each into the
SmolVLM chat form of ``components.common.schema`` (``rows.py``), fixes and token-aware-resizes its images in
a process pool (``images.py``, ``parallel.py``), splits rows by a hash of their id, and streams them into
sharded Parquet (``components.common.dataset``). Every rejected row is counted with its reason in the
manifest and listed with its source position and a human detail in ``rejects.jsonl`` beside it
(``stats.py``); ``manifest.json`` is written last, so a crashed run leaves a folder that readers refuse.

Reads top to bottom: validate the config -> read the processor's settings -> open the source
(``remote_source.open_view``: a gs:// source is listed and only its row files downloaded; images come later,
fetched by the rows that name them; notes about files it does not read go to stderr and the manifest's
warnings) -> plan the work items -> clear the old output -> stream each item's rows into its part (normalise,
process images, split, write) -> finalize (dedupe across parts, rejects in source order into
``rejects.jsonl``, statistics, final shards) -> check the share of invalid rows -> write the manifest last. The mechanics are ``fanout.py``; ``plan`` / ``part`` / ``finalize``
below are the same steps one at a time, for a KFP ``ParallelFor`` (``vlmtune prepare-data plan|part|finalize``).

When the run gives up on too many invalid rows there is no manifest, by design; the message shows the first
rejected rows in full, and the whole list is left at ``OUTPUT/rejects.jsonl`` (a folder without a manifest,
so no later step takes it for a dataset).

    vlmtune prepare-data --source DIR_OR_URI --output DIR_OR_URI [--processor MODEL] [--set key=value]
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from components.common import artifacts, schema, storage
from components.common.config import ConfigError
from components.common.processor_settings import load_processor_settings
from components.prepare_data import fanout
from components.prepare_data.config import PrepareDataConfig
from components.prepare_data.fanout import FanoutError, TooManyInvalidRowsError  # noqa: F401 (the step's errors)
from components.prepare_data.remote_source import open_view

REJECTS_FILE = fanout.REJECTS_FILE  # one JSON line per rejected row, beside manifest.json
PARTS_DIR = "_parts"  # core.run's part folders, inside the staging folder; gone before the manifest


def _checked(config: PrepareDataConfig) -> PrepareDataConfig:
    cfg = config.resolved()
    problems = cfg.validate()
    if problems:
        raise ConfigError("invalid PrepareDataConfig:\n  - " + "\n  - ".join(problems))
    return cfg


@contextlib.contextmanager
def _open(cfg: PrepareDataConfig, source: str):
    """The opened source of ``source`` for the block: a local one as it is, a gs:// one listed, its row files
    downloaded and its images fetched by the rows that reference them (``remote_source.py``)."""
    with open_view(source, cfg.source_split, cfg.image_column) as src:
        for note in src.notes:  # now, not only in the manifest: the run may still fail for another reason
            print(f"prepare-data: note: {note}", file=sys.stderr)
        yield src


def _check_output_outside_source(output: str, source: str, src) -> None:
    if storage.is_remote(source):  # src.root is a temp mirror: compare the URIs
        out, within = output.rstrip("/"), source.rstrip("/")
        if out == within or out.startswith(within + "/") or within.startswith(out + "/"):
            raise ConfigError(
                f"output {output!r} is the source folder {source!r}, inside it or holds it; writing there would "
                f"overwrite the source. Pass a separate --output folder."
            )
    elif not storage.is_remote(output):
        out_path = storage.to_local_path(output).resolve()
        if out_path == src.root.resolve() or out_path in src.root.resolve().parents:
            raise ConfigError(
                f"output {output!r} is the source folder or holds it; writing there would overwrite the "
                f"source. Pass a separate --output folder."
            )


def run(config: PrepareDataConfig, source: str, output: str, *, shards: int = 1) -> dict[str, Any]:
    """Prepare ``source`` into a dataset artifact at ``output``; returns the manifest that was written.

    The one-container shape of the step, and the same code as the fanned-out one: plan ``shards`` items, run
    every item here, one after the other, then finalize (the output does not depend on ``shards``).

    Raises ConfigError (bad config/processor), SourceError / FileNotFoundError (unreadable source) and
    TooManyInvalidRowsError (share of invalid rows above ``max_invalid_fraction``); none of them leave a
    manifest behind.
    """
    cfg = _checked(config)
    started = time.time()
    processor_settings = load_processor_settings(cfg.processor, cfg.longest_edge, cfg.image_sizing) if cfg.processor else None
    with _open(cfg, source) as src:
        _check_output_outside_source(output, source, src)
        the_plan = fanout.make_plan(cfg, source, src, processor_settings, shards)
        _clear_output(output)
        # local_output stages into a fresh folder and publishes it (manifest last) only if the body succeeds.
        with storage.local_output(output) as out_dir:
            parts = []
            for entry in the_plan["items"]:
                part_dir = Path(out_dir) / PARTS_DIR / f"item-{entry['item']:05d}"
                part_dir.mkdir(parents=True)
                try:
                    manifest = fanout.process_item(the_plan, entry["item"], src, part_dir)
                except TooManyInvalidRowsError as e:  # gave up early: leave the rejects read so far
                    dirs = [d for _, d in parts] + [part_dir]
                    staged = Path(out_dir) / REJECTS_FILE
                    with open(staged, "w", encoding="utf-8") as log:
                        fanout.replay_rejects([ev for d in dirs for ev in fanout.part_reject_events(d)], log)
                    e.rejects_file = _leave_rejects_list(staged, output)
                    raise
                parts.append((manifest, part_dir))
            manifest = _finalize_into(the_plan, parts, Path(out_dir), output, move=True)
            shutil.rmtree(Path(out_dir) / PARTS_DIR)
            manifest["seconds"] = round(time.time() - started, 2)
            manifest["source"] = source
            manifest = artifacts.write_manifest(str(out_dir), manifest)  # last act: the folder is now complete
    return manifest


def plan(config: PrepareDataConfig, source: str, plan_uri: str, *, shards: int) -> dict[str, Any]:
    """Step 1 of the fanned-out shape: list the work items of ``source`` into the plan file ``plan_uri``
    (JSON). Reads the source's row files, decodes no image; a gs:// source is listed and only its row files
    are downloaded (never an image)."""
    cfg = _checked(config)
    processor_settings = load_processor_settings(cfg.processor, cfg.longest_edge, cfg.image_sizing) if cfg.processor else None
    with _open(cfg, source) as src:
        the_plan = fanout.make_plan(cfg, source, src, processor_settings, shards)
    storage.write_text(plan_uri, json.dumps(the_plan, indent=2, sort_keys=True, default=str))
    return the_plan


def read_plan(plan_uri: str) -> dict[str, Any]:
    try:
        text = storage.read_text(plan_uri)
    except FileNotFoundError as e:
        raise FanoutError(f"plan {plan_uri!r} does not exist; write it with `vlmtune prepare-data plan`") from e
    try:
        return fanout.check_plan(json.loads(text), repr(plan_uri))
    except json.JSONDecodeError as e:
        raise FanoutError(f"plan {plan_uri!r} is not JSON ({e.msg}); write it with `vlmtune prepare-data plan`") from e


def part(plan_uri: str, item: int, part_uri: str) -> dict[str, Any]:
    """Step 2 (one ParallelFor item): the part of ``item`` at ``part_uri``, its ``part.json`` written last. A
    rerun first removes whatever an earlier, killed attempt left there. From a gs:// source it downloads the
    row files and only the images its own rows reference."""
    the_plan = read_plan(plan_uri)
    cfg = fanout.plan_config(the_plan)
    _clear_folder(part_uri)
    with _open(cfg, the_plan["source"]) as src:
        with storage.local_output(part_uri, last=(fanout.PART_MANIFEST,)) as part_dir:
            manifest = fanout.process_item(the_plan, item, src, Path(part_dir))
            storage.write_text(str(Path(part_dir) / fanout.PART_MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def finalize(plan_uri: str, part_uris: list[str], output: str) -> dict[str, Any]:
    """Step 3: every item's part into the dataset at ``output``, its manifest written last. Refuses (FanoutError,
    naming the items) unless every plan item has a finished part."""
    started = time.time()
    the_plan = read_plan(plan_uri)
    with contextlib.ExitStack() as stack:
        local_parts = []
        for uri in part_uris:
            try:
                local_parts.append(stack.enter_context(storage.local_input(uri)))
            except FileNotFoundError:  # never published (killed before its end): unfinished, named as such
                local_parts.append(Path(storage.to_local_path(uri)) if not storage.is_remote(uri) else Path("/nonexistent-part"))
        parts = fanout.match_parts(the_plan, [Path(p) for p in local_parts], list(part_uris))
        _clear_output(output)
        with storage.local_output(output) as out_dir:
            manifest = _finalize_into(the_plan, parts, Path(out_dir), output, move=False)
            manifest["seconds"] = round(time.time() - started, 2)
            manifest["source"] = the_plan["source"]
            manifest = artifacts.write_manifest(str(out_dir), manifest)
    return manifest


def _finalize_into(the_plan, parts, out_dir: Path, output: str, *, move: bool) -> dict[str, Any]:
    # rejects.jsonl is staged with the shards: published before the manifest, never complete alone.
    rejects_path = out_dir / REJECTS_FILE
    try:
        with open(rejects_path, "w", encoding="utf-8") as rejects_log:
            return fanout.merge_parts(the_plan, parts, out_dir, rejects_log, move=move)
    except TooManyInvalidRowsError as e:
        e.rejects_file = _leave_rejects_list(rejects_path, output)
        raise


def _clear_folder(uri: str) -> None:
    """Remove everything at ``uri`` (a part folder about to be rewritten): its marker first."""
    storage.delete(storage.join(uri, fanout.PART_MANIFEST))
    if storage.is_remote(uri):
        for found in storage.list_files(uri):
            storage.delete(found)
    else:
        shutil.rmtree(storage.to_local_path(uri), ignore_errors=True)


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
