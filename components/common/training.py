"""Training machinery shared by the SFT and DPO steps: model + LoRA setup, checkpoints in object storage
that survive preemption, and the metrics/plots every training step writes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from components.common import storage

log = logging.getLogger(__name__)
CHECKPOINT_MARKER = "COMPLETE"


def lora_config(config, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    from components.sft.config import TEXT_LORA_TARGETS, VISION_LORA_TARGETS

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


def use_gradient_checkpointing(config) -> bool:
    from components.common.modeling import device_settings

    value = str(config.gradient_checkpointing).lower()
    return device_settings().device == "cuda" if value == "auto" else value == "true"


def load_trainable_model(config):
    """The base model ready for training: quantised and prepared for k-bit training for QLoRA, with the
    vision tower frozen unless LoRA targets it (the trainer adds LoRA from the returned peft config)."""
    from components.common.modeling import load_base_model

    if config.cpu_threads > 0:
        import torch

        torch.set_num_threads(config.cpu_threads)
    quantization = config.resolved_quantization()
    model = load_base_model(config.base_model, quantization=quantization, trust_remote_code=config.trust_remote_code)
    model.config.use_cache = False
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=use_gradient_checkpointing(config))
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


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# --- checkpoints in object storage -------------------------------------------------------------------
#
# The HF Trainer writes a complete checkpoint folder (adapter or model, optimizer, scheduler, RNG state of
# every process, trainer_state.json with the step and log history) into its local output_dir; the callback
# below copies that folder to ``<checkpoint_uri>/checkpoint-N`` and writes ``COMPLETE`` last. On start, the
# newest folder with a marker is copied back and handed to ``trainer.train(resume_from_checkpoint=...)``,
# which restores all of the above and skips the batches already seen (same data order for the same seed).
# A folder without its marker (a writer killed mid-upload) is ignored and overwritten by the next save.


def _checkpoint_step(name: str) -> int | None:
    prefix = "checkpoint-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return None


def latest_complete_checkpoint(checkpoint_uri: str | None) -> str | None:
    """URI of the newest ``checkpoint-N`` under ``checkpoint_uri`` whose marker exists (written last)."""
    if not checkpoint_uri:
        return None
    root = str(checkpoint_uri).rstrip("/")
    steps = []
    for uri in storage.list_files(checkpoint_uri):
        parts = uri[len(root) + 1:].split("/")
        if len(parts) == 2 and parts[1] == CHECKPOINT_MARKER and _checkpoint_step(parts[0]) is not None:
            steps.append(_checkpoint_step(parts[0]))
    return storage.join(checkpoint_uri, f"checkpoint-{max(steps)}") if steps else None


def fetch_checkpoint(checkpoint_uri: str | None, output_dir: Path) -> str | None:
    """Copy the latest complete checkpoint into the trainer's output_dir; return its local path.

    In a multi-process run the output_dir is shared (see ``trainer_work_dir``): process 0 downloads, the others
    wait, and all resume from the same folder (each reads its own ``rng_state_<rank>.pth``)."""
    latest = latest_complete_checkpoint(checkpoint_uri)
    dist = _distributed()
    local = output_dir / latest.rstrip("/").split("/")[-1] if latest else None
    if latest is not None and (dist is None or dist.get_rank() == 0):
        if storage.is_remote(latest) or Path(storage.to_local_path(latest)).resolve() != local.resolve():
            if local.exists():
                shutil.rmtree(local)
            storage.download_dir(latest, local)
            (local / CHECKPOINT_MARKER).unlink(missing_ok=True)
    if dist is not None:
        dist.barrier()
    if latest is None:
        return None
    log.info("resuming from %s", latest)
    return str(local)


@contextlib.contextmanager
def trainer_work_dir(prefix: str, output_uri: str):
    """The Trainer's local output_dir (checkpoints are written here, then published). A temporary folder; in a
    multi-process run on one node, one folder shared by all processes, because each process writes its own
    RNG state into the same checkpoint folder as process 0's weights and optimizer."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        with tempfile.TemporaryDirectory(prefix=prefix) as work:
            yield work
        return
    run_key = "|".join([os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("MASTER_ADDR", ""),
                        os.environ.get("MASTER_PORT", ""), str(output_uri)])
    work = Path(tempfile.gettempdir()) / f"{prefix}{hashlib.sha256(run_key.encode()).hexdigest()[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield str(work)
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(work, ignore_errors=True)


