"""Loading models and processors the same way in every step: base models for training (full precision,
4-bit NF4 or 8-bit), and trained vlmtune model artifacts (adapter on its base) for inference.

A model reference is a local folder, a ``gs://`` folder (downloaded once into a cache) or a hub id.
``trust_remote_code`` stays off unless the caller turns it on; weights load from safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import storage

# Idefics3 parts that stay in full precision under 4/8-bit: the connector and lm_head may be trained
# (modules_to_save) and cannot be while quantised; the vision tower is small and frozen.
KEEP_IN_FULL_PRECISION = ["lm_head", r".*connector", r".*vision_model"]  # regexes matched from the module-name start


@dataclass(frozen=True)
class DeviceSettings:
    device: str
    dtype: Any  # torch.dtype
    attn_implementation: str
    optim: str
    bf16: bool


def device_settings() -> DeviceSettings:
    """bf16 + SDPA/flash attention + paged 8-bit AdamW on CUDA; fp32 + eager-safe SDPA + AdamW on CPU."""
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            attn = "sdpa"
        return DeviceSettings("cuda", torch.bfloat16 if bf16 else torch.float16, attn, "paged_adamw_8bit", bf16)
    return DeviceSettings("cpu", torch.float32, "sdpa", "adamw_torch", False)


def resolve_model_ref(ref: str, cache_dir: str | None = None) -> str:
    """A path or hub id that ``from_pretrained`` understands. gs:// folders are downloaded into a cache keyed
    by URI, so several steps in one container reuse the copy."""
    if storage.is_remote(ref):
        cache_root = Path(cache_dir or os.environ.get("VLMTUNE_CACHE", Path(tempfile.gettempdir()) / "vlmtune-models"))
        target = cache_root / hashlib.sha256(ref.encode()).hexdigest()[:16]
        if not (target / ".complete").exists():
            storage.download_dir(ref, target)
            (target / ".complete").write_text(ref)
        return str(target)
    if ref.startswith(storage.FILE_SCHEME):
        return str(storage.to_local_path(ref))
    return ref


def load_processor(ref: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve_model_ref(ref), trust_remote_code=trust_remote_code)


def quantization_config(quantization: str, compute_dtype):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=KEEP_IN_FULL_PRECISION,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_IN_FULL_PRECISION)
    raise ValueError(f"quantization must be none, 4bit or 8bit, not {quantization!r}")


def load_base_model(ref: str, quantization: str = "none", trust_remote_code: bool = False, dtype=None):
    """Load an Idefics3/SmolVLM (or any image-text-to-text) model for training or inference."""
    from transformers import AutoModelForImageTextToText

    settings = device_settings()
    dtype = dtype or settings.dtype
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": settings.attn_implementation,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    qconfig = quantization_config(quantization, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        # One GPU per process: under torchrun/accelerate each rank loads its quantised copy on its own device.
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        kwargs["device_map"] = {"": local_rank} if settings.device == "cuda" else {"": "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(resolve_model_ref(ref), **kwargs)
    if qconfig is None and settings.device == "cuda":
        model = model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return model


def read_model_manifest(model_uri: str) -> dict | None:
    """The vlmtune manifest of a trained model artifact, or None for a plain HF model folder / hub id."""
    from components.common import artifacts

    if not (storage.is_remote(model_uri) or Path(resolve_model_ref(model_uri)).is_dir()):
        return None
    try:
        manifest = json.loads(storage.read_text(storage.join(model_uri, artifacts.MANIFEST)))
    except FileNotFoundError:
        return None
    return manifest if manifest.get("kind") == "vlmtune.model" else None


def load_for_inference(model_ref: str, trust_remote_code: bool = False, dtype=None):
    """(model, processor) ready for ``generate``: a vlmtune artifact's adapter is loaded on its base model in
    full precision and merged (never merged into quantised weights); plain models load as they are."""
    from components.common import artifacts

    manifest = read_model_manifest(model_ref)
    if manifest is None:
        model = load_base_model(model_ref, trust_remote_code=trust_remote_code, dtype=dtype)
        processor = load_processor(model_ref, trust_remote_code)
    else:
        artifacts.read_manifest(model_ref, kind="vlmtune.model")
        local = resolve_model_ref(model_ref)
        if manifest.get("adapter"):
            from peft import PeftModel

            base = load_base_model(manifest["base_model"], trust_remote_code=trust_remote_code, dtype=dtype)
            model = PeftModel.from_pretrained(base, str(Path(local) / "adapter")).merge_and_unload()
        else:
            model = load_base_model(str(Path(local) / "model"), trust_remote_code=trust_remote_code, dtype=dtype)
        processor = load_processor(str(Path(local) / "processor"), trust_remote_code)
    model.eval()
    return model, processor
