"""The one validation pass of run, demo, submit and schedule (pipelines/params.py: resolve_params): layers merged
in order, every problem at once with its key path and where it was set, and the local target's rules.

Run: pytest tests/pipelines/test_params.py -q
"""
from __future__ import annotations

import pytest

from pipelines.params import ParamsError, SubmitError, pipeline_parameters, resolve_params


@pytest.fixture(scope="module")
def spec():
    return pipeline_parameters()


def problems(**kwargs) -> list[str]:
    with pytest.raises(ParamsError) as info:
        resolve_params(**kwargs)
    return [str(p) for p in info.value.problems]


def test_layers_merge_in_order_and_problems_name_their_layer(spec, tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("sft_config:\n  lora_r: 0\nregistry_name: my model\n")
    defaults = {"sft_source": str(tmp_path), "preference_source": str(tmp_path), "base_model": "org/m",
                "registry": str(tmp_path / "reg"), "sft_config": {"learning_rate": 2e-3, "method": "qlora"}}
    found = problems(spec_params=spec, target="local", layers=[(defaults, "defaults.yaml")], params_file=str(run),
                     sets=["sft_config.quantization=2bit", "eval_config.metric=bleu"], flag="--config")
    assert found[:2] == ["--set: sft_config.quantization must be one of ('none', '4bit', '8bit'), not '2bit'",
                         f"{run}: sft_config.lora_r must be > 0, got 0"]  # in the order validate() checks them
    assert found[2].startswith("--set: eval_config.metric: unknown metric 'bleu'; choose one of anls, exact_match")
    assert found[3].startswith(f"{run}: registry_name: 'my model' is not a model name")
    assert len(found) == 4  # the file's sft_config replaced the defaults' one: learning_rate 2e-3 is gone, not checked


def test_the_returned_params_are_typed_as_the_steps_read_them(spec, tmp_path):
    params = resolve_params(spec, "local", layers=[({"sft_source": str(tmp_path), "preference_source": str(tmp_path),
                                                      "base_model": "org/m", "registry": str(tmp_path / "r")}, None)],
                            sets=["sft_config.learning_rate=2e-4", "eval_config.max_new_tokens=8"])
    assert params["sft_config"] == {"learning_rate": 2e-4} and isinstance(params["sft_config"]["learning_rate"], float)
    assert params["eval_config"] == {"max_new_tokens": 8}  # a token count is not a secret


def test_local_paths_must_exist_unless_the_caller_builds_them(spec, tmp_path):
    will = {"base_model": str(tmp_path / "tiny-model"), "sft_source": str(tmp_path / "data")}
    layers = [({**will, "preference_source": str(tmp_path / "prefs"), "registry": str(tmp_path / "reg")}, None)]
    found = problems(spec_params=spec, target="local", layers=layers, sets=["base_model=./models/mine"], will_exist=will)
    assert found == [
        f"preference_source: '{tmp_path / 'prefs'}' does not exist; expected the source folder or file",
        "--set: base_model: './models/mine' does not exist; expected a model folder or a hub id (org/name)",
    ]


def test_values_the_pipeline_sets_itself_are_refused_in_sections(spec, tmp_path):
    found = problems(spec_params=spec, target="vertex", layers=[({"sft_source": "gs://b/s", "preference_source": "gs://b/p",
                                                                  "base_model": "org/m", "registry": "gs://b/r"}, None)],
                     sets=["prepare_config.task=preference", "sft_config.base_model=org/other"])
    assert found == [
        "--set: prepare_config.task is set by the pipeline (the pipeline prepares sft_source with task sft and "
        "preference_source with task preference); remove it from prepare_config",
        "--set: sft_config.base_model is set by the pipeline (the pipeline trains base_model; set the base_model "
        "parameter instead); remove it from sft_config",
    ]


def test_malformed_sets_and_files_are_problems_too(spec, tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n")
    found = problems(spec_params=spec, target="vertex", params_file=str(tmp_path / "list.yaml"),
                     sets=["no-equals-sign", "registry_name.x=1"])
    assert found[:2] == [
        f"--params '{tmp_path / 'list.yaml'}' must be a mapping of parameter names to values, not a list",
        "--set 'no-equals-sign' is not KEY=VALUE (e.g. --set learning_rate=5e-3)",
    ]
    assert "--set: registry_name: expected a string, got dict {'x': 1}" in found
    assert "sft_source: required (put it in the parameters file or pass --set sft_source=...)" in found
    assert SubmitError is ParamsError