def _distributed():
    """torch.distributed when a multi-process run (accelerate/torchrun) has initialised it, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any: all ranks must stop (and save) at the same step,
    or the collective ops of the save would hang."""
    dist = _distributed()
    if dist is None:
        return flag
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def publish_checkpoint(local: Path, checkpoint_uri: str, step: int) -> str:
    """Copy a finished local checkpoint folder to ``<checkpoint_uri>/checkpoint-<step>``, marker last.

    A folder already there (a run killed while uploading the same step) loses its marker first and is cleared,
    so stale files never sit beside new ones under a marker."""
    target = storage.join(checkpoint_uri, f"checkpoint-{step}")
    same_place = not storage.is_remote(target) and storage.to_local_path(target).resolve() == local.resolve()
    if not same_place:
        storage.delete(storage.join(target, CHECKPOINT_MARKER))
        storage.delete(target)
        storage.upload_dir(local, target)
    storage.write_text(storage.join(target, CHECKPOINT_MARKER), json.dumps({"step": step, "time": time.time()}))
    log.info("checkpoint %s published", target)
    return target


def make_checkpoint_callback(checkpoint_uri: str | None):
    """A TrainerCallback that publishes each checkpoint to object storage (marker last) and turns SIGTERM
    (how Vertex spot VMs and Kubernetes announce preemption) into save-at-the-end-of-this-step, then exit 143.

    The save happens after the optimiser step in progress (a partial gradient-accumulation window cannot be
    resumed), so keep one optimiser step well under the grace period (30 s on Vertex spot, 30 s by default
    on Kubernetes: ``terminationGracePeriodSeconds``)."""
    from transformers import TrainerCallback

    class CheckpointToStorage(TrainerCallback):
        def __init__(self):
            self.sigterm = False
            self.previous_handler = None

        def on_train_begin(self, args, state, control, **kwargs):
            def handle_sigterm(signum, frame):
                log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
                self.sigterm = True

            if checkpoint_uri:
                self.previous_handler = signal.signal(signal.SIGTERM, handle_sigterm)

        def on_step_end(self, args, state, control, **kwargs):
            if checkpoint_uri and _any_process(self.sigterm):
                self.sigterm = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if not checkpoint_uri:
                return
            dist = _distributed()
            if dist is not None:
                dist.barrier()  # every rank has written its rng_state_<rank>.pth
            if state.is_world_process_zero:
                publish_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", checkpoint_uri, state.global_step)
            if dist is not None:
                dist.barrier()  # nobody exits before the marker is written
            if self.sigterm:
                log.warning("checkpoint-%d is safe; exiting with status 143 (SIGTERM)", state.global_step)
                self.on_train_end(args, state, control)
                raise SystemExit(143)

        def on_train_end(self, args, state, control, **kwargs):
            if self.previous_handler is not None:
                signal.signal(signal.SIGTERM, self.previous_handler)
                self.previous_handler = None

    return CheckpointToStorage()


# --- metrics -------------------------------------------------------------------------------------------

def plot_loss_curve(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points), marker=".")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_metrics(trainer, train_result, tokens_seen: int, rows: int, started: float) -> dict[str, Any]:
    trainable, total = trainable_parameter_count(trainer.model)
    runtime = train_result.metrics.get("train_runtime") or (time.time() - started)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": float(train_result.training_loss),
        "first_logged_loss": float(losses[0]) if losses else None,
        "last_logged_loss": float(losses[-1]) if losses else None,
        "global_steps": int(trainer.state.global_step),
        "train_rows": rows,
        "train_runtime_s": float(runtime),
        "samples_per_s": float(train_result.metrics.get("train_samples_per_second", 0.0)),
        "tokens_per_s": float(tokens_seen / runtime) if runtime else 0.0,
        "peak_memory_bytes": peak_memory_bytes(),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def keep_trainable_in_compute_dtype(model) -> None:
    """TRL casts every trainable parameter of a quantised model to bf16 (the QLoRA paper's recipe for GPUs).
    Without bf16 compute (CPU, older GPUs) that breaks fp32 matmuls, so cast them back to the compute dtype.
    Call after building the trainer, before ``train()`` creates the optimizer."""
    from components.common.modeling import device_settings

    settings = device_settings()
    if settings.bf16:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != settings.dtype:
            param.data = param.data.to(settings.dtype)


def common_training_arguments(config, output_dir: str, checkpoint_uri: str | None) -> dict:
    """The TrainingArguments both SFT and DPO take from our config: schedule, precision/optimizer for the device,
    checkpoints only when there is somewhere to publish them, no truncation (the steps drop over-budget rows)."""
    from components.common.modeling import device_settings

    settings = device_settings()
    return dict(
        output_dir=output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        lr_scheduler_type=config.lr_scheduler_type,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps" if checkpoint_uri else "no",
        save_steps=config.save_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=settings.bf16,
        optim=settings.optim,
        gradient_checkpointing=use_gradient_checkpointing(config),
        # Non-reentrant checkpointing works with frozen inputs (LoRA on a frozen base) without extra hooks.
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,  # budget enforced by dropping rows; truncation could cut an image
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
    )
