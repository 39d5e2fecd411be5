"""KFP component for prepare-data: the body only calls the core. Imports live inside the function because
only its source travels into the container."""
from kfp import dsl
from kfp.dsl import Dataset, Output


def prepare_data(source: str, task: str, processor: str, config: dict, dataset: Output[Dataset]):
    from components.common.config import build_config
    from components.prepare_data.config import PrepareDataConfig
    from components.prepare_data.core import run

    settings = build_config(PrepareDataConfig, {**config, "task": task, "processor": processor or None})
    manifest = run(settings, source, dataset.path)
    dataset.metadata.update({"task": task, "content_hash": manifest.get("content_hash"),
                             "rows": {s: v.get("rows") for s, v in manifest.get("splits", {}).items()}})
