"""The evaluate step: answer the held-out split with every model, score, compare, and decide the gate.

Models: ``base`` (the base model as-is), each trained stage (``sft``, ``dpo``), and the registry's current
``champion`` if one exists. The candidate is the last trained stage. ``passed`` is true only when the
candidate beats the base by more than ``min_delta`` and the champion by at least ``min_delta_vs_champion``
on the primary metric. Only the eval split is used: no training row is scored.

    vlmtune evaluate --dataset DATA_URI --model sft=SFT_URI --model dpo=DPO_URI --output EVAL_URI
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from components.common import artifacts, storage
from components.common.config import to_dict
from components.common.dataset import open_dataset
from components.common.processor_settings import apply_processor_settings
from components.common.schema import EVAL_KIND, MODEL_KIND
from components.evaluate.config import EvaluateConfig
from components.evaluate.metrics import METRICS, aggregate, preference_reward_stats

log = logging.getLogger(__name__)


def decide_gate(scores: dict[str, float], candidate: str, config: EvaluateConfig) -> tuple[bool, list[str]]:
    """(passed, reasons). The candidate must beat base by > min_delta and champion by >= min_delta_vs_champion."""
    reasons = []
    cand = scores[candidate]
    passed = True
    delta = cand - scores["base"]
    if delta > config.min_delta:
        reasons.append(f"{candidate} beats base by {delta:+.4f} (> min_delta {config.min_delta})")
    else:
        passed = False
        reasons.append(f"{candidate} does not beat base by more than min_delta {config.min_delta} (delta {delta:+.4f})")
    if "champion" in scores:
        delta = cand - scores["champion"]
        if delta >= config.min_delta_vs_champion:
            reasons.append(f"{candidate} beats the champion by {delta:+.4f} (>= {config.min_delta_vs_champion})")
        else:
            passed = False
            reasons.append(f"{candidate} trails the champion: delta {delta:+.4f} < {config.min_delta_vs_champion}")
    else:
        reasons.append("no champion in the registry yet: compared with the base model only")
    return passed, reasons


def run(
    config: EvaluateConfig,
    dataset_uri: str,
    models: dict[str, str],
    output_uri: str,
    base_model: str | None = None,
    registry: str | None = None,
    registry_name: str | None = None,
    preference_uri: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` (stage name -> model URI, in training order; the last is the candidate).

    With ``preference_uri`` (a prepared preference dataset) and a DPO candidate, also reports DPO's reward
    accuracy and margin on its held-out pairs, the DPO model scored against the stage before it."""
    from components.common.generation import GenerationOptions, generate_answers
    from components.common.modeling import load_for_inference
    from components.evaluate.report import write_report

    if not models:
        raise ValueError("evaluate needs at least one trained model (e.g. --model sft=URI)")
    if config.cpu_threads > 0:
        import torch

        torch.set_num_threads(config.cpu_threads)
    started = time.time()
    dataset = open_dataset(dataset_uri)
    if dataset.task != "sft":
        raise ValueError(f"{dataset_uri!r} is a {dataset.task!r} dataset; evaluate needs a --task sft dataset (question/answer rows)")
    candidate = list(models)[-1]
    manifests = {name: artifacts.read_manifest(uri, kind=MODEL_KIND) for name, uri in models.items()}
    base_model = base_model or manifests[candidate]["base_model"]
    to_score: dict[str, str] = {"base": base_model, **models}
    champion = None
    champion_registry = None  # which registry's champion was looked up (None: no registry given)
    if registry and registry_name:
        from components.common.registry import current_champion, registry_identity

        champion = current_champion(registry, registry_name)
        champion_registry = {"registry": registry_identity(registry), "name": registry_name}
        if champion is not None:
            to_score["champion"] = champion.model_uri

    eval_rows = dataset.split("eval")
    if config.max_rows:
        eval_rows = eval_rows.select(range(min(config.max_rows, eval_rows.num_rows)))
    if eval_rows.num_rows == 0:
        raise ValueError(f"{dataset_uri!r} has an empty eval split; prepare it with eval_fraction > 0")
    conversations = [row["messages"] for row in eval_rows]
    images = [row["images"] for row in eval_rows]
    references = [row["answers"] for row in eval_rows]
    categories = [row.get("category") for row in eval_rows]
    options = GenerationOptions(max_new_tokens=config.max_new_tokens)

    # DPO's implicit reward needs the log-probs of the candidate and the stage before it on held-out pairs;
    # they are taken while each model is loaded for generation, so no model is loaded twice.
    pairs, pair_logps, reward_models = None, {}, {}
    if preference_uri and len(models) >= 2 and manifests[candidate].get("stage") == "dpo":
        pairs = load_preference_pairs(preference_uri, config.max_rows)
        reward_models = {"policy": candidate, "reference": list(models)[-2]}

    predictions: dict[str, list[str]] = {}
    results: dict[str, dict] = {}
    for name, ref in to_score.items():
        t0 = time.time()
        model, processor = load_for_inference(ref, trust_remote_code=config.trust_remote_code)
        # Resize images exactly as the dataset was prepared for, so token counts match training.
        apply_processor_settings(processor, dataset.processor_settings)
        predictions[name] = generate_answers(model, processor, conversations, images, config.batch_size, options)
        if pairs is not None and name in reward_models.values():
            pair_logps[name] = {k: completion_logprobs(model, processor, pairs, k) for k in ("chosen", "rejected")}
        elapsed = time.time() - t0
        del model
        results[name] = {
            metric: aggregate(predictions[name], references, metric, categories) for metric in METRICS
        }
        results[name]["seconds"] = elapsed
        log.info("%s: %s=%.4f (%d rows, %.1fs)", name, config.metric, results[name][config.metric]["score"], len(references), elapsed)

    scores = {name: results[name][config.metric]["score"] for name in to_score}
    passed, reasons = decide_gate(scores, candidate, config)
    metrics = {
        "primary_metric": config.metric,
        "candidate": candidate,
        "scores": scores,
        "eval_rows": len(references),
        "by_model": results,
        **{f"{name}_accuracy": score for name, score in scores.items()},
    }
    if pairs is not None:
        beta = float((manifests[candidate].get("config") or {}).get("beta", 0.1))
        policy, reference = pair_logps[reward_models["policy"]], pair_logps[reward_models["reference"]]
        metrics["preference"] = preference_reward_stats(
            [p - r for p, r in zip(policy["chosen"], reference["chosen"])],
            [p - r for p, r in zip(policy["rejected"], reference["rejected"])],
            beta,
        )
        metrics["preference"].update({**reward_models, "beta": beta})
    with storage.local_output(output_uri) as out:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        with open(out / "predictions.jsonl", "w") as f:
            for i, row in enumerate(eval_rows):
                f.write(json.dumps({"id": row["id"], "category": categories[i], "references": references[i],
                                    **{name: predictions[name][i] for name in to_score}}) + "\n")
        write_report(out, config, eval_rows, predictions, references, results, scores, candidate, passed, reasons,
                     metrics.get("preference"))
    return artifacts.write_manifest(output_uri, {
        "kind": EVAL_KIND,
        "passed": passed,
        "reasons": reasons,
        "primary_metric": config.metric,
        "candidate": candidate,
        "candidate_uri": models[candidate],
        "models": to_score,
        # The champion this evaluation compared with (None: none), exactly as read once above and scored: register
        # promotes the candidate only if that version is still the champion of that registry (compare-and-set).
        "champion": ({"version": champion.version, "model_uri": champion.model_uri,
                      "content_hash": champion.content_hash} if champion else None),
        "champion_registry": champion_registry,
        "metrics": {**{f"{name}_{config.metric}": s for name, s in scores.items()}, config.metric: scores[candidate],
                    **({f"dpo_{k}": v for k, v in metrics["preference"].items() if k in ("reward_accuracy", "reward_margin")}
                       if "preference" in metrics else {})},
        "dataset": {"uri": dataset_uri, "content_hash": dataset.content_hash},
        "config": to_dict(config),
        "seconds": time.time() - started,
    })


def completion_logprobs(model, processor, rows, answer_key: str, batch_size: int = 8) -> list[float]:
    """Sum of log-probabilities of each row's ``answer_key`` turn given its prompt and images.

    The same assistant-only mask as SFT picks the scored tokens, so prompt, image and padding tokens never count.
    """
    import torch

    from components.common.training.collator import IGNORE_INDEX, VisionSFTCollator

    collator = VisionSFTCollator(processor)
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collator([{"messages": list(r["prompt"]) + list(r[answer_key]), "images": r["images"]} for r in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.inference_mode():
            logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.extend((logps * mask).sum(-1).tolist())
    return out


def load_preference_pairs(preference_uri: str, max_rows: int = 0) -> list[dict]:
    """The held-out pairs of a prepared preference dataset (its eval split)."""
    preference = open_dataset(preference_uri)
    if preference.task != "preference":
        raise ValueError(f"{preference_uri!r} is a {preference.task!r} dataset; reward metrics need --task preference")
    pairs = preference.split("eval")
    if max_rows:
        pairs = pairs.select(range(min(max_rows, pairs.num_rows)))
    return [pairs[i] for i in range(pairs.num_rows)]
