"""Random-weight models with a real model's shape, built locally (no hub): the arithmetic and memory of the
real model, for tests and benchmarks that must show shape-dependent breakage or cost before a GPU hour does.

    from components.common.model_shapes import build_shaped_model
    build_shaped_model("/tmp/smolvlm-256m-random", "smolvlm-256m")

Weights are random (seeded), so losses and answers mean nothing. The tokenizer is the tiny model's
(``tiny_model.build_tokenizer``, 1,024 ids, SmolVLM's special tokens): its ids all fall inside the real
vocabulary, the extra embedding rows of a 49,280 vocabulary are simply never used. Text therefore tokenises
into more, shorter pieces than with SmolVLM's own tokenizer; image tokens (the bulk of a sample) are exact,
because the processor settings are SmolVLM-256M's own.
"""
from __future__ import annotations

import json
from pathlib import Path

# HuggingFaceTB/SmolVLM-256M-Instruct, written out from memory of its config.json (no hub access here).
# Sure: Idefics3 layout, SigLIP vision 768 hidden / 12 layers / 12 heads / patch 16 / 512 px, Llama text
# 576 hidden / 30 layers / 9 heads / 3 KV heads / 1536 MLP, vocab 49280, pixel-shuffle scale_factor 4
# (so 64 tokens per 512 px tile), processor longest_edge 2048 with 512 px tiles.
# Less sure (do not change FLOPs or memory much): rope_theta 100000, max_position_embeddings 8192,
# rms_norm_eps 1e-5, tie_word_embeddings False (SmolLM2-135M ties them; a tie would save ~28M parameters).
SMOLVLM_256M = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 512, "patch_size": 16},
    "text": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49280, "max_position_embeddings": 8192, "rope_theta": 100000.0,
             "rms_norm_eps": 1e-5},
    "scale_factor": 4,
    "longest_edge": 2048,
}

SHAPES = {"smolvlm-256m": SMOLVLM_256M}


def shape_spec(shape: str) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}: choose one of {', '.join(sorted(SHAPES))}")
    return SHAPES[shape]


def shaped_processor(spec: dict):
    """An Idefics3 processor with the shape's image settings (longest edge, tile size, tokens per tile) and the
    tiny tokenizer."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from components.common.tiny_model import SMOLVLM_CHAT_TEMPLATE, build_tokenizer

    vision = spec["vision"]
    tile = vision["image_size"]
    return Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": spec["longest_edge"]},
                                               max_image_size={"longest_edge": tile}, do_image_splitting=True),
        tokenizer=build_tokenizer(),  # ids < 1024; see the module docstring
        image_seq_len=(tile // vision["patch_size"]) ** 2 // spec["scale_factor"] ** 2,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


def build_shaped_model(output: str | Path, shape: str | dict = "smolvlm-256m", seed: int = 0) -> Path:
    """Write a random-weight Idefics3 of ``shape`` (a name in ``SHAPES`` or a spec dict of the same layout)
    plus a processor with that shape's image settings to ``output``; return the folder. An existing build
    (``config.json`` present) is reused."""
    output = Path(output)
    if (output / "config.json").exists() and (output / "model.safetensors").exists():
        return output
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    spec = shape_spec(shape) if isinstance(shape, str) else shape
    processor = shaped_processor(spec)
    tokenizer = processor.tokenizer
    vision, text = spec["vision"], spec["text"]
    config = Idefics3Config(
        vision_config=dict(vision),
        text_config={"model_type": "llama", **text, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "tie_word_embeddings": False},
        scale_factor=spec["scale_factor"], image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    processor.save_pretrained(output)
    (output / "vlmtune_shaped_model.json").write_text(json.dumps(
        {"shape": shape if isinstance(shape, str) else "custom", "seed": seed, "random_weights": True,
         "tokenizer": "tiny (1024 ids)", "parameters": sum(p.numel() for p in model.parameters())}, indent=2))
    return output
