"""The DPO step: preference optimisation of the SFT policy with TRL's DPOTrainer.

The SFT adapter is loaded trainable on the (4-bit) base; TRL copies it into a frozen "ref" adapter, so the
reference model is the SFT policy and no second model is held in memory. The output is a standalone adapter
on the same base (initialised from SFT, moved by DPO). Preference pairs come from a preference dataset, or
(``pairs_from_sft_mistakes``) from the SFT model's own wrong answers on an SFT dataset (``mistakes.py``).

    vlmtune dpo --dataset PREF_DATA_URI --sft-model SFT_URI --output MODEL_URI
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from components.common import artifacts
from components.common.dataset import open_dataset
from components.common.processor_settings import apply_processor_settings
from components.common.schema import MODEL_KIND
from components.common.training.collator import SequenceTooLongError, TooManyRowsOverBudgetError, VisionSFTCollator
from components.dpo.config import DPOStepConfig
from components.dpo.mistakes import preference_pairs_from_mistakes

log = logging.getLogger(__name__)


def filter_pairs_by_token_budget(dataset, processor, max_length: int, max_too_long_fraction: float):
    """Drop (and count) pairs whose prompt + longer answer is over ``max_length`` tokens; add a ``length``
    column (tokens of prompt + the longer answer: what a batch pads to) for length-grouped batches."""
    collator = VisionSFTCollator(processor, max_length=max_length)
    keep, lengths, too_long = [], [], 0
    for i, row in enumerate(dataset):
        try:
            lengths.append(max(
                len(collator.encode({"messages": list(row["prompt"]) + list(row[answer]), "images": row["images"]})["input_ids"])
                for answer in ("chosen", "rejected")))
            keep.append(i)
        except SequenceTooLongError:
            too_long += 1
    if dataset.num_rows and too_long / dataset.num_rows > max_too_long_fraction:
        raise TooManyRowsOverBudgetError(
            f"{too_long} of {dataset.num_rows} preference pairs exceed max_length={max_length} tokens "
            f"(limit {max_too_long_fraction:.0%}). Raise max_length or max_too_long_fraction."
        )
    return dataset.select(keep).add_column("length", lengths), too_long


def sequential_eval(trainer_class):
    """``trainer_class`` scoring held-out pairs in order. transformers groups eval batches by length too when
    training does, and TRL's processing of the eval pairs leaves no ``length`` column to group by; the mean DPO
    loss does not depend on the order, so plain order is used."""
    from torch.utils.data import SequentialSampler

    class SequentialEval(trainer_class):
        def _get_eval_sampler(self, eval_dataset):
            return SequentialSampler(eval_dataset) if eval_dataset is not None else None

    SequentialEval.__name__ = trainer_class.__name__
    return SequentialEval


def run(config: DPOStepConfig, dataset_uri: str, sft_model_uri: str, output_uri: str, checkpoint_uri: str | None = None,
        sft_dataset_uri: str | None = None) -> dict[str, Any]:
    """Train DPO from the SFT adapter. Pairs: the preference dataset at ``dataset_uri``, or, with
    ``pairs_from_sft_mistakes``, the SFT model's wrong answers on the train split of ``sft_dataset_uri`` (the
    pipeline's SFT data) or of ``dataset_uri`` when that is itself an SFT dataset. Given both a preference
    dataset and an SFT one, the pairs come from the mistakes and the preference eval split gives the eval loss."""
    from peft import PeftModel
    from torch.utils.tensorboard import SummaryWriter
    from transformers import set_seed
    from transformers.integrations import TensorBoardCallback
    from trl import DPOConfig, DPOTrainer

    from components.common.modeling import load_processor, resolve_model_ref
    from components.common.training.arguments import common_training_arguments
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
    if dataset.task != "preference" and not (dataset.task == "sft" and config.pairs_from_sft_mistakes):
        raise ValueError(f"{dataset_uri!r} is a {dataset.task!r} dataset; dpo needs one prepared with --task "
                         f"preference, or an SFT dataset with pairs_from_sft_mistakes=true (pairs from the SFT model's own mistakes)")
    from_mistakes = config.pairs_from_sft_mistakes
    mistakes_source = dataset
    if from_mistakes and dataset.task != "sft":
        if not sft_dataset_uri:
            raise ValueError(f"pairs_from_sft_mistakes=true needs an SFT dataset to ask the SFT model about, and "
                             f"{dataset_uri!r} is a preference dataset: pass the SFT data as --sft-dataset "
                             f"(the pipeline does), or set pairs_from_sft_mistakes=false to train on its pairs")
        mistakes_source = open_dataset(sft_dataset_uri)
        if mistakes_source.task != "sft":
            raise ValueError(f"--sft-dataset {sft_dataset_uri!r} is a {mistakes_source.task!r} dataset; "
                             f"pairs_from_sft_mistakes needs one prepared with --task sft")
    sft_manifest = artifacts.read_manifest(sft_model_uri, kind=MODEL_KIND)
    if not sft_manifest.get("adapter"):
        raise ValueError(f"{sft_model_uri!r} is a fully fine-tuned model; DPO here starts from an SFT adapter (method lora/qlora)")
    if config.base_model and config.base_model != sft_manifest["base_model"]:
        raise ValueError(f"base_model {config.base_model!r} differs from the SFT model's base {sft_manifest['base_model']!r}")
    config = dataclasses.replace(config, base_model=sft_manifest["base_model"])
    set_seed(config.seed)

    sft_local = Path(resolve_model_ref(sft_model_uri))
    processor = load_processor(str(sft_local / "processor"), config.trust_remote_code)
    apply_processor_settings(processor, mistakes_source.processor_settings)  # how the train pairs' images were stored
    mistakes = None
    if from_mistakes:
        import gc

        from components.common.modeling import load_for_inference

        policy, _ = load_for_inference(sft_model_uri, trust_remote_code=config.trust_remote_code)
        train, mistakes = preference_pairs_from_mistakes(policy, processor, mistakes_source.split("train"),
                                                         config.mistakes_batch_size, config.mistakes_max_new_tokens)
        del policy
        gc.collect()
        log.info("pairs from the SFT model's mistakes: %s", mistakes)
        if train is None and dataset.task == "preference":
            # Nothing to correct: train on the preference dataset's own pairs rather than fail the pipeline.
            log.warning("the SFT model answered all %d train rows right: no mistakes to learn from; training on the "
                        "preference dataset's pairs instead", mistakes["rows"])
            mistakes["fell_back_to_preference_pairs"] = True
            train = dataset.split("train")
            apply_processor_settings(processor, dataset.processor_settings)  # how these pairs' images were stored
        elif train is None:
            raise ValueError(f"the SFT model answered all {mistakes['rows']} train rows of {mistakes_source.uri!r} right: "
                             f"no preference pairs to learn from; DPO is not needed, or give it a preference dataset")
    else:
        train = dataset.split("train")
    train, dropped = filter_pairs_by_token_budget(train, processor, config.max_length, config.max_too_long_fraction)
    keep_columns = ("prompt", "chosen", "rejected", "images", "length")
    train = train.remove_columns([c for c in train.column_names if c not in keep_columns])
    # Held-out pairs for the eval loss (eval_steps > 0): the preference dataset's eval split. Mistakes are made
    # on train rows only (pairs from the eval split would leak it into training), so with no preference dataset
    # beside the SFT one the curve is train-only.
    held_out = None
    if config.eval_steps > 0 and dataset.task == "preference" and "eval" in dataset.manifest.get("splits", {}):
        held_out = dataset.split("eval")
        if config.eval_loss_rows:
            held_out = held_out.select(range(min(config.eval_loss_rows, held_out.num_rows)))
        held_out, _ = filter_pairs_by_token_budget(held_out, processor, config.max_length, 1.0)
        held_out = held_out.remove_columns([c for c in held_out.column_names if c not in keep_columns])
        held_out = held_out if held_out.num_rows else None

    base, _ = load_trainable_model(config)
    model = PeftModel.from_pretrained(base, str(sft_local / "adapter"), is_trainable=True)
    main_process = is_main_process()
    with output_folder(output_uri, main_process) as out, trainer_work_dir("vlmtune-dpo-", output_uri) as work:
        args = DPOConfig(
            # chosen and rejected both go through the model: twice the rows of the longest pair
            **common_training_arguments(config, work, checkpoint_uri, evaluating=held_out is not None,
                                        longest_row_tokens=2 * max(train["length"])),
            beta=config.beta,
            loss_type=[config.loss_type],
        )
        # Exact resume: each epoch's order a function of (seed, epoch), run totals kept, no step past the last.
        trainer = sequential_eval(with_exact_resume(DPOTrainer))(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=processor,
            callbacks=[make_checkpoint_callback(checkpoint_uri), TensorBoardCallback(SummaryWriter(str(out / "tensorboard")))],
        )
        keep_trainable_in_compute_dtype(trainer.model)
        resume_from = fetch_checkpoint(checkpoint_uri, Path(work))
        result = trainer.train(resume_from_checkpoint=resume_from)
        metrics = training_metrics(trainer, result, train.num_rows, started, resume_from)
        rewards = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
        metrics.update({
            "pairs_over_token_budget": dropped,
            "eval_loss_rows": held_out.num_rows if held_out is not None else 0,
            "pairs_from_sft_mistakes": mistakes,
            "final_reward_accuracy": rewards[-1]["rewards/accuracies"] if rewards else None,
            "final_reward_margin": rewards[-1].get("rewards/margins") if rewards else None,
        })
        if not main_process:  # multi-process run: rank 0 writes the artifact; the others wait for it
            return manifest_from_rank_zero(output_uri)
        # Only the trained "default" adapter is the DPO model; the frozen "ref" copy stays behind.
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")
        write_training_outputs(out, trainer, processor, config, metrics, "DPO")
        if config.merge_adapter:
            merge_adapter_into_full_precision_base(out, config)
        manifest = model_manifest(
            out, config, metrics, stage="dpo", adapter=True,
            dataset={"uri": dataset_uri, "content_hash": dataset.content_hash},
            parent={"uri": sft_model_uri, "content_hash": sft_manifest.get("content_hash")},
        )
    artifacts.write_manifest(output_uri, manifest)
    wait_for_everyone()
    return manifest
