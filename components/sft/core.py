"""The SFT step: QLoRA supervised fine-tuning with TRL's SFTTrainer, PEFT LoRA and bitsandbytes NF4.

Reads top to bottom: validate inputs -> load data and drop over-budget rows (never truncate through an
image) -> load the base (4-bit for QLoRA) -> train with assistant-only labels, checkpointing to object
storage -> write adapter, processor, resolved config, metrics, loss curve and TensorBoard events -> manifest
last. The machinery (model, checkpoints, outputs, collator) is the shared skeleton in
``components.common.training``; this module only says what SFT does with it.

    vlmtune sft --dataset DATA_URI --output MODEL_URI --base-model HuggingFaceTB/SmolVLM-256M-Instruct
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from components.common import artifacts
from components.common.dataset import open_dataset
from components.common.processor_settings import apply_processor_settings
from components.common.training.collator import SequenceTooLongError, TooManyRowsOverBudgetError, VisionSFTCollator
from components.sft.config import SFTStepConfig

log = logging.getLogger(__name__)


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


def held_out_rows(dataset, collator: VisionSFTCollator, config) -> Any:
    """The eval rows the training loss is compared with (``eval_steps`` > 0): the first ``eval_loss_rows`` of the
    eval split within the token budget, or None when off or the split is absent/empty. Only a loss is taken on
    them; nothing is selected by it, so evaluate's accuracy on the same split stays an honest held-out figure."""
    if config.eval_steps <= 0 or "eval" not in dataset.manifest.get("splits", {}):
        return None
    rows = dataset.split("eval")
    if config.eval_loss_rows:
        rows = rows.select(range(min(config.eval_loss_rows, rows.num_rows)))
    rows, _ = filter_by_token_budget(rows, collator, 1.0, what="eval")
    return rows if rows.num_rows else None


def training_arguments(config: SFTStepConfig, output_dir: str, checkpoint_uri: str | None = None,
                       evaluating: bool = False, longest_row_tokens: int | None = None):
    """TRL ``SFTConfig`` for our step: the device's precision/optimizer, length-grouped batches (the dataset
    carries a ``length`` column), our own collator (TRL's dataset preparation is skipped), no truncation."""
    from trl import SFTConfig

    from components.common.training.arguments import common_training_arguments

    return SFTConfig(
        **common_training_arguments(config, output_dir, checkpoint_uri, evaluating, longest_row_tokens),
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
    from components.common.training.checkpoints import fetch_checkpoint, make_checkpoint_callback, trainer_work_dir
    from components.common.training.distributed import is_main_process, wait_for_everyone
    from components.common.training.resume import with_exact_resume
    from components.common.training.model import (
        keep_trainable_in_compute_dtype,
        load_trainable_model,
        merge_adapter_into_full_precision_base,
    )
    from components.common.training.outputs import (
        manifest_from_rank_zero,
        model_manifest,
        output_folder,
        training_metrics,
        write_training_outputs,
    )

    started = time.time()
    dataset = open_dataset(dataset_uri)
    if dataset.task != "sft":
        raise ValueError(f"{dataset_uri!r} is a {dataset.task!r} dataset; sft needs one prepared with --task sft")
    set_seed(config.seed)
    processor = load_processor(config.base_model, config.trust_remote_code)
    # Resize as the dataset was prepared for (its token counts hold), and save the processor that way.
    apply_processor_settings(processor, dataset.processor_settings)
    collator = VisionSFTCollator(processor, max_length=config.max_length)
    train, dropped = filter_by_token_budget(dataset.split("train"), collator, config.max_too_long_fraction)
    if train.num_rows == 0:
        raise ValueError(f"{dataset_uri!r} has no train rows within the token budget; nothing to train on")
    held_out = held_out_rows(dataset, collator, config)

    model, peft_config = load_trainable_model(config)
    main_process = is_main_process()
    with output_folder(output_uri, main_process) as out, trainer_work_dir("vlmtune-sft-", output_uri) as work:
        args = training_arguments(config, work, checkpoint_uri, evaluating=held_out is not None,
                                  longest_row_tokens=max(train["length"]))
        counting = PaddingCounter(collator)
        checkpoints = make_checkpoint_callback(checkpoint_uri)
        # Exact resume: each epoch's order a function of (seed, epoch), run totals kept, no step past the last.
        trainer = with_exact_resume(SFTTrainer)(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            data_collator=counting,
            processing_class=processor,
            peft_config=peft_config,
            callbacks=[checkpoints, TensorBoardCallback(SummaryWriter(str(out / "tensorboard")))],
        )
        keep_trainable_in_compute_dtype(trainer.model)
        resume_from = fetch_checkpoint(checkpoint_uri, Path(work))
        result = trainer.train(resume_from_checkpoint=resume_from)
        metrics = training_metrics(trainer, result, train.num_rows, started, resume_from)
        metrics.update({"rows_over_token_budget": dropped, "eval_loss_rows": held_out.num_rows if held_out is not None else 0,
                        **counting.metrics()})
        if not main_process:  # multi-process run: rank 0 writes the artifact; the others wait for it
            return manifest_from_rank_zero(output_uri)
        write_training_outputs(out, trainer, processor, config, metrics, "SFT")
        if config.merge_adapter and peft_config is not None:
            merge_adapter_into_full_precision_base(out, config)
        manifest = model_manifest(out, config, metrics, stage="sft", adapter=peft_config is not None,
                                  dataset={"uri": dataset_uri, "content_hash": dataset.content_hash})
    artifacts.write_manifest(output_uri, manifest)
    wait_for_everyone()
    return manifest
