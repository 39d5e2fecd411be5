"""Compile the pipeline once per target. Vertex AI needs a single-document spec (no kfp-kubernetes
platform config); Kubeflow gets Kubernetes accelerator settings. Settings come from a YAML file
(`pipelines/configs/<target>.yaml` by default) so images and hardware are reviewed, not typed."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from pipelines.pipeline import PipelineSettings, build_pipeline

TARGETS = ("vertex", "kubeflow")


def target_settings(target: str, settings_file: str | None = None, overrides: dict | None = None) -> PipelineSettings:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    text = Path(settings_file).read_text() if settings_file else resources.files("pipelines").joinpath(f"configs/{target}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    values.update(overrides or {})
    return PipelineSettings.from_dict(values)


def compile_pipeline(target: str, output: str | Path, settings: PipelineSettings | None = None) -> Path:
    from kfp import compiler

    settings = settings or target_settings(target)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), str(output))
    return output
