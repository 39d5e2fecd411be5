"""Training options on the tiny model, a few steps each: quantisation and method, DoRA, LoRA targets, frozen
vision tower, gradient (activation) checkpointing, length-grouped batches, CUDA defaults, and the full-precision
merge."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_models import TINY_TRAINING


def config(tiny_model_dir, **overrides):
    from components.common.config import build_config
    from components.sft.config import SFTStepConfig

    return build_config(SFTStepConfig, {**TINY_TRAINING, "base_model": str(tiny_model_dir), **overrides})


def train(tiny_model_dir, prepared_sft, out, **overrides):
    from components.sft.core import run

    return run(config(tiny_model_dir, **overrides), str(prepared_sft), str(out))


def quantised_layers(model) -> dict[str, str]:
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bitLt))}


def test_cli_flags_set_method_and_quantization():
    from components.common.cli import config_from_args
    from components.sft.cli import make_parser
    from components.sft.config import SFTStepConfig

    args = make_parser().parse_args(["--dataset", "d", "--output", "o", "--base-model", "m", "--method", "lora",
                                     "--quantization", "8bit", "--set", "use_dora=true", "--set", "lora_targets=text+vision"])
    cfg = config_from_args(args, SFTStepConfig)
    assert (cfg.method, cfg.resolved_quantization(), cfg.use_dora, cfg.lora_targets) == ("lora", "8bit", True, "text+vision")
    assert config_from_args(make_parser().parse_args(["--dataset", "d", "--output", "o", "--base-model", "m"]),
                            SFTStepConfig).resolved_quantization() == "4bit"  # qlora + NF4 by default


@pytest.mark.parametrize("method, quantization, expected", [("qlora", None, "Linear4bit"), ("qlora", "8bit", "Linear8bitLt"), ("lora", None, None)])
def test_quantization_choice_loads_the_matching_layers(tiny_model_dir, method, quantization, expected):
    from components.common.training.model import load_trainable_model

    model, peft_config = load_trainable_model(config(tiny_model_dir, method=method, quantization=quantization))
    layers = quantised_layers(model)
    if expected is None:
        assert layers == {}
    else:
        assert layers and set(layers.values()) == {expected}
        assert all(".text_model." in name for name in layers)  # vision tower, connector, lm_head stay full precision
    assert peft_config is not None


def test_8bit_base_trains_lora_on_cpu(tmp_path, tiny_model_dir, prepared_sft):
    manifest = train(tiny_model_dir, prepared_sft, tmp_path / "m", quantization="8bit", max_steps=2)
    assert manifest["quantization"] == "8bit" and manifest["metrics"]["global_steps"] == 2
    adapter = load_file(tmp_path / "m" / "adapter" / "adapter_model.safetensors")
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_dora_on_4bit_adds_trained_magnitude_vectors(tmp_path, tiny_model_dir, prepared_sft):
    manifest = train(tiny_model_dir, prepared_sft, tmp_path / "m", use_dora=True, max_steps=2)
    assert json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    adapter = load_file(tmp_path / "m" / "adapter" / "adapter_model.safetensors")
    magnitudes = [k for k in adapter if "lora_magnitude_vector" in k]
    assert magnitudes and manifest["metrics"]["global_steps"] == 2


@pytest.mark.parametrize("targets, vision_lora", [("text", False), ("text+vision", True)])
def test_lora_targets_and_the_frozen_vision_tower(tiny_model_dir, targets, vision_lora):
    from peft import get_peft_model

    from components.common.training.model import load_trainable_model

    model, peft_config = load_trainable_model(config(tiny_model_dir, method="lora", lora_targets=targets))
    model = get_peft_model(model, peft_config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".text_model." in n and "lora_A" in n for n in trainable)
    assert any(".vision_model." in n and "lora_A" in n for n in trainable) == vision_lora
    # The vision tower's own weights never train; the connector does (modules_to_save).
    assert not [n for n in trainable if ".vision_model." in n and "lora_" not in n]
    assert any("connector" in n for n in trainable)


def test_full_finetune_freezes_the_vision_tower_and_writes_the_whole_model(tmp_path, tiny_model_dir, prepared_sft):
    manifest = train(tiny_model_dir, prepared_sft, tmp_path / "m", method="full", max_steps=2)
    assert manifest["adapter"] is False and manifest["quantization"] == "none"
    assert not (tmp_path / "m" / "adapter").exists()
    trained = load_file(tmp_path / "m" / "model" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = {k for k in base if not trained[k].allclose(base[k])}
    assert {k for k in moved if ".vision_model." in k} == set()
    assert any(".text_model." in k for k in moved) and any("connector" in k for k in moved)


def test_gradient_checkpointing_true_trains_and_auto_is_off_on_cpu(tmp_path, tiny_model_dir, prepared_sft, monkeypatch):
    """Checkpointing is on while the steps run (the Trainer turns it on from activation_checkpointing, the name
    transformers 5.24 uses), and nothing of ours goes through the deprecated gradient_checkpointing names."""
    import warnings

    from components.common.training import model as training

    assert training.use_gradient_checkpointing(config(tiny_model_dir)) is False  # auto, CPU
    import transformers

    seen = []
    real_step = transformers.Trainer.training_step

    def spy(self, model, *args, **kwargs):
        seen.append(self.model.is_activation_checkpointing)
        return real_step(self, model, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = train(tiny_model_dir, prepared_sft, tmp_path / "m", gradient_checkpointing="true", max_steps=2)
    assert manifest["metrics"]["global_steps"] == 2 and manifest["metrics"]["last_logged_loss"] > 0
    assert seen == [True, True]
    # `gradient_checkpointing` / `gradient_checkpointing_kwargs` args and `gradient_checkpointing_enable()` warn;
    # PEFT's own read of `is_gradient_checkpointing` (peft_model.py) is not ours to change.
    ours = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)
            and ("`gradient_checkpointing" in str(w.message))]
    assert ours == [], ours


def test_checkpointing_arguments_use_the_activation_checkpointing_names(tmp_path, tiny_model_dir):
    import warnings

    from trl import DPOConfig

    from components.common.config import build_config
    from components.common.training.arguments import common_training_arguments
    from components.dpo.config import DPOStepConfig
    from components.sft.core import training_arguments

    for value in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sft = training_arguments(config(tiny_model_dir, gradient_checkpointing=str(value).lower()), str(tmp_path))
            dpo = DPOConfig(**common_training_arguments(build_config(DPOStepConfig, {"gradient_checkpointing": str(value).lower()}), str(tmp_path), None))
        assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
        for args in (sft, dpo):
            # TRL reads the old names: transformers keeps them equal to the new ones (TRL's own default is True).
            assert (args.activation_checkpointing, args.gradient_checkpointing) == (value, value)
            assert args.activation_checkpointing_kwargs == args.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_cuda_defaults_bf16_paged_8bit_optimizer_and_checkpointing(monkeypatch, tiny_model_dir):
    from components.common import modeling
    from components.common.training import model as training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    settings = modeling.device_settings()
    assert (settings.device, settings.dtype, settings.optim, settings.bf16) == ("cuda", torch.bfloat16, "paged_adamw_8bit", True)
    assert settings.attn_implementation in ("sdpa", "flash_attention_2")
    assert training.use_gradient_checkpointing(config(tiny_model_dir)) is True


def padding_per_real_token(trainer) -> float:
    positions = real = 0
    for batch in trainer.get_train_dataloader():
        positions += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return (positions - real) / real


def test_length_grouping_really_groups_and_cuts_padding(tmp_path, tiny_model_dir, prepared_sft):
    """Our trainer's sampler puts rows of similar length together: far less padding than random batches on
    rows of varied length (extra question words, 0-2 images)."""
    import random

    import datasets
    from trl import SFTTrainer

    from components.common.dataset import load_split
    from components.common.modeling import load_processor
    from components.common.training.collator import VisionSFTCollator
    from components.common.training.resume import EpochSeededSampler, with_exact_resume
    from components.sft.core import filter_by_token_budget, training_arguments

    rng = random.Random(0)
    rows = []
    for row in load_split(str(prepared_sft), "train"):
        images = row["images"][: rng.choice([0, 1, 1])]
        words = " ".join(["describe the shape"] * rng.randint(0, 12))
        user = [{"type": "image", "text": None}] * len(images) + [{"type": "text", "text": f"{words} What colour is it?"}]
        rows.append({"messages": [{"role": "user", "content": user}, row["messages"][-1]], "images": images})
    processor = load_processor(str(tiny_model_dir))
    collator = VisionSFTCollator(processor, max_length=2048)
    data, _ = filter_by_token_budget(datasets.Dataset.from_list(rows), collator, 0.0)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    padding = {}
    for grouped in (True, False):
        args = training_arguments(config(tiny_model_dir, group_by_length=grouped, per_device_train_batch_size=4), str(tmp_path / str(grouped)))
        trainer = with_exact_resume(SFTTrainer)(model=model, args=args, train_dataset=data, data_collator=collator, processing_class=processor)
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, EpochSeededSampler) and (sampler.lengths == data["length"] if grouped else sampler.lengths is None)
        padding[grouped] = padding_per_real_token(trainer)
    assert padding[True] < 0.5 * padding[False], padding


def test_merged_model_matches_the_adapter_on_a_full_precision_base(tmp_path, tiny_model_dir, prepared_sft):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from components.common.dataset import load_split
    from components.common.modeling import load_processor
    from components.common.training.collator import VisionSFTCollator

    out = tmp_path / "m"
    manifest = train(tiny_model_dir, prepared_sft, out, merge_adapter=True, max_steps=2)  # trained on a 4-bit base
    assert manifest["quantization"] == "4bit" and "merged/model.safetensors" in manifest["files"]
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert quantised_layers(merged) == {} and all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    processor = load_processor(str(tiny_model_dir))
    batch = VisionSFTCollator(processor)([dict(r) for r in load_split(str(prepared_sft), "train").select(range(3))])
    batch.pop("labels")
    with torch.no_grad():
        expected, got = unmerged(**batch).logits, merged(**batch).logits
        plain = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter really changed the model


