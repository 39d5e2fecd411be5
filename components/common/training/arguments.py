"""The TrainingArguments that SFT's ``SFTConfig`` and DPO's ``DPOConfig`` share, taken from our config."""
from __future__ import annotations

from components.common.modeling import device_settings
from components.common.training.model import use_gradient_checkpointing


def common_training_arguments(config, output_dir: str, checkpoint_uri: str | None, evaluating: bool = False,
                              longest_row_tokens: int | None = None) -> dict:
    """The TrainingArguments both SFT and DPO take from our config: schedule, precision/optimizer for the device,
    checkpoints only when there is somewhere to publish them, batches grouped by length (each step gives its
    dataset a ``length`` column) or shuffled, no truncation (the steps drop over-budget rows). With ``evaluating``
    (the step has held-out rows and ``eval_steps`` > 0) the loss on them is logged every ``eval_steps`` steps; it
    is only reported (``load_best_model_at_end`` stays off: nothing is selected on the split evaluate scores).
    ``longest_row_tokens`` (the longest training row, what a batch pads to) feeds the CPU checkpointing rule."""
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
        eval_strategy="steps" if evaluating else "no",
        eval_steps=config.eval_steps if evaluating else None,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        load_best_model_at_end=False,
        # Each local checkpoint is deleted once published (checkpoints.py); the limit bounds the work folder even
        # if that fails. Resume needs only the newest published one.
        save_total_limit=1,
        seed=config.seed,
        data_seed=config.seed,
        bf16=settings.bf16,
        optim=settings.optim,
        # transformers 5.24 names these activation_checkpointing*; the old gradient_checkpointing* names are
        # deprecated aliases it keeps equal to these (TRL's trainers read the old names, so both stay right).
        activation_checkpointing=use_gradient_checkpointing(config, longest_row_tokens),
        # Non-reentrant checkpointing works with frozen inputs (LoRA on a frozen base) without extra hooks.
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_length=None,  # budget enforced by dropping rows; truncation could cut an image
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        length_column_name="length",
        include_num_input_tokens_seen="non_padding",
        # A rank whose batch has no image skips the vision tower and connector, so their parameters get no
        # gradient there; DDP without unused-parameter detection then fails ("Expected to have finished
        # reduction in the prior iteration") or waits forever for those buckets. transformers turns detection
        # off for a plain model with activation checkpointing, so say it here (non-reentrant checkpointing,
        # above, works with it). Costs one graph walk per synchronised step.
        ddp_find_unused_parameters=True,
        report_to="none",
        disable_tqdm=True,
    )
