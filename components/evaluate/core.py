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
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND
from components.evaluate.config import EvaluateConfig
from components.evaluate.metrics import METRICS, aggregate

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
) -> dict[str, Any]:
    """Evaluate ``models`` (stage name -> model URI, in training order; the last is the candidate)."""
    from components.common.generation import GenerationOptions, generate_answers
    from components.common.modeling import load_for_inference
    from components.evaluate.report import write_report
    from components.prepare_data.core import load_split

    if not models:
        raise ValueError("evaluate needs at least one trained model (e.g. --model sft=URI)")
    if config.cpu_threads > 0:
        import torch

        torch.set_num_threads(config.cpu_threads)
    started = time.time()
    dataset_manifest = artifacts.read_manifest(dataset_uri, kind=DATASET_KIND)
    if dataset_manifest.get("task") != "sft":
        raise ValueError(f"{dataset_uri!r} is a {dataset_manifest.get('task')!r} dataset; evaluate needs a --task sft dataset (question/answer rows)")
    candidate = list(models)[-1]
    manifests = {name: artifacts.read_manifest(uri, kind=MODEL_KIND) for name, uri in models.items()}
    base_model = base_model or manifests[candidate]["base_model"]
    to_score: dict[str, str] = {"base": base_model, **models}
    champion = None
    if registry and registry_name:
        from components.register.core import current_champion

        champion = current_champion(registry, registry_name)
        if champion is not None:
            to_score["champion"] = champion.model_uri

    eval_rows = load_split(dataset_uri, "eval")
    if config.max_rows:
        eval_rows = eval_rows.select(range(min(config.max_rows, eval_rows.num_rows)))
    if eval_rows.num_rows == 0:
        raise ValueError(f"{dataset_uri!r} has an empty eval split; prepare it with eval_fraction > 0")
    conversations = [row["messages"] for row in eval_rows]
    images = [row["images"] for row in eval_rows]
    references = [row["answers"] for row in eval_rows]
    categories = [row.get("category") for row in eval_rows]
    options = GenerationOptions(max_new_tokens=config.max_new_tokens)

    predictions: dict[str, list[str]] = {}
    results: dict[str, dict] = {}
    for name, ref in to_score.items():
        t0 = time.time()
        model, processor = load_for_inference(ref, trust_remote_code=config.trust_remote_code)
        predictions[name] = generate_answers(model, processor, conversations, images, config.batch_size, options)
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
    with storage.local_output(output_uri) as out:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        with open(out / "predictions.jsonl", "w") as f:
            for i, row in enumerate(eval_rows):
                f.write(json.dumps({"id": row["id"], "category": categories[i], "references": references[i],
                                    **{name: predictions[name][i] for name in to_score}}) + "\n")
        write_report(out, config, eval_rows, predictions, references, results, scores, candidate, passed, reasons)
    return artifacts.write_manifest(output_uri, {
        "kind": EVAL_KIND,
        "passed": passed,
        "reasons": reasons,
        "primary_metric": config.metric,
        "candidate": candidate,
        "candidate_uri": models[candidate],
        "models": to_score,
        "champion": {"version": champion.version, "model_uri": champion.model_uri} if champion else None,
        "metrics": {**{f"{name}_{config.metric}": s for name, s in scores.items()}, config.metric: scores[candidate]},
        "dataset": {"uri": dataset_uri, "content_hash": dataset_manifest.get("content_hash")},
        "config": to_dict(config),
        "seconds": time.time() - started,
    })
