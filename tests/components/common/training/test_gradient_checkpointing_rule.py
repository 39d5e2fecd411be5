"""``gradient_checkpointing: auto``: on for CUDA; on a CPU decided by the activations a batch keeps (batch x longest row x layers x hidden),
the rule chosen from benchmarks/gradient_checkpointing.py's measurement (common/training/model.py)."""
from __future__ import annotations

import torch

from components.common.config import build_config
from components.common.model_shapes import SMOLVLM_256M
from components.sft.config import SFTStepConfig


def _config(base_model: str, value: str = "auto"):
    return build_config(SFTStepConfig, {"base_model": base_model, "gradient_checkpointing": value, "per_device_train_batch_size": 2})


def _real_shape_config_only(folder) -> str:
    """SmolVLM-256M's config.json without weights: the rule reads only the config."""
    from transformers import Idefics3Config

    Idefics3Config(vision_config=dict(SMOLVLM_256M["vision"]), text_config={"model_type": "llama", **SMOLVLM_256M["text"]},
                   scale_factor=SMOLVLM_256M["scale_factor"]).save_pretrained(folder)
    return str(folder)


def test_auto_on_cpu_follows_the_estimated_activations(tmp_path, tiny_model_dir):
    """Measured cases: SmolVLM-256M at 512 px (84 tokens/row, batch 2) stays off (2.3x the time for 4% less RSS);
    at its own 2048 px (1,128 tokens/row) it turns on (13.1 GB peak without); the tiny model never does."""
    from components.common.training.model import (
        CPU_CHECKPOINTING_MIN_ACTIVATION_BYTES, estimated_activation_bytes, text_activation_units, use_gradient_checkpointing)

    real = _real_shape_config_only(tmp_path / "smolvlm-256m")
    assert text_activation_units(str(tiny_model_dir)) == 2 * 64
    assert text_activation_units(real) == 30 * 576
    assert estimated_activation_bytes(_config(real), 1128) == 2 * 1128 * 30 * 576 * 136
    assert use_gradient_checkpointing(_config(real), longest_row_tokens=84) is False
    assert use_gradient_checkpointing(_config(real), longest_row_tokens=1128) is True
    assert use_gradient_checkpointing(_config(str(tiny_model_dir)), longest_row_tokens=2048) is False
    # the threshold is the estimate, so batch size moves it: batch 1 at 1,128 tokens is 2.5 GiB -> still on, 400 -> off
    one = build_config(SFTStepConfig, {"base_model": real, "per_device_train_batch_size": 1})
    assert use_gradient_checkpointing(one, 1128) is True and use_gradient_checkpointing(one, 400) is False
    assert estimated_activation_bytes(one, 400) < CPU_CHECKPOINTING_MIN_ACTIVATION_BYTES
    # Unknown row length: off. An explicit setting always wins over the rule.
    assert use_gradient_checkpointing(_config(real)) is False
    assert use_gradient_checkpointing(_config(real, "false"), 1128) is False
    assert use_gradient_checkpointing(_config(str(tiny_model_dir), "true")) is True


def test_auto_on_cpu_is_off_when_the_model_config_cannot_be_read(tmp_path):
    from components.common.training.model import use_gradient_checkpointing

    assert use_gradient_checkpointing(_config(str(tmp_path / "no-such-model"))) is False


def test_auto_is_on_for_cuda_whatever_the_size(monkeypatch, tiny_model_dir):
    from components.common.training.model import use_gradient_checkpointing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert use_gradient_checkpointing(_config(str(tiny_model_dir))) is True
