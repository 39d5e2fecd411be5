"""The whole pipeline under kfp.local on the tiny model: gate true registers a version, gate false
registers nothing. The second run shares the first one's kfp cache, so only evaluate runs again."""
from __future__ import annotations

import json

import pytest

from tests.fixtures_models import TINY_TRAINING


@pytest.fixture(scope="module")
def pipeline_params(tmp_path_factory, tiny_model_dir, demo_data_dir):
    root = tmp_path_factory.mktemp("pipeline")
    return root, {
        "sft_source": str(demo_data_dir / "sft"),
        "preference_source": str(demo_data_dir / "preference"),
        "base_model": str(tiny_model_dir),
        "registry": str(root / "registry"),
        "registry_name": "tiny-shapes",
        "prepare_config": {"eval_fraction": 0.25},
        "sft_config": {**TINY_TRAINING, "max_steps": 4},
        "dpo_config": {**TINY_TRAINING, "max_steps": 2, "learning_rate": 1e-3},
    }


def _run(root, params, eval_config):
    from pipelines.local import run_local

    return run_local({**params, "eval_config": eval_config}, root / "pipeline-root", caching=True)


def test_pipeline_gate_true_registers_then_gate_false_registers_nothing(pipeline_params):
    from components.common import artifacts
    from components.common.registry import open_registry

    root, params = pipeline_params
    eval_config = {"max_rows": 6, "batch_size": 6, "max_new_tokens": 3, "cpu_threads": 1}
    # Gate true: min_delta -1 admits any candidate, so the wiring (bool output -> dsl.If -> register) is what is tested.
    outputs = _run(root, params, {**eval_config, "min_delta": -1.0})
    evaluation = artifacts.read_manifest(outputs["evaluation"], kind="vlmtune.evaluation")
    assert evaluation["passed"] is True and evaluation["candidate"] == "dpo"
    assert set(evaluation["models"]) == {"base", "sft", "dpo"}
    registry = open_registry(params["registry"])
    versions = registry.list_versions("tiny-shapes")
    assert [v.version for v in versions] == [1]
    # registered from the run's model, served from the registry's own copy (issue 11)
    assert versions[0].source_uri.rstrip("/") == str(outputs["model"]).rstrip("/")
    assert versions[0].model_uri == f"{params['registry']}/tiny-shapes/versions/000001/model"
    assert registry.get("tiny-shapes", "champion").version == 1
    for name in ("report.html", "report.md", "metrics.json", "predictions.jsonl", "scores.png"):
        assert (outputs["evaluation"] and __import__("pathlib").Path(outputs["evaluation"], name).exists()), name
    predictions = [json.loads(line) for line in open(f"{outputs['evaluation']}/predictions.jsonl")]
    assert len(predictions) == 6 and {"base", "sft", "dpo", "references"} <= set(predictions[0])

    # Gate false: the candidate must now beat the base by more than 1.0 (impossible) -> register is skipped.
    outputs = _run(root, params, {**eval_config, "min_delta": 1.0})
    evaluation = artifacts.read_manifest(outputs["evaluation"], kind="vlmtune.evaluation")
    assert evaluation["passed"] is False
    assert "champion" in evaluation["models"]  # the champion registered by the first run was scored too
    assert [v.version for v in registry.list_versions("tiny-shapes")] == [1]
