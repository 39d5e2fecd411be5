"""KFP component for prepare-data: the body only calls the core. Imports live inside the function because
only its source travels into the container. ``reported_failure`` prints the step's exit status (2 bad input,
3 too many invalid rows, 1 a bug) in a line `vlmtune run` reads."""
from kfp import dsl
from kfp.dsl import Dataset, Output


def prepare_data(source: str, task: str, processor: str, config: dict, dataset: Output[Dataset]):
    from components.common.cli import EXIT_DATA, ErrorRule, reported_failure
    from components.common.config import build_config
    from components.common.snapshots import resolve_snapshot
    from components.prepare_data.config import PrepareDataConfig
    from components.prepare_data.core import TooManyInvalidRowsError, run

    with reported_failure(rules=(ErrorRule((TooManyInvalidRowsError,), EXIT_DATA),)):
        settings = build_config(PrepareDataConfig, {**config, "task": task, "processor": processor or None})
        # A scheduled run names "the newest snapshot" ({date} placeholder or a LATEST pointer); resolve it now.
        resolved = resolve_snapshot(source)
        manifest = run(settings, resolved, dataset.path)
    # Strings only: kfp.local's cache key includes input-artifact metadata, and a number read back from the
    # cache as 119.0 instead of 119 would make every downstream step miss the cache.
    dataset.metadata.update({"task": task, "source": resolved, "content_hash": str(manifest.get("content_hash")),
                             **{f"{s}_rows": str(v.get("rows")) for s, v in manifest.get("splits", {}).items()}})
