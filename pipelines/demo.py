"""``vlmtune demo``: the whole job on one machine in a few minutes, from nothing.

Builds the tiny model and the synthetic data if absent, runs the pipeline with kfp.local, and writes
``WORKDIR/summary.json`` with the held-out accuracies, the gate and the registered version.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from components.common import artifacts
from pipelines import configs


def demo_config() -> dict[str, Any]:
    """The shipped run defaults, ``pipelines/configs/demo.yaml`` (package data, so an installed copy has it)."""
    return configs.load("demo.yaml")


def ensure_demo_inputs(workdir: Path, rows: int = 600, seed: int = 0) -> dict[str, str]:
    from components.common.demo_data import write_demo_data
    from components.common.tiny_model import build_tiny_model

    model_dir, data_dir = workdir / "tiny-model", workdir / "demo-data"
    if not (model_dir / "vlmtune_tiny_model.json").exists():
        build_tiny_model(model_dir, seed=seed)
    if not (data_dir / "DONE").exists():
        write_demo_data(data_dir, rows=rows, preference_rows=max(rows // 3, 40), seed=seed)
    return {
        "base_model": str(model_dir.absolute()),
        "sft_source": str((data_dir / "sft").absolute()),
        "preference_source": str((data_dir / "preference").absolute()),
    }


def default_params(workdir: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    config = config or demo_config()
    return {
        **ensure_demo_inputs(workdir),
        "registry": str((workdir / "registry").absolute()),
        "registry_name": config.get("registry_name", "demo-shapes"),
        "prepare_config": config.get("prepare_config", {}),
        "sft_config": config.get("sft_config", {}),
        "dpo_config": config.get("dpo_config", {}),
        "eval_config": config.get("eval_config", {}),
    }


def summarize(outputs: dict[str, Any], params: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    from components.common.registry import open_registry

    evaluation = artifacts.read_manifest(outputs["evaluation"], kind="vlmtune.evaluation")
    metrics = json.loads(Path(outputs["evaluation"], "metrics.json").read_text())
    scores = metrics["scores"]
    registered = None
    model_path = str(Path(outputs["model"]).absolute())
    for version in open_registry(params["registry"]).list_versions(params["registry_name"]):
        # the registry serves its own copy; source_uri is the folder it was registered from (issue 11)
        if str(version.source_uri or version.model_uri).rstrip("/") == model_path.rstrip("/"):
            registered = version.version
    return {
        "base_accuracy": scores.get("base"),
        "sft_accuracy": scores.get("sft"),
        "dpo_accuracy": scores.get("dpo"),
        "champion_accuracy": scores.get("champion"),
        "metric": metrics["primary_metric"],
        "eval_rows": metrics["eval_rows"],
        "per_category": {name: {c: v["score"] for c, v in metrics["by_model"][name][metrics["primary_metric"]]["per_category"].items()}
                         for name in scores},
        "passed": evaluation["passed"],
        "reasons": evaluation["reasons"],
        "registered_version": registered,
        "registry": params["registry"],
        "model": model_path,
        "report": str(Path(outputs["evaluation"], "report.html")),
        "wall_seconds": round(wall_seconds, 1),
    }


def print_summary(summary: dict[str, Any]) -> None:
    print("\nvlmtune demo: held-out", summary["metric"], f"on {summary['eval_rows']} rows")
    print(f"  {'model':<10}{'accuracy':>10}")
    for name in ("base", "sft", "dpo", "champion"):
        value = summary.get(f"{name}_accuracy")
        if value is not None:
            print(f"  {name:<10}{value:>10.3f}")
    print(f"  gate passed: {summary['passed']}   registered version: {summary['registered_version']}")
    print(f"  report: {summary['report']}")
    print(f"  wall time: {summary['wall_seconds']} s")


def run_demo(workdir: str | Path, caching: bool = True) -> dict[str, Any]:
    from pipelines.local import run_local

    started = time.time()
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    params = default_params(workdir)
    outputs = run_local(params, workdir / "pipeline-root", caching=caching)
    summary = summarize(outputs, params, time.time() - started)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary
