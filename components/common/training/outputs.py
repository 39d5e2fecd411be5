"""What every training step writes: the model artifact's folder (only rank 0 publishes), the trained
weights, processor, resolved config, metrics, log history and loss curve, and the model manifest (last)."""
from __future__ import annotations

import contextlib
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from components.common import artifacts, storage
from components.common.config import to_dict
from components.common.schema import MODEL_KIND
from components.common.training.distributed import wait_for_everyone
from components.common.training.model import trainable_parameter_count


@contextlib.contextmanager
def output_folder(output_uri: str, main_process: bool):
    """The artifact folder on the main process; a throwaway folder elsewhere (only rank 0 publishes)."""
    if main_process:
        with storage.local_output(output_uri) as out:
            yield out
    else:
        with tempfile.TemporaryDirectory(prefix="vlmtune-rank-") as scratch:
            yield Path(scratch)


def write_training_outputs(out: Path, trainer, processor, config, metrics: dict, title: str) -> None:
    # A PEFT model saves only its adapter (+ modules_to_save); a fully fine-tuned model saves all its weights.
    trained_part = "adapter" if hasattr(trainer.model, "peft_config") else "model"
    trainer.model.save_pretrained(out / trained_part, safe_serialization=True)
    processor.save_pretrained(out / "processor")
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=True))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    plot_loss_curve(trainer.state.log_history, out / "loss_curve.png", title)


def plot_loss_curve(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    held_out = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points), marker=".", label="training loss")
    if held_out:
        ax.plot(*zip(*held_out), marker="o", label="eval loss (held-out rows)")
        ax.legend()
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def training_metrics(trainer, train_result, rows: int, started: float, resumed_from: str | None) -> dict[str, Any]:
    """What a training step reports. ``train_loss``, ``global_steps`` and ``input_tokens_seen`` cover the whole
    run, steps before a resume included; the rates and ``steps_this_run`` cover this process's ``train()`` call."""
    trainable, total = trainable_parameter_count(trainer.model)
    runtime = train_result.metrics.get("train_runtime") or (time.time() - started)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
    tokens_this_run = tokens_seen - getattr(trainer, "tokens_before_resume", 0)
    return {
        "train_loss": float(train_result.training_loss),
        "first_logged_loss": float(losses[0]) if losses else None,
        "last_logged_loss": float(losses[-1]) if losses else None,
        "first_eval_loss": float(eval_losses[0]) if eval_losses else None,
        "last_eval_loss": float(eval_losses[-1]) if eval_losses else None,
        "global_steps": int(trainer.state.global_step),
        "steps_this_run": int(trainer.state.global_step) - getattr(trainer, "steps_before_resume", 0),
        "resumed_from": Path(resumed_from).name if resumed_from else None,
        "input_tokens_seen": tokens_seen,
        "train_rows": rows,
        "train_runtime_s": float(runtime),
        "samples_per_s": float(train_result.metrics.get("train_samples_per_second", 0.0)),
        "tokens_per_s": float(tokens_this_run / runtime) if runtime else 0.0,
        "peak_memory_bytes": peak_memory_bytes(),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def model_manifest(out: Path, config, metrics: dict, *, stage: str, adapter: bool, dataset: dict,
                   **extra: Any) -> dict[str, Any]:
    """The ``vlmtune.model`` manifest of a finished training artifact in ``out`` (written last, by the caller).

    ``content_hash`` covers the trained weights only (``adapter/`` or ``model/``), so the registry recognises
    the same model however its side files (plots, logs) differ."""
    files = [p.relative_to(out).as_posix() for p in sorted(out.rglob("*")) if p.is_file()]
    return {
        "kind": MODEL_KIND,
        "stage": stage,
        "base_model": config.base_model,
        "adapter": adapter,
        "method": config.method,
        "quantization": config.resolved_quantization(),
        "dataset": dataset,
        **extra,
        "config": to_dict(config),
        "metrics": metrics,
        "files": files,
        "content_hash": artifacts.hash_files([str(out / f) for f in files if f.startswith(("adapter/", "model/"))]),
    }


def manifest_from_rank_zero(output_uri: str) -> dict[str, Any]:
    """On every rank but 0 of a multi-process run: wait until rank 0 has published the artifact, return its
    manifest (only rank 0 writes)."""
    wait_for_everyone()
    return artifacts.read_manifest(output_uri, kind=MODEL_KIND)
