"""The whole pipeline under kfp.local on the tiny model: gate true registers a version, gate false
registers nothing. The second run shares the first one's kfp cache, so only evaluate runs again. The first run
goes through what `vlmtune run` does (pipelines.demo.execute: the console view, the log file, summary.json), so
kfp's real output is what the console reads; a third run fails in SFT and must say so with its exit status."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

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


def test_pipeline_gate_true_registers_then_gate_false_registers_nothing(pipeline_params, capsys):
    from components.common import artifacts
    from components.common.registry import open_registry
    from pipelines.demo import execute

    root, params = pipeline_params
    eval_config = {"max_rows": 6, "batch_size": 6, "max_new_tokens": 3, "cpu_threads": 1}
    # Gate true: min_delta -1 admits any candidate, so the wiring (bool output -> dsl.If -> register) is what is tested.
    out = io.StringIO()
    status, summary = execute({**params, "eval_config": {**eval_config, "min_delta": -1.0}}, root, title="test run", out=out)
    assert status == 0, capsys.readouterr().err
    lines = out.getvalue().splitlines()
    steps = [line for line in lines if re.match(r"  \[\d/6\] ", line)]
    assert len(lines) <= 40, out.getvalue()  # one screen
    assert len([line for line in steps if " ok " in line]) == 6, out.getvalue()
    assert re.search(r"SFT +ok +[\d.]+ s  4 steps on \d+ rows, loss [\d.]+ -> [\d.]+$", out.getvalue(), re.M)
    assert re.search(r"prepare SFT data +ok +[\d.]+ s  48 of 48 rows: train \d+, eval \d+$", out.getvalue(), re.M)
    assert re.search(r"register +ok +[\d.]+ s  tiny-shapes v1 in ", out.getvalue(), re.M)
    log = Path(summary["log"])
    assert lines[0] == f"test run; full log: {log}" and lines[-1] == f"  full log: {log}"
    assert "Executing task" in log.read_text() and "Got executor_input" in log.read_text()
    assert json.loads((root / "summary.json").read_text())["registered_version"] == 1
    outputs = {"evaluation": str(Path(summary["report"]).parent), "model": summary["model"]}
    evaluation = artifacts.read_manifest(outputs["evaluation"], kind="vlmtune.evaluation")
    assert evaluation["passed"] is True and evaluation["candidate"] == "dpo"
    assert set(evaluation["models"]) == {"base", "sft", "dpo"}
    registry = open_registry(params["registry"])
    versions = registry.list_versions("tiny-shapes")
    assert [v.version for v in versions] == [1]
    # registered from the run's model, served from the registry's own copy (issue 11)
    assert versions[0].source_uri.rstrip("/") == str(outputs["model"]).rstrip("/")
    assert versions[0].model_uri == f"{params['registry']}/tiny-shapes/versions/000001/model"
    assert versions[0].content_hash == artifacts.read_manifest(outputs["model"])["content_hash"]
    assert registry.get("tiny-shapes", "champion").version == 1
    for name in ("report.html", "report.md", "metrics.json", "predictions.jsonl", "scores.png"):
        assert Path(outputs["evaluation"], name).exists(), name
    predictions = [json.loads(line) for line in open(f"{outputs['evaluation']}/predictions.jsonl")]
    assert len(predictions) == 6 and {"base", "sft", "dpo", "references"} <= set(predictions[0])

    # Gate false: the candidate must now beat the base by more than 1.0 (impossible) -> register is skipped.
    outputs = _run(root, params, {**eval_config, "min_delta": 1.0})
    evaluation = artifacts.read_manifest(outputs["evaluation"], kind="vlmtune.evaluation")
    assert evaluation["passed"] is False
    assert "champion" in evaluation["models"]  # the champion registered by the first run was scored too
    assert [v.version for v in registry.list_versions("tiny-shapes")] == [1]

    # A step that fails on its data: SFT with a 20-token budget. The run stops there, exits with SFT's own
    # status (3: data over its limit) and says why, with the step's last lines and the log path.
    out = io.StringIO()
    status, summary = execute({**params, "sft_config": {**params["sft_config"], "max_length": 20},
                               "eval_config": eval_config}, root, title="failing run", out=out)
    err = capsys.readouterr().err
    assert (status, summary) == (3, None), err
    assert re.search(r"prepare SFT data +cached", out.getvalue()) and re.search(r"\] SFT +failed", out.getvalue())
    assert "error: SFT failed (exit status 3): " in err and "exceed max_length=20 tokens" in err
    assert "not run: " in err and "DPO" in err and "last lines of its log:" in err
    assert re.search(r"^full log: .*/logs/run-\d{8}-\d{6}\.log$", err, re.M)
