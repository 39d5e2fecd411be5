"""The SFT step: QLoRA supervised fine-tuning with TRL's SFTTrainer, PEFT LoRA and bitsandbytes NF4.

Reads top to bottom: validate inputs -> load data and drop over-budget rows (never truncate through an
image) -> load the base (4-bit for QLoRA) -> train with assistant-only labels, checkpointing to object
storage -> write adapter, processor, resolved config, metrics, loss curve and TensorBoard events -> manifest
last.

    vlmtune sft --dataset DATA_URI --output MODEL_URI --base-model HuggingFaceTB/SmolVLM-256M-Instruct
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from components.common import artifacts, storage
from components.common.config import to_dict
from components.common.schema import DATASET_KIND, MODEL_KIND
from components.sft.config import SFTStepConfig
from components.sft.masking import SequenceTooLongError, VisionSFTCollator

log = logging.getLogger(__name__)


class TooManyRowsOverBudgetError(ValueError):
    pass


def filter_by_token_budget(dataset, collator: VisionSFTCollator, max_too_long_fraction: float, what: str = "train"):
    """Add a ``length`` column (real tokens per row, images expanded) and drop rows over the budget.

    Returns (dataset, number dropped). Fails when the dropped share passes ``max_too_long_fraction``.
    """
    lengths, keep = [], []
    too_long = 0
    for i, row in enumerate(dataset):
        try:
            lengths.append(len(collator.encode(row)["input_ids"]))
            keep.append(i)
        except SequenceTooLongError:
            too_long += 1
    if dataset.num_rows and too_long / dataset.num_rows > max_too_long_fraction:
        raise TooManyRowsOverBudgetError(
            f"{too_long} of {dataset.num_rows} {what} rows exceed max_length={collator.max_length} tokens "
            f"(limit {max_too_long_fraction:.0%}). Raise max_length, lower the image resolution in prepare-data, "
            f"or raise max_too_long_fraction to drop them."
        )
    if too_long:
        log.warning("dropped %d %s rows over max_length=%d tokens", too_long, what, collator.max_length)
    dataset = dataset.select(keep).add_column("length", lengths)
    return dataset, too_long


def write_training_outputs(out: Path, trainer, processor, config, metrics: dict, title: str) -> None:
    from components.common.training import plot_loss_curve

    # A PEFT model saves only its adapter (+ modules_to_save); a fully fine-tuned model saves all its weights.
    trained_part = "adapter" if hasattr(trainer.model, "peft_config") else "model"
    trainer.model.save_pretrained(out / trained_part, safe_serialization=True)
    processor.save_pretrained(out / "processor")
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=True))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    plot_loss_curve(trainer.state.log_history, out / "loss_curve.png", title)


def merge_adapter_into_full_precision_base(out: Path, config) -> None:
    """Merged model for serving: the base is reloaded in full precision, never merged into 4-bit weights."""
    import torch
    from peft import PeftModel

    from components.common.modeling import load_base_model

    base = load_base_model(config.base_model, quantization="none", dtype=torch.float32, trust_remote_code=config.trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    merged.save_pretrained(out / "merged", safe_serialization=True)


def is_main_process() -> bool:
    """False on every process but the first of a multi-process run (``accelerate launch``/``torchrun``)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def output_folder(output_uri: str, main_process: bool):
    """The artifact folder on the main process; a throwaway folder elsewhere (only rank 0 publishes)."""
    if main_process:
        with storage.local_output(output_uri) as out:
            yield out
    else:
        with tempfile.TemporaryDirectory(prefix="vlmtune-rank-") as scratch:
            yield Path(scratch)


class PaddingCounter:
    """Wraps a collator and counts the tokens it hands the model: all positions vs real (attention) ones, so
    the step reports how much of its compute went on padding."""

    def __init__(self, collator):
        self.collator = collator
        self.positions = 0
        self.real = 0

    def __call__(self, rows):
        batch = self.collator(rows)
        self.positions += int(batch["input_ids"].numel())
        self.real += int(batch["attention_mask"].sum())
        return batch

    def metrics(self) -> dict[str, float | None]:
        return {"padded_tokens_per_real_token": (self.positions - self.real) / self.real if self.real else None}


