"""The model a training step trains: the base (4-bit for QLoRA), LoRA settings, dtype fixes, and the merged
full-precision copy written for serving."""
from __future__ import annotations

from pathlib import Path

from components.common.modeling import device_settings, load_base_model
from components.common.training.config import TEXT_LORA_TARGETS, VISION_LORA_TARGETS


def lora_config(config, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    targets = {
        "text": TEXT_LORA_TARGETS,
        "text+vision": f"({TEXT_LORA_TARGETS})|({VISION_LORA_TARGETS})",
    }.get(config.lora_targets, config.lora_targets)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_dora=config.use_dora,
        target_modules=targets,
        modules_to_save=list(config.trainable_modules) or None,
        task_type=task_type,
        init_lora_weights=True,
    )


def text_activation_units(base_model: str, trust_remote_code: bool = False) -> int | None:
    """Layers x hidden size of the model's text decoder: what the activations kept for the backward pass grow
    with per token. None when the config cannot be read or has neither field."""
    try:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the model load itself
        return None
    text = getattr(model_config, "text_config", None) or model_config
    layers, hidden = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    return int(layers) * int(hidden) if layers and hidden else None


# ``gradient_checkpointing: auto`` on a CPU, chosen by measurement: benchmarks/gradient_checkpointing.py (QLoRA
# SFT, batch 2, one thread; results in benchmarks/results/gradient_checkpointing.json, 2026-12-04). On a CPU
# checkpointing costs far more than the textbook third, 2-2.5x the CPU time per step, and saves memory only when
# activations, not the model, set the peak. SmolVLM-256M-shaped: at 85 tokens/sample (need-based 512 px) 2% less
# peak RSS; at 352 (1024 px, fixed sizing) 20% *more*; at 1,146 (its own 2048 px, fixed) 12.6 -> 10.5 GB (16%
# less). So: on when the activations a batch keeps without checkpointing are estimated at >= 2 GiB (the 1,146-token
# case is 5.4 GB by this estimate, the 352-token one 1.7 GB). Estimate: batch x longest row (tokens) x text layers x hidden x 136 bytes (~34 fp32
# values per hidden unit per layer and token: attention inputs/outputs, the MLP's 2.7x-wide intermediates, norms).
ACTIVATION_BYTES_PER_TOKEN_UNIT = 136
CPU_CHECKPOINTING_MIN_ACTIVATION_BYTES = 2 * 2**30


def estimated_activation_bytes(config, longest_row_tokens: int | None) -> int | None:
    """Activations one batch keeps for the backward pass without checkpointing (see above); None if unknown."""
    units = text_activation_units(config.base_model, config.trust_remote_code) if config.base_model else None
    if units is None or not longest_row_tokens:
        return None
    return config.per_device_train_batch_size * int(longest_row_tokens) * units * ACTIVATION_BYTES_PER_TOKEN_UNIT


def use_gradient_checkpointing(config, longest_row_tokens: int | None = None) -> bool:
    """``true``/``false`` as given; ``auto``: on for CUDA (memory is the limit there); on a CPU only when the
    estimated activations of a batch (``estimated_activation_bytes``: the model's config and the longest row's
    tokens) reach ``CPU_CHECKPOINTING_MIN_ACTIVATION_BYTES``; off when either is unknown."""
    value = str(config.gradient_checkpointing).lower()
    if value != "auto":
        return value == "true"
    if device_settings().device == "cuda":
        return True
    estimate = estimated_activation_bytes(config, longest_row_tokens)
    return estimate is not None and estimate >= CPU_CHECKPOINTING_MIN_ACTIVATION_BYTES


def load_trainable_model(config):
    """The base model ready for training: quantised and prepared for k-bit training for QLoRA, with the
    vision tower frozen unless LoRA targets it (the trainer adds LoRA from the returned peft config)."""
    if config.cpu_threads > 0:
        import torch

        torch.set_num_threads(config.cpu_threads)
    quantization = config.resolved_quantization()
    model = load_base_model(config.base_model, quantization=quantization, trust_remote_code=config.trust_remote_code)
    model.config.use_cache = False
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Checkpointing is not switched on here: PEFT would call the deprecated gradient_checkpointing_enable with
        # reentrant checkpoints. The Trainer turns it on (non-reentrant) from activation_checkpointing (arguments.py),
        # and TRL adds the input-gradient hook a PEFT model needs with it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.method == "full":
        vision = getattr(getattr(model, "model", model), "vision_model", None)
        if vision is not None:
            vision.requires_grad_(False)
        return model, None
    return model, lora_config(config)


def trainable_parameter_count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def keep_trainable_in_compute_dtype(model) -> None:
    """TRL casts every trainable parameter of a quantised model to bf16 (the QLoRA paper's recipe for GPUs).
    Without bf16 compute (CPU, older GPUs) that breaks fp32 matmuls, so cast them back to the compute dtype.
    Call after building the trainer, before ``train()`` creates the optimizer."""
    settings = device_settings()
    if settings.bf16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != settings.dtype:
            param.data = param.data.to(settings.dtype)


def merge_adapter_into_full_precision_base(out: Path, config) -> None:
    """Merged model for serving: the base is reloaded in full precision, never merged into 4-bit weights."""
    import torch
    from peft import PeftModel

    base = load_base_model(config.base_model, quantization="none", dtype=torch.float32, trust_remote_code=config.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    merged.save_pretrained(out / "merged", safe_serialization=True)
