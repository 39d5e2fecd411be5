"""KFP component for DPO: the body only calls the core (``reported_failure``: the exit status `vlmtune run` shows)."""
from typing import Optional

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def dpo(dataset: Input[Dataset], sft_model: Input[Model], config: dict, checkpoint_uri: str,
        model: Output[Model], metrics: Output[Metrics], sft_dataset: Optional[Input[Dataset]] = None):
    """``sft_dataset``: the SFT data, used only with ``pairs_from_sft_mistakes`` (pairs from the SFT model's
    wrong answers on its train split)."""
    import json

    from components.common.cli import EXIT_DATA, ErrorRule, reported_failure
    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.common.training.collator import TooManyRowsOverBudgetError
    from components.dpo.core import run

    with reported_failure(rules=(ErrorRule((TooManyRowsOverBudgetError,), EXIT_DATA),)):
        settings = build_config(DPOStepConfig, dict(config))
        if settings.nodes > 1:
            # One multi-node job on the engine this pipeline runs on (set by `vlmtune compile`), the same CLI on every
            # node; it publishes the model at this artifact's URI and this step hands on its manifest.
            from components.common.launch import launch_training

            inputs = [("--dataset", dataset.uri), ("--sft-model", sft_model.uri)]
            if sft_dataset is not None and settings.pairs_from_sft_mistakes:
                inputs.append(("--sft-dataset", sft_dataset.uri))
            manifest = launch_training("dpo", dict(config), settings.nodes, settings.gpus_per_node, inputs=inputs,
                                       output_uri=model.uri, checkpoint_uri=checkpoint_uri or None)
        else:
            manifest = run(settings, dataset.path, sft_model.path, model.path, checkpoint_uri or None,
                           sft_dataset.path if sft_dataset is not None else None)
    model.metadata.update({"stage": "dpo", "base_model": manifest["base_model"], "content_hash": manifest["content_hash"]})
    for key, value in manifest["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    # Give the Metrics artifact a file: kfp.local treats an output whose file is missing as a cache miss, which
    # would re-run this step (and everything after it) on every run.
    with open(metrics.path, "w") as f:
        json.dump(manifest["metrics"], f, indent=2)
