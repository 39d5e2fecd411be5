"""Benchmark: gradient (activation) checkpointing on vs off for QLoRA SFT on a CPU, side by side in one run.

    python benchmarks/gradient_checkpointing.py [--steps 3] [--batch-size 2] [--workdir /tmp/vlmtune-bench-gc]
    python benchmarks/gradient_checkpointing.py --smoke        # the tiny model only, 2 steps: seconds

What it measures, per case (model x image size) and per setting (checkpointing off, on), each training in its
own subprocess so its peak RSS is its own: CPU seconds per optimiser step inside ``trainer.train()``
(``time.process_time``, one torch thread, so it is fair on a shared machine; wall is reported too but is
noisy), the peak RSS of the whole step (``ru_maxrss``: model load, quantisation and training), and the real
tokens per sample the collator produced. Ratios (on / off) are within one run.

Cases:
- ``tiny``: the embedded demo model (``common/tiny_model.py``), demo rows (128 px shapes).
- ``smolvlm-256m@512``: a random-weight model with SmolVLM-256M's real shape (``common/model_shapes.py``:
  93M-parameter SigLIP at 512 px tiles, 30 x 576 Llama, 64 tokens per tile), demo rows (128 px) under the
  default need-based sizing capped at 512: one tile, 64 image tokens.
- ``smolvlm-256m@1024-fixed`` / ``@2048-fixed``: the same rows with ``image_sizing: fixed`` (upscaled to the
  edge, as the processor does by default): 4 tiles + the global view (320 image tokens), and at the processor's
  own 2048 px 16 tiles + the global view (1,088): where activations, not the model, set the peak.

The same QLoRA recipe as the pipeline (``components.sft.core.run``: NF4 base, LoRA r=16 on the text model,
connector and lm_head trained), batch ``--batch-size``, ``--steps`` steps, fp32 compute (CPU). The last line
printed is one JSON object.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CASES = {  # name -> (model, prepare-data longest_edge (None = the processor's own), image_sizing)
    "tiny": ("tiny", None, "need"),
    "smolvlm-256m@512": ("smolvlm-256m", 512, "need"),
    "smolvlm-256m@1024-fixed": ("smolvlm-256m", 1024, "fixed"),
    "smolvlm-256m@2048-fixed": ("smolvlm-256m", 2048, "fixed"),
}
SMOKE_CASES = ("tiny",)


def build_model(workdir: Path, model: str) -> Path:
    if model == "tiny":
        from components.common.tiny_model import build_tiny_model

        folder = workdir / "model-tiny"
        return folder if (folder / "model.safetensors").exists() else build_tiny_model(folder)
    from components.common.model_shapes import build_shaped_model

    return build_shaped_model(workdir / f"model-{model}", model)


def prepare(workdir: Path, model_dir: Path, case: str, longest_edge: int | None, sizing: str, rows: int) -> Path:
    out = workdir / f"data-{case}-{rows}"
    if (out / "manifest.json").exists():
        return out
    from components.common.config import build_config
    from components.common.demo_data import write_demo_data
    from components.prepare_data.config import PrepareDataConfig
    from components.prepare_data.core import run

    source = workdir / f"source-{rows}"
    if not (source / "DONE").exists():
        write_demo_data(source, rows=rows, preference_rows=0)
    settings = {"task": "sft", "processor": str(model_dir), "eval_fraction": 0.0, "progress": False, "num_workers": 0,
                "image_sizing": sizing}
    if longest_edge:
        settings["longest_edge"] = longest_edge
    run(build_config(PrepareDataConfig, settings), str(source / "sft"), str(out))
    return out


# ----------------------------------------------------------------------------------------------------------
# One training (child process: ``--child``)


def child(model_dir: str, data: str, out: str, gradient_checkpointing: bool, steps: int, batch_size: int) -> dict:
    import resource

    import transformers

    from components.common.config import build_config
    from components.sft.config import SFTStepConfig
    from components.sft.core import run

    timing = {}
    original = transformers.Trainer.train

    def timed_train(self, *args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timing.update(train_cpu_s=time.process_time() - cpu, train_wall_s=time.perf_counter() - wall)

    transformers.Trainer.train = timed_train
    config = build_config(SFTStepConfig, {
        "base_model": model_dir, "method": "qlora", "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 2e-4, "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant", "logging_steps": 1, "seed": 0, "max_length": 8192, "cpu_threads": 1,
        "gradient_checkpointing": str(gradient_checkpointing).lower(), "group_by_length": False,
    })
    manifest = run(config, data, out)
    m = manifest["metrics"]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "gradient_checkpointing": gradient_checkpointing, "steps": steps, "batch_size": batch_size,
        "cpu_s_per_step": timing["train_cpu_s"] / steps, "wall_s_per_step": timing["train_wall_s"] / steps,
        "process_cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
        "real_tokens_per_sample": m["input_tokens_seen"] / (steps * batch_size),
        "final_loss": m.get("last_logged_loss") or m.get("train_loss"),
    }


def run_child(model_dir: Path, data: Path, out: Path, gc_on: bool, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--child", json.dumps([str(model_dir), str(data), str(out), gc_on, args.steps, args.batch_size])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"training with gradient_checkpointing={gc_on} on {data} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def activation_scale(model_dir: Path) -> dict:
    """What the CPU rule in common/training/model.py reads from the model's config."""
    from components.common.training.model import text_activation_units

    return {"text_layers_x_hidden": text_activation_units(str(model_dir))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="The tiny model only, 2 steps (CI smoke test).")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps per training (default 3; smoke 2).")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--cases", default=None, help=f"Comma-separated subset of {', '.join(CASES)}.")
    parser.add_argument("--workdir", default="/tmp/vlmtune-bench-gc")
    parser.add_argument("--child-timeout", type=int, default=1800)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.steps = args.steps or (2 if args.smoke else 3)
    names = args.cases.split(",") if args.cases else (SMOKE_CASES if args.smoke else tuple(CASES))
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    workdir = Path(args.workdir)
    rows = args.steps * args.batch_size
    started = time.time()
    results = {}
    for name in names:
        model, longest_edge, sizing = CASES[name]
        model_dir = build_model(workdir, model)
        data = prepare(workdir, model_dir, name, longest_edge, sizing, rows)
        manifest = json.loads((data / "manifest.json").read_text())
        tokens = {"image_tokens_per_image": (manifest.get("tokens_per_image") or {}).get("histogram")}
        off, on = (run_child(model_dir, data, workdir / f"out-{name}-gc{int(gc)}", gc, args) for gc in (False, True))
        results[name] = {
            "model": model, "longest_edge": longest_edge, "image_sizing": sizing, **activation_scale(model_dir), "dataset_tokens": tokens,
            "off": off, "on": on,
            "cpu_time_ratio_on_vs_off": on["cpu_s_per_step"] / off["cpu_s_per_step"],
            "peak_rss_ratio_on_vs_off": on["peak_rss_mb"] / off["peak_rss_mb"],
            "peak_rss_saved_mb": off["peak_rss_mb"] - on["peak_rss_mb"],
        }
        print(f"{name:20} off {off['cpu_s_per_step']:8.2f} CPU-s/step {off['peak_rss_mb']:8.0f} MB | "
              f"on {on['cpu_s_per_step']:8.2f} CPU-s/step {on['peak_rss_mb']:8.0f} MB | "
              f"time x{results[name]['cpu_time_ratio_on_vs_off']:.2f}, RSS x{results[name]['peak_rss_ratio_on_vs_off']:.2f}",
              file=sys.stderr)
    import torch
    import transformers

    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 torch thread per training)",
        "load_average": os.getloadavg()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "smoke": args.smoke, "steps": args.steps, "batch_size": args.batch_size, "wall_s": time.time() - started,
        "cases": results,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