def training_arguments(config: SFTStepConfig, output_dir: str, checkpoint_uri: str | None = None):
    """TRL ``SFTConfig`` for our step: the device's precision/optimizer, length-grouped batches (the dataset
    carries a ``length`` column), our own collator (TRL's dataset preparation is skipped), no truncation."""
    from trl import SFTConfig

    from components.common.training import common_training_arguments

    return SFTConfig(
        **common_training_arguments(config, output_dir, checkpoint_uri),
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
    )


def run(config: SFTStepConfig, dataset_uri: str, output_uri: str, checkpoint_uri: str | None = None) -> dict[str, Any]:
    from transformers import set_seed
    from transformers.integrations import TensorBoardCallback
    from torch.utils.tensorboard import SummaryWriter
    from trl import SFTTrainer

    from components.common.modeling import load_processor
    from components.common.training import (
        fetch_checkpoint,
        keep_trainable_in_compute_dtype,
        load_trainable_model,
        make_checkpoint_callback,
        trainer_work_dir,
        training_metrics,
    )
    from components.common.dataset import load_split
    from components.common.processor_settings import apply_processor_settings

    started = time.time()
    dataset_manifest = artifacts.read_manifest(dataset_uri, kind=DATASET_KIND)
    if dataset_manifest.get("task") != "sft":
        raise ValueError(f"{dataset_uri!r} is a {dataset_manifest.get('task')!r} dataset; sft needs one prepared with --task sft")
    set_seed(config.seed)
    processor = load_processor(config.base_model, config.trust_remote_code)
    # Resize as the dataset was prepared for (its token counts hold), and save the processor that way.
    apply_processor_settings(processor, dataset_manifest.get("processor_settings"))
    collator = VisionSFTCollator(processor, max_length=config.max_length)
    train, dropped = filter_by_token_budget(load_split(dataset_uri, "train"), collator, config.max_too_long_fraction)
    if train.num_rows == 0:
        raise ValueError(f"{dataset_uri!r} has no train rows within the token budget; nothing to train on")

    model, peft_config = load_trainable_model(config)
    main_process = is_main_process()
    with output_folder(output_uri, main_process) as out, trainer_work_dir("vlmtune-sft-", output_uri) as work:
        args = training_arguments(config, work, checkpoint_uri)
        counting = PaddingCounter(collator)
        checkpoints = make_checkpoint_callback(checkpoint_uri)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            data_collator=counting,
            processing_class=processor,
            peft_config=peft_config,
            callbacks=[checkpoints, TensorBoardCallback(SummaryWriter(str(out / "tensorboard")))],
        )
        keep_trainable_in_compute_dtype(trainer.model)
        resume_from = fetch_checkpoint(checkpoint_uri, Path(work))
        result = trainer.train(resume_from_checkpoint=resume_from)
        tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
        metrics = training_metrics(trainer, result, tokens_seen, train.num_rows, started)
        metrics.update({"rows_over_token_budget": dropped, **counting.metrics(), "resumed_from": resume_from.rsplit("/", 1)[-1] if resume_from else None})
        if not main_process:  # multi-process run: rank 0 writes the artifact; the others wait for it
            wait_for_everyone()
            return artifacts.read_manifest(output_uri, kind=MODEL_KIND)
        write_training_outputs(out, trainer, processor, config, metrics, "SFT")
        if config.merge_adapter and peft_config is not None:
            merge_adapter_into_full_precision_base(out, config)
        files = [p.relative_to(out).as_posix() for p in sorted(out.rglob("*")) if p.is_file()]
        manifest = {
            "kind": MODEL_KIND,
            "stage": "sft",
            "base_model": config.base_model,
            "adapter": peft_config is not None,
            "method": config.method,
            "quantization": config.resolved_quantization(),
            "dataset": {"uri": dataset_uri, "content_hash": dataset_manifest.get("content_hash")},
            "config": to_dict(config),
            "metrics": metrics,
            "files": files,
            "content_hash": artifacts.hash_files([str(out / f) for f in files if f.startswith(("adapter/", "model/"))]),
        }
    artifacts.write_manifest(output_uri, manifest)
    wait_for_everyone()
    return manifest
