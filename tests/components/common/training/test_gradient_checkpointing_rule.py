"""``gradient_checkpointing: auto``: on for CUDA; on a CPU decided by the text decoder's size (layers x hidden),
the rule chosen from benchmarks/gradient_checkpointing.py's measurement (common/training/model.py)."""
from __future__ import annotations

import torch

from components.common.config import build_config
from components.common.model_shapes import SMOLVLM_256M
from components.sft.config import SFTStepConfig


def _config(base_model: str, value: str = "auto"):
    return build_config(SFTStepConfig, {"base_model": base_model, "gradient_checkpointing": value})


def _real_shape_config_only(folder) -> str:
    """SmolVLM-256M's config.json without weights: the rule reads only the config."""
    from transformers import Idefics3Config

    Idefics3Config(vision_config=dict(SMOLVLM_256M["vision"]), text_config={"model_type": "llama", **SMOLVLM_256M["text"]},
                   scale_factor=SMOLVLM_256M["scale_factor"]).save_pretrained(folder)
    return str(folder)


def test_auto_on_cpu_is_off_for_the_tiny_model_and_on_for_the_real_shape(tmp_path, tiny_model_dir):
    from components.common.training.model import CPU_CHECKPOINTING_MIN_TEXT_UNITS, text_activation_units, use_gradient_checkpointing

    real = _real_shape_config_only(tmp_path / "smolvlm-256m")
    assert text_activation_units(str(tiny_model_dir)) == 2 * 64 < CPU_CHECKPOINTING_MIN_TEXT_UNITS
    assert text_activation_units(real) == 30 * 576 >= CPU_CHECKPOINTING_MIN_TEXT_UNITS
    assert use_gradient_checkpointing(_config(str(tiny_model_dir))) is False
    assert use_gradient_checkpointing(_config(real)) is True
    # An explicit setting always wins over the rule.
    assert use_gradient_checkpointing(_config(real, "false")) is False
    assert use_gradient_checkpointing(_config(str(tiny_model_dir), "true")) is True


def test_auto_on_cpu_is_off_when_the_model_config_cannot_be_read(tmp_path):
    from components.common.training.model import use_gradient_checkpointing

    assert use_gradient_checkpointing(_config(str(tmp_path / "no-such-model"))) is False


def test_auto_is_on_for_cuda_whatever_the_size(monkeypatch, tiny_model_dir):
    from components.common.training.model import use_gradient_checkpointing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert use_gradient_checkpointing(_config(str(tiny_model_dir))) is True
