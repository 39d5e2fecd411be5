"""The pipeline's shape, from the compiled spec: steps, images per step, and the two gates."""
from __future__ import annotations

import yaml

from pipelines.pipeline import PipelineSettings, build_pipeline


def _compile(tmp_path, settings):
    from kfp import compiler

    path = tmp_path / "spec.yaml"
    compiler.Compiler().compile(build_pipeline(settings), str(path))
    return yaml.safe_load(path.read_text())


def _tasks(dag):
    found = {}
    for name, task in dag["tasks"].items():
        found[name] = task
    return found


def test_each_step_runs_in_the_image_the_settings_name(tmp_path):
    spec = _compile(tmp_path, PipelineSettings(registry_prefix="reg.example/p", image_tag="1.2.3"))
    images = {name.removeprefix("exec-"): ex["container"]["image"] for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert images["prepare-data"] == "reg.example/p/vlmtune-cpu:1.2.3"
    assert images["register"] == "reg.example/p/vlmtune-cpu:1.2.3"
    for step in ("sft", "dpo", "evaluate"):
        assert images[step] == "reg.example/p/vlmtune-cuda:1.2.3"


def test_register_runs_only_under_the_evaluation_gate(tmp_path):
    spec = _compile(tmp_path, PipelineSettings())
    root = _tasks(spec["root"]["dag"])
    assert {"prepare-data", "prepare-data-2", "sft", "dpo", "evaluate", "condition-1"} <= set(root)
    assert "register" not in root
    gate = root["condition-1"]
    assert "evaluate-Output" in gate["triggerPolicy"]["condition"]
    assert "register" in spec["components"]["comp-condition-1"]["dag"]["tasks"]


def test_scheduled_variant_skips_training_when_data_is_unchanged(tmp_path):
    spec = _compile(tmp_path, PipelineSettings(skip_unchanged_data=True))
    root = _tasks(spec["root"]["dag"])
    assert {"prepare-data", "prepare-data-2", "data-changed-since-champion"} <= set(root)
    assert not {"sft", "dpo", "evaluate"} & set(root), "training must sit under the new-data condition"
    gate = [t for name, t in root.items() if name.startswith("condition")][0]
    assert "data-changed-since-champion-Output" in gate["triggerPolicy"]["condition"]
