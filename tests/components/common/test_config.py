"""Typed configs (components/common/config.py): every problem at once, each with its key path and where the value
came from, and a did-you-mean for misspelt keys.

Run: pytest tests/components/common/test_config.py -q
"""
from __future__ import annotations

import pytest

from components.common.config import ConfigError, Problem, build_config, config_problems, did_you_mean, load_config
from components.dpo.config import DPOStepConfig
from components.sft.config import SFTStepConfig


def test_did_you_mean_finds_the_misspelt_key_and_nothing_for_a_stranger():
    fields = ["learning_rate", "lora_r", "lora_alpha", "num_train_epochs"]
    assert did_you_mean("learnin_rate", fields) == "learning_rate"
    assert did_you_mean("learning-rate", fields) == "learning_rate"
    assert did_you_mean("numtrainepochs", fields) == "num_train_epochs"
    assert did_you_mean("banana", fields) is None


def test_every_problem_at_once_with_its_source():
    values = {"learnin_rate": 1e-4, "lora_r": "eight", "lora_alpha": 0, "base_model": "org/m", "bogus_thing": 1}
    sources = {"learnin_rate": "sft.yaml", "lora_r": "--set", "lora_alpha": "--lora-alpha"}
    problems, config = config_problems(SFTStepConfig, values, sources)
    assert config is None
    assert [str(p) for p in problems] == [
        "sft.yaml: unknown key 'learnin_rate' (did you mean 'learning_rate'?)",
        "--set: lora_r: expected an integer, got 'eight'",
        problems[2].__str__(),  # bogus_thing: no close field, so the known ones are listed
        "--lora-alpha: lora_alpha must be > 0, got 0",  # validate() still ran on the well-typed values
    ]
    assert str(problems[2]).startswith("unknown key 'bogus_thing' (known: base_model, cpu_threads, ")
    # lora_r was badly typed: validate() saw the default (16), so no second, misleading problem about it.
    assert not any("lora_r must" in str(p) for p in problems)


def test_a_problem_about_several_fields_names_where_they_were_set():
    problems, _ = config_problems(SFTStepConfig, {"base_model": "m", "num_train_epochs": 0, "max_steps": -1},
                                  {"base_model": "run.yaml", "num_train_epochs": "--set", "max_steps": "--set"})
    assert [str(p) for p in problems] == ["--set: set num_train_epochs > 0 or max_steps > 0"]


def test_build_config_raises_one_error_listing_all():
    with pytest.raises(ConfigError) as info:
        build_config(DPOStepConfig, {"beta": -1, "loss_type": "nope"})
    assert str(info.value).splitlines() == [
        "invalid DPOStepConfig (2 problems):",
        "  - beta must be > 0, got -1.0",
        "  - loss_type must be one of ('sigmoid', 'ipo', 'hinge', 'robust', 'bco_pair', 'sppo_hard', 'nca_pair', "
        "'apo_zero', 'apo_down'), not 'nope'",
    ]
    assert [p.key for p in info.value.problems] == ["beta", "loss_type"]
    with pytest.raises(ConfigError, match=r"^invalid DPOStepConfig: beta must be > 0, got 0.0$"):
        build_config(DPOStepConfig, {"beta": 0})


def test_load_config_names_the_file_for_its_keys_and_the_flag_for_overrides(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("beta: -1\nlerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(DPOStepConfig, str(path), {"loss_type": "nope"}, sources={"loss_type": "--loss-type"})
    shown = [str(p) for p in info.value.problems]
    assert shown[0] == f"{path}: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"
    assert shown[1] == f"{path}: beta must be > 0, got -1.0"
    assert shown[2].startswith("--loss-type: loss_type must be one of")
    with pytest.raises(ConfigError, match="config file '.*missing.yaml' does not exist"):
        load_config(DPOStepConfig, str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys to values, not a list"):
        load_config(DPOStepConfig, str(tmp_path / "list.yaml"))


def test_problem_text_puts_source_then_key_then_message():
    assert str(Problem("sft_config.learning_rate", "expected a number, got 'x'", "run.yaml")) == \
        "run.yaml: sft_config.learning_rate: expected a number, got 'x'"
    assert str(Problem("sft_config.lora_r", "lora_r must be > 0, got 0")) == "sft_config.lora_r must be > 0, got 0"
    assert str(Problem("sft_config.lr", "unknown key 'lr' (did you mean 'x'?)", "--set")) == \
        "--set: sft_config: unknown key 'lr' (did you mean 'x'?)"
    assert str(Problem("", "config file 'x' does not exist")) == "config file 'x' does not exist"
