"""SFT and DPO on the tiny model: real QLoRA (4-bit layers on CPU), outputs, and parameters that moved."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.fixtures_models import TINY_TRAINING


def test_qlora_base_really_uses_4bit_layers(tiny_model_dir):
    from bitsandbytes.nn import Linear4bit

    from components.common.config import build_config
    from components.common.training.model import load_trainable_model
    from components.sft.config import SFTStepConfig

    model, peft_config = load_trainable_model(build_config(SFTStepConfig, {"base_model": str(tiny_model_dir), "method": "qlora"}))
    quantized = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    assert any(".text_model." in name for name in quantized)
    # Trainable-in-full modules stay in full precision (they cannot be trained while quantised).
    assert not any("connector" in name or "lm_head" in name for name in quantized)
    assert peft_config.modules_to_save == ["connector", "lm_head"]


def test_sft_writes_a_complete_model_artifact(sft_model_dir):
    files = {p.relative_to(sft_model_dir).as_posix() for p in sft_model_dir.rglob("*") if p.is_file()}
    for expected in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "processor/processor_config.json",
                     "config.yaml", "metrics.json", "loss_curve.png", "log_history.json", "manifest.json"):
        assert expected in files, expected
    assert any(f.startswith("tensorboard/") and "tfevents" in f for f in files)
    manifest = json.loads((sft_model_dir / "manifest.json").read_text())
    assert manifest["kind"] == "vlmtune.model" and manifest["stage"] == "sft" and manifest["adapter"] is True
    assert manifest["quantization"] == "4bit"
    metrics = manifest["metrics"]
    assert metrics["global_steps"] == TINY_TRAINING["max_steps"]
    history = json.loads((sft_model_dir / "log_history.json").read_text())
    assert len([h for h in history if "loss" in h]) == TINY_TRAINING["max_steps"]  # loss logged every step
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_bytes"] > 0


def test_sft_changed_every_trainable_tensor(sft_model_dir, tiny_model_dir):
    adapter = load_file(sft_model_dir / "adapter" / "adapter_model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), "LoRA B starts at zero; training must move it"
    assert {k.split(".text_model.")[-1].split(".lora_B")[0] for k in lora_b} >= {"layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"}
    saved = {k: v for k, v in adapter.items() if "lora_" not in k}
    assert any("connector" in k for k in saved) and any("lm_head" in k for k in saved)
    for key, value in saved.items():
        base_key = key.replace("base_model.model.", "", 1)
        assert base_key in base, key
        assert not value.float().allclose(base[base_key].float()), f"{key} did not change"


def test_sft_refuses_an_incomplete_dataset(tmp_path, tiny_model_dir):
    from components.common.artifacts import IncompleteArtifactError
    from components.common.config import build_config
    from components.sft.config import SFTStepConfig
    from components.sft.core import run

    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(IncompleteArtifactError, match="manifest"):
        run(build_config(SFTStepConfig, {**TINY_TRAINING, "base_model": str(tiny_model_dir)}), str(tmp_path / "half"), str(tmp_path / "o"))


def test_invalid_config_reports_every_problem_at_once():
    from components.common.config import ConfigError, build_config
    from components.sft.config import SFTStepConfig

    with pytest.raises(ConfigError) as info:
        build_config(SFTStepConfig, {"method": "qlora", "quantization": "none", "lora_r": 0, "learning_rate": "fast", "bogus": 1})
    message = str(info.value)
    for fragment in ("learning_rate", "bogus"):
        assert fragment in message
    with pytest.raises(ConfigError) as info:
        build_config(SFTStepConfig, {"method": "qlora", "quantization": "none", "lora_r": 0})
    message = str(info.value)
    for fragment in ("base_model is required", "needs quantization", "lora_r must be > 0"):
        assert fragment in message


def test_eval_loss_is_logged_beside_training_loss_and_plotted(tmp_path, prepared_sft, tiny_model_dir):
    from components.common.config import build_config
    from components.sft.config import SFTStepConfig
    from components.sft.core import run

    out = tmp_path / "sft"
    manifest = run(build_config(SFTStepConfig, {**TINY_TRAINING, "base_model": str(tiny_model_dir), "max_steps": 4,
                                                "eval_steps": 2, "eval_loss_rows": 5}), str(prepared_sft), str(out))
    history = json.loads((out / "log_history.json").read_text())
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]  # every eval_steps optimiser steps
    metrics = manifest["metrics"]
    assert metrics["eval_loss_rows"] == 5
    assert metrics["first_eval_loss"] == evals[0]["eval_loss"] and metrics["last_eval_loss"] == evals[-1]["eval_loss"]
    assert metrics["last_eval_loss"] > 0
    assert (out / "loss_curve.png").stat().st_size > 0


def test_eval_loss_is_off_by_default(sft_model_dir):
    history = json.loads((sft_model_dir / "log_history.json").read_text())
    assert not any("eval_loss" in h for h in history)
    assert json.loads((sft_model_dir / "manifest.json").read_text())["metrics"]["last_eval_loss"] is None


def test_loss_curve_draws_the_eval_loss_when_logged(tmp_path):
    from PIL import Image

    from components.common.training.outputs import plot_loss_curve

    train_only = [{"step": s, "loss": 2.0 / s} for s in range(1, 9)]
    with_eval = train_only + [{"step": s, "eval_loss": 1.5 / s} for s in (4, 8)]
    plot_loss_curve(train_only, tmp_path / "a.png", "SFT")
    plot_loss_curve(with_eval, tmp_path / "b.png", "SFT")
    # The eval line and its legend change the picture.
    assert Image.open(tmp_path / "a.png").tobytes() != Image.open(tmp_path / "b.png").tobytes()
