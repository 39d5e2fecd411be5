"""GPU benchmark: QLoRA SFT of a random-weight model with SmolVLM-256M-Instruct's real shape, ours vs seed.

    python benchmarks/gpu_qlora.py [--steps 30] [--batch-size 16] [--workdir /tmp/vlmtune-bench-gpu]   # CUDA
    python benchmarks/gpu_qlora.py --smoke                                                              # CPU, seconds

Nothing is downloaded: the model is built from the config values written out below (random weights, so the
loss means nothing; the arithmetic is the real model's). Data: generated rows of mixed image sizes/aspect
ratios, answer lengths and 1-3 images per row, prepared with our ``prepare-data`` (images stay as generated;
the processor rescales them to 2048 px longest edge, 512 px tiles, 64 tokens per tile, as SmolVLM does).

Contenders (same 4-bit NF4 base, same LoRA r=16 on the text model + trainable connector/lm_head):
- ``ours``: ``components.sft.core.run`` as the pipeline runs it: bf16, SDPA/flash attention, paged 8-bit AdamW,
  gradient checkpointing (auto on CUDA), length-grouped batches, assistant-only labels.
- ``seed``: TRL ``SFTTrainer`` with the seed notebooks' settings: ``processing_class=processor``, TRL's default
  vision collator and ``SFTConfig`` defaults (bf16, gradient checkpointing, random batch order, its default
  optimizer), the same batch size.

"The batch that fits": each contender starts at ``--batch-size`` and halves on CUDA out-of-memory.
Measured per contender: samples/s, real (non-padding) tokens/s, padding per real token, peak GPU memory
(``torch.cuda.max_memory_allocated``; peak RSS on CPU) and model FLOPs utilisation (MFU: model FLOPs, as
estimated by ``model_flops`` below, per second over the GPU's dense bf16 peak; None where the peak is unknown
or on CPU). The last line printed is one JSON object.

``--smoke`` swaps in a scaled-down config (2 x 32 vision, 2 x 64 text, 64 px tiles) and a few steps so the
script is exercised on a CPU in CI (tests/benchmarks/test_smoke.py).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# HuggingFaceTB/SmolVLM-256M-Instruct's shape lives in components/common/model_shapes.py (shared with the slow-tier
# real-shape pipeline test and benchmarks/gradient_checkpointing.py).
from components.common.model_shapes import SMOLVLM_256M as _SMOLVLM_256M_SHAPE, build_shaped_model  # noqa: E402

SMOLVLM_256M = {
    **_SMOLVLM_256M_SHAPE,
    "image_scale": 8,  # generated images are 8x the CPU benchmark's (e.g. 1024x1024, 1536x512)
}
SMOKE = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 64, "patch_size": 16},
    "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048, "rope_theta": 10000.0,
             "rms_norm_eps": 1e-5},
    "scale_factor": 2,
    "longest_edge": 128,
    "image_scale": 1,
}
# Dense bf16 peak (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def build_model(folder: Path, spec: dict) -> Path:
    """Random-weight Idefics3 of ``spec`` + a SmolVLM-style processor (locally trained tokenizer)."""
    return build_shaped_model(folder, spec)


def make_data(workdir: Path, model: Path, rows: int, image_scale: int) -> Path:
    from benchmarks import train_throughput as tt

    if image_scale != 1:
        tt.SIZES = [(w * image_scale, h * image_scale) for w, h in tt.SIZES]
    return tt.prepare(tt.make_source(workdir / "source", rows), model, workdir / "prepared")


# ----------------------------------------------------------------------------------------------------------
# FLOPs


class BatchCounter:
    """Collator wrapper: padded positions, real tokens, real image tiles, longest sequence (for attention)."""

    def __init__(self, collator):
        self.collator = collator
        self.positions = self.real = self.tiles = self.attention_token_positions = 0

    def __call__(self, rows):
        batch = self.collator(rows)
        mask = batch["attention_mask"]
        self.positions += int(mask.numel())
        self.real += int(mask.sum())
        self.attention_token_positions += int((mask.sum(1) ** 2).sum())  # sum of seq_len^2 over rows
        if batch.get("pixel_values") is not None:
            self.tiles += int(batch["pixel_values"].flatten(2).ne(0).any(-1).sum())  # all-zero tiles are padding
        return batch

    def metrics(self) -> dict:
        return {"padded_tokens_per_real_token": (self.positions - self.real) / self.real if self.real else None}


def model_flops(spec: dict, counter: BatchCounter) -> float:
    """Model FLOPs of the work done (no recomputation counted), for QLoRA with a frozen base:
    text linears 4N per token (forward + activation gradients; frozen weights get no weight gradients),
    lm_head and connector 6N (trained), attention scores 12 L d per token pair; vision tower forward only
    (frozen, nothing upstream of it trains): 2N per patch plus attention."""
    v, t = spec["vision"], spec["text"]
    d, ff, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = d // t["num_attention_heads"] * t["num_key_value_heads"]
    text_linear = layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    flops = counter.real * (4 * text_linear + 6 * d * t["vocab_size"])
    flops += 12 * layers * d * counter.attention_token_positions
    dv, patches = v["hidden_size"], (v["image_size"] // v["patch_size"]) ** 2
    vision_linear = v["num_hidden_layers"] * (4 * dv * dv + 2 * dv * v["intermediate_size"]) + 3 * v["patch_size"] ** 2 * dv
    flops += counter.tiles * patches * 2 * vision_linear
    flops += counter.tiles * 4 * v["num_hidden_layers"] * dv * patches * patches
    connector_tokens = counter.tiles * patches // spec["scale_factor"] ** 2
    flops += connector_tokens * 6 * dv * spec["scale_factor"] ** 2 * d
    return float(flops)


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# ----------------------------------------------------------------------------------------------------------
# Contenders


def training_config(model: Path, args, batch_size: int):
    from components.common.config import build_config
    from components.sft.config import SFTStepConfig

    return build_config(SFTStepConfig, {
        "base_model": str(model), "method": "qlora", "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": 2e-4, "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant", "logging_steps": 10_000, "seed": 0, "max_length": 8192,
        "cpu_threads": 0 if not args.smoke else 1,
    })


def run_ours(model: Path, data: Path, out: Path, args, batch_size: int) -> tuple[dict, BatchCounter]:
    from components.sft import core

    counters = []

    def counting(collator):
        counters.append(BatchCounter(collator))
        return counters[-1]

    real_counter = core.PaddingCounter
    core.PaddingCounter = counting  # count tiles and attention too, with the step otherwise untouched
    try:
        manifest = core.run(training_config(model, args, batch_size), str(data), str(out))
    finally:
        core.PaddingCounter = real_counter
    from components.common.training.model import use_gradient_checkpointing

    m = manifest["metrics"]
    return {"train_s": m["train_runtime_s"], "gradient_checkpointing": use_gradient_checkpointing(training_config(model, args, batch_size))}, counters[-1]


def run_seed(model: Path, data: Path, out: Path, args, batch_size: int) -> tuple[dict, BatchCounter]:
    from trl import SFTConfig, SFTTrainer

    from components.common.modeling import device_settings, load_processor
    from components.common.training.model import keep_trainable_in_compute_dtype, load_trainable_model
    from components.common.dataset import load_split

    config = training_config(model, args, batch_size)
    train = load_split(str(data), "train")
    train = train.remove_columns([c for c in train.column_names if c not in ("messages", "images")])
    base, peft_config = load_trainable_model(config)
    trainer = SFTTrainer(
        model=base,
        args=SFTConfig(output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=args.steps,
                       learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=10_000, seed=0,
                       bf16=device_settings().bf16, report_to="none", disable_tqdm=True, save_strategy="no",
                       # TRL's default max_length=1024 truncates through SmolVLM's image blocks (up to 1088
                       # tokens per image) and crashes; the seed notebooks hit this too. Not truncating is
                       # the only setting under which the seed recipe runs on this data.
                       max_length=None),
        train_dataset=train,
        processing_class=load_processor(str(model)),
        peft_config=peft_config,
    )
    counter = BatchCounter(trainer.data_collator)
    trainer.data_collator = counter
    keep_trainable_in_compute_dtype(trainer.model)
    result = trainer.train()
    return {"train_s": result.metrics["train_runtime"], "gradient_checkpointing": trainer.args.gradient_checkpointing}, counter


CONTENDERS = {"seed": run_seed, "ours": run_ours}


def is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(name: str, model: Path, data: Path, workdir: Path, spec: dict, args) -> dict:
    import torch

    batch_size = args.batch_size
    while True:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            info, counter = CONTENDERS[name](model, data, workdir / f"out-{name}-b{batch_size}", args, batch_size)
            break
        except Exception as e:  # noqa: BLE001 - only OOM is retried
            if not is_oom(e) or batch_size == 1:
                raise
            print(f"{name}: batch {batch_size} does not fit; trying {batch_size // 2}", file=sys.stderr)
            batch_size //= 2
    if torch.cuda.is_available():
        peak_memory = int(torch.cuda.max_memory_allocated())
    else:
        import resource

        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_s = info["train_s"]
    flops = model_flops(spec, counter)
    peak = peak_flops()
    return {
        "batch_size": batch_size, "steps": args.steps, "train_s": train_s,
        "samples_per_s": args.steps * batch_size / train_s, "tokens_per_s": counter.real / train_s,
        "real_tokens": counter.real, "image_tiles": counter.tiles, **counter.metrics(),
        "peak_memory_bytes": peak_memory, "model_tflops_per_s": flops / train_s / 1e12,
        "mfu": flops / train_s / peak if peak else None, "gradient_checkpointing": info["gradient_checkpointing"],
    }


def environment() -> dict:
    import torch
    import transformers
    import trl

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "peak_bf16_flops": peak_flops(), "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Scaled-down model, few steps: runs on a CPU in seconds.")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps per contender (default 30; smoke 2).")
    parser.add_argument("--batch-size", type=int, default=None, help="Starting batch; halved on OOM (default 16; smoke 2).")
    parser.add_argument("--rows", type=int, default=None, help="Generated rows (default 512; smoke 16).")
    parser.add_argument("--workdir", default="/tmp/vlmtune-bench-gpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.steps = args.steps or (2 if args.smoke else 30)
    args.batch_size = args.batch_size or (2 if args.smoke else 16)
    args.rows = args.rows or (16 if args.smoke else 512)
    spec = SMOKE if args.smoke else SMOLVLM_256M
    workdir = Path(args.workdir) / ("smoke" if args.smoke else "smolvlm-256m") / f"rows{args.rows}"
    model = build_model(workdir / "model", spec)
    data = make_data(workdir, model, args.rows, spec["image_scale"])
    started = time.time()
    results = {name: measure(name, model, data, workdir, spec, args) for name in CONTENDERS}
    env = environment()
    print(f"{env['device']}, {env['date']}, torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}")
    print(f"{'':30}{'seed':>14}{'ours':>14}")
    for key in ("batch_size", "samples_per_s", "tokens_per_s", "padded_tokens_per_real_token", "peak_memory_bytes",
                "model_tflops_per_s", "mfu", "gradient_checkpointing"):
        cells = [results[n][key] for n in ("seed", "ours")]
        print(f"{key:30}" + "".join(f"{c:>14.4g}" if isinstance(c, float) else f"{c!s:>14}" for c in cells))
    summary = {
        "ratio": results["ours"]["tokens_per_s"] / results["seed"]["tokens_per_s"],
        "samples_per_s_ratio": results["ours"]["samples_per_s"] / results["seed"]["samples_per_s"],
        "peak_memory_ratio": results["ours"]["peak_memory_bytes"] / results["seed"]["peak_memory_bytes"],
        "smoke": args.smoke, "wall_s": time.time() - started, **env, **results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
