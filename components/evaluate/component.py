"""KFP component for evaluate: the body only calls the core.

It returns `passed` as its single return value (the `Output` parameter): kfp.local resolves a `dsl.If` on a
task's `Output` but not on a named output of a NamedTuple, so a single bool is what works everywhere.
"""
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(dataset: Input[Dataset], preference_dataset: Input[Dataset], sft_model: Input[Model], dpo_model: Input[Model], config: dict,
             registry: str, registry_name: str, evaluation: Output[Artifact], metrics: Output[Metrics],
             report_html: Output[HTML], report_md: Output[Markdown]) -> bool:
    import shutil

    from components.common.cli import reported_failure
    from components.common.config import build_config
    from components.evaluate.config import EvaluateConfig
    from components.evaluate.core import run

    with reported_failure():
        settings = build_config(EvaluateConfig, dict(config))
        manifest = run(settings, dataset.path, {"sft": sft_model.path, "dpo": dpo_model.path}, evaluation.path,
                       registry=registry or None, registry_name=registry_name or None,
                       preference_uri=preference_dataset.path)
    shutil.copyfile(f"{evaluation.path}/report.html", report_html.path)
    shutil.copyfile(f"{evaluation.path}/report.md", report_md.path)
    for key, value in manifest["metrics"].items():
        metrics.log_metric(key, value)
    metrics.log_metric("passed", float(manifest["passed"]))
    # A file for the Metrics artifact: kfp.local counts an output without one as a cache miss.
    shutil.copyfile(f"{evaluation.path}/metrics.json", metrics.path)
    evaluation.metadata.update({"passed": manifest["passed"], "reasons": manifest["reasons"]})
    return bool(manifest["passed"])
