"""The DPO step: preference optimisation of the SFT policy with TRL's DPOTrainer.

The SFT adapter is loaded trainable on the (4-bit) base; TRL copies it into a frozen "ref" adapter, so the
reference model is the SFT policy and no second model is held in memory. The output is a standalone adapter
on the same base (initialised from SFT, moved by DPO).

    vlmtune dpo --dataset PREF_DATA_URI --sft-model SFT_URI --output MODEL_URI
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from components.common import artifacts
from components.common.config import to_dict
from components.common.schema import DATASET_KIND, MODEL_KIND
from components.dpo.config import DPOStepConfig
from components.sft.masking import SequenceTooLongError, VisionSFTCollator

log = logging.getLogger(__name__)


def filter_pairs_by_token_budget(dataset, processor, max_length: int, max_too_long_fraction: float):
    """Drop (and count) pairs whose prompt + longer answer is over ``max_length`` tokens."""
    collator = VisionSFTCollator(processor, max_length=max_length)
    keep, too_long = [], 0
    for i, row in enumerate(dataset):
        try:
            for answer in ("chosen", "rejected"):
                collator.encode({"messages": list(row["prompt"]) + list(row[answer]), "images": row["images"]})
            keep.append(i)
        except SequenceTooLongError:
            too_long += 1
    if dataset.num_rows and too_long / dataset.num_rows > max_too_long_fraction:
        raise ValueError(
            f"{too_long} of {dataset.num_rows} preference pairs exceed max_length={max_length} tokens "
            f"(limit {max_too_long_fraction:.0%}). Raise max_length or max_too_long_fraction."
        )
    return dataset.select(keep), too_long


def _normalise(text: str) -> str:
    return " ".join(str(text).lower().strip().rstrip(".!?").split())


def _text_of(message: dict) -> str:
    return "".join(part.get("text") or "" for part in message["content"] if part.get("type") == "text")


def preference_pairs_from_mistakes(model, processor, rows, batch_size: int = 16, max_new_tokens: int = 32):
    """Preference pairs from a model's own mistakes on labelled SFT rows, for users without preference data.

    Each row's question (the conversation before its last assistant turn) is answered greedily; an answer that
    matches none of the row's reference answers (case, spacing and final punctuation ignored) becomes a pair:
    chosen = the gold assistant turn, rejected = the model's answer (possibly empty). Right answers make no pair.
    Returns (datasets.Dataset of prompt/chosen/rejected/images, counts)."""
    import datasets

    from components.common.generation import GenerationOptions, generate_answers, prompt_messages
    from components.common.schema import assistant_turn

    rows = list(rows)
    answers = generate_answers(model, processor, [r["messages"] for r in rows], [r["images"] or [] for r in rows],
                               batch_size=batch_size, options=GenerationOptions(max_new_tokens=max_new_tokens))
    pairs, right, empty = [], 0, 0
    for row, answer in zip(rows, answers):
        gold = row["messages"][-1]
        references = {_normalise(a) for a in (row.get("answers") or [])} | {_normalise(_text_of(gold))}
        if answer.strip() and _normalise(answer) in references:
            right += 1
        else:  # an empty answer (the model stopped at once) is a mistake too: the pair teaches it to answer
            empty += not answer.strip()
            pairs.append({"prompt": prompt_messages(row["messages"]), "chosen": [gold],
                          "rejected": [assistant_turn(answer)], "images": list(row["images"] or [])})
    counts = {"rows": len(rows), "model_right": right, "empty_answers": empty, "pairs": len(pairs)}
    return datasets.Dataset.from_list(pairs) if pairs else None, counts


def run(config: DPOStepConfig, dataset_uri: str, sft_model_uri: str, output_uri: str, checkpoint_uri: str | None = None) -> dict[str, Any]:
    from peft import PeftModel
    from torch.utils.tensorboard import SummaryWriter
    from transformers import set_seed
    from transformers.integrations import TensorBoardCallback
    from trl import DPOConfig, DPOTrainer

    from components.common.modeling import load_processor, resolve_model_ref
    from components.common.training import (
        common_training_arguments,
        fetch_checkpoint,
        keep_trainable_in_compute_dtype,
        load_trainable_model,
        make_checkpoint_callback,
        trainer_work_dir,
        training_metrics,
    )
    from components.common.dataset import load_split
    from components.common.processor_settings import apply_processor_settings
    from components.sft.core import (
        is_main_process,
        merge_adapter_into_full_precision_base,
        output_folder,
        wait_for_everyone,
        write_training_outputs,
    )

    started = time.time()
    dataset_manifest = artifacts.read_manifest(dataset_uri, kind=DATASET_KIND)
    from_mistakes = dataset_manifest.get("task") == "sft" and config.pairs_from_sft_mistakes
    if dataset_manifest.get("task") != "preference" and not from_mistakes:
        raise ValueError(f"{dataset_uri!r} is a {dataset_manifest.get('task')!r} dataset; dpo needs one prepared with --task "
                         f"preference, or an SFT dataset with pairs_from_sft_mistakes=true (pairs from the SFT model's own mistakes)")
    sft_manifest = artifacts.read_manifest(sft_model_uri, kind=MODEL_KIND)
    if not sft_manifest.get("adapter"):
        raise ValueError(f"{sft_model_uri!r} is a fully fine-tuned model; DPO here starts from an SFT adapter (method lora/qlora)")
    if config.base_model and config.base_model != sft_manifest["base_model"]:
        raise ValueError(f"base_model {config.base_model!r} differs from the SFT model's base {sft_manifest['base_model']!r}")
    config = dataclasses.replace(config, base_model=sft_manifest["base_model"])
    set_seed(config.seed)

    sft_local = Path(resolve_model_ref(sft_model_uri))
    processor = load_processor(str(sft_local / "processor"), config.trust_remote_code)
    apply_processor_settings(processor, dataset_manifest.get("processor_settings"))
    mistakes = None
    if from_mistakes:
        import gc

        from components.common.modeling import load_for_inference

        policy, _ = load_for_inference(sft_model_uri, trust_remote_code=config.trust_remote_code)
        train, mistakes = preference_pairs_from_mistakes(policy, processor, load_split(dataset_uri, "train"),
                                                         config.mistakes_batch_size, config.mistakes_max_new_tokens)
        del policy
        gc.collect()
        log.info("pairs from the SFT model's mistakes: %s", mistakes)
        if train is None:
            raise ValueError(f"the SFT model answered all {mistakes['rows']} train rows of {dataset_uri!r} right: "
                             f"no preference pairs to learn from; DPO is not needed, or give it a preference dataset")
    else:
        train = load_split(dataset_uri, "train")
    train, dropped = filter_pairs_by_token_budget(train, processor, config.max_length, config.max_too_long_fraction)
    train = train.remove_columns([c for c in train.column_names if c not in ("prompt", "chosen", "rejected", "images")])

    base, _ = load_trainable_model(config)
    model = PeftModel.from_pretrained(base, str(sft_local / "adapter"), is_trainable=True)
    main_process = is_main_process()
    with output_folder(output_uri, main_process) as out, trainer_work_dir("vlmtune-dpo-", output_uri) as work:
        args = DPOConfig(
            **common_training_arguments(config, work, checkpoint_uri),
            beta=config.beta,
            loss_type=[config.loss_type],
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=processor,
            callbacks=[make_checkpoint_callback(checkpoint_uri), TensorBoardCallback(SummaryWriter(str(out / "tensorboard")))],
        )
        keep_trainable_in_compute_dtype(trainer.model)
        resume_from = fetch_checkpoint(checkpoint_uri, Path(work))
        result = trainer.train(resume_from_checkpoint=resume_from)
        metrics = training_metrics(trainer, result, int(trainer.state.num_input_tokens_seen or 0), train.num_rows, started)
        rewards = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
        metrics.update({
            "pairs_over_token_budget": dropped,
            "pairs_from_sft_mistakes": mistakes,
            "resumed_from": resume_from.rsplit("/", 1)[-1] if resume_from else None,
            "final_reward_accuracy": rewards[-1]["rewards/accuracies"] if rewards else None,
            "final_reward_margin": rewards[-1].get("rewards/margins") if rewards else None,
        })
        if not main_process:  # multi-process run: rank 0 writes the artifact; the others wait for it
            wait_for_everyone()
            return artifacts.read_manifest(output_uri, kind=MODEL_KIND)
        # Only the trained "default" adapter is the DPO model; the frozen "ref" copy stays behind.
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter("ref")
        write_training_outputs(out, trainer, processor, config, metrics, "DPO")
        if config.merge_adapter:
            merge_adapter_into_full_precision_base(out, config)
        files = [p.relative_to(out).as_posix() for p in sorted(out.rglob("*")) if p.is_file()]
        manifest = {
            "kind": MODEL_KIND,
            "stage": "dpo",
            "base_model": config.base_model,
            "adapter": True,
            "method": config.method,
            "quantization": config.resolved_quantization(),
            "parent": {"uri": sft_model_uri, "content_hash": sft_manifest.get("content_hash")},
            "dataset": {"uri": dataset_uri, "content_hash": dataset_manifest.get("content_hash")},
            "config": to_dict(config),
            "metrics": metrics,
            "files": files,
            "content_hash": artifacts.hash_files([str(out / f) for f in files if f.startswith("adapter/")]),
        }
    artifacts.write_manifest(output_uri, manifest)
    wait_for_everyone()
    return manifest
