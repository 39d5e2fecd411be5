"""KFP component for prepare-data: the body only calls the core. Imports live inside the function because
only its source travels into the container. ``reported_failure`` prints the step's exit status (2 bad input,
3 too many invalid rows, 1 a bug) in a line `vlmtune run` reads."""
from typing import List  # no `from __future__ import annotations`: kfp reads real annotations

from kfp import dsl  # noqa: F401
from kfp.dsl import Artifact, Dataset, Input, Output


def prepare_data(source: str, task: str, processor: str, config: dict, dataset: Output[Dataset], shards: int = 1):
    from components.common.cli import EXIT_DATA, ErrorRule, reported_failure
    from components.common.config import build_config
    from components.common.snapshots import resolve_snapshot
    from components.prepare_data.config import PrepareDataConfig
    from components.prepare_data.core import TooManyInvalidRowsError, run

    with reported_failure(rules=(ErrorRule((TooManyInvalidRowsError,), EXIT_DATA),)):
        settings = build_config(PrepareDataConfig, {**config, "task": task, "processor": processor or None})
        # A scheduled run names "the newest snapshot" ({date} placeholder or a LATEST pointer); resolve it now.
        resolved = resolve_snapshot(source)
        manifest = run(settings, resolved, dataset.path, shards=shards)  # items in-process: same dataset
    # Strings only: kfp.local's cache key includes input-artifact metadata, and a number read back from the
    # cache as 119.0 instead of 119 would make every downstream step miss the cache.
    dataset.metadata.update({"task": task, "source": resolved, "content_hash": str(manifest.get("content_hash")),
                             **{f"{s}_rows": str(v.get("rows")) for s, v in manifest.get("splits", {}).items()}})


# The fanned-out shape: plan -> dsl.ParallelFor(items) of part -> finalize (pipelines/pipeline.py wires them).
# Same core functions as `prepare_data` above (core.run is plan + every part + finalize in one process).


def prepare_data_plan(source: str, task: str, processor: str, config: dict, shards: int,
                      plan: Output[Artifact]) -> List[int]:
    """The work items of ``source`` (the ParallelFor's list) and the plan file every part reads."""
    from components.common.cli import ErrorRule, reported_failure
    from components.common.config import build_config
    from components.common.snapshots import resolve_snapshot
    from components.prepare_data import core
    from components.prepare_data.config import PrepareDataConfig

    with reported_failure(rules=(ErrorRule((core.FanoutError,), 2),)):
        settings = build_config(PrepareDataConfig, {**config, "task": task, "processor": processor or None})
        made = core.plan(settings, resolve_snapshot(source), plan.path, shards=shards)
    return [entry["item"] for entry in made["items"]]


def prepare_data_part(plan: Input[Artifact], item: int, part: Output[Dataset]):
    """One item's part folder (``part.json`` last). A retry reruns this item alone and overwrites its part."""
    from components.common.cli import EXIT_DATA, ErrorRule, reported_failure
    from components.prepare_data import core

    with reported_failure(rules=(ErrorRule((core.TooManyInvalidRowsError,), EXIT_DATA), ErrorRule((core.FanoutError,), 2))):
        manifest = core.part(plan.path, item, part.path)
    part.metadata.update({"item": str(item), "rows_out": str(manifest["counts"]["rows_out"])})


def prepare_data_finalize(plan: Input[Artifact], parts: Input[List[Dataset]], task: str, dataset: Output[Dataset]):
    """Every part into the one dataset artifact, its manifest written last (refused unless every item finished)."""
    from components.common.cli import EXIT_DATA, ErrorRule, reported_failure
    from components.prepare_data import core

    with reported_failure(rules=(ErrorRule((core.TooManyInvalidRowsError,), EXIT_DATA), ErrorRule((core.FanoutError,), 2))):
        manifest = core.finalize(plan.path, [p.path for p in parts], dataset.path)
    dataset.metadata.update({"task": task, "source": str(manifest.get("source")),
                             "content_hash": str(manifest.get("content_hash")),
                             **{f"{s}_rows": str(v.get("rows")) for s, v in manifest.get("splits", {}).items()}})
