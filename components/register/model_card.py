"""Model card: a ``README.md`` with YAML front matter (the Hugging Face model-card convention) and a short body.

The front matter is machine-readable (base model, datasets, metrics, config, lineage, intended use); the body
says the same for people. :func:`read_front_matter` parses it back.
"""
from __future__ import annotations

from typing import Any

import yaml

DEFAULT_INTENDED_USE = (
    "Answering questions about images in the domain of the fine-tuning data. Not evaluated outside that domain; "
    "check the metrics below on your own data before relying on it."
)


def render(
    *,
    name: str,
    model_uri: str,
    content_hash: str,
    base_model: str | None,
    datasets: list[str] | None = None,
    metrics: dict | None = None,
    primary_metric: str | None = None,
    config: dict | None = None,
    lineage: dict | None = None,
    intended_use: str = DEFAULT_INTENDED_USE,
) -> str:
    metrics = metrics or {}
    front: dict[str, Any] = {
        "model_name": name,
        "base_model": base_model,
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "tags": ["vlmtune", "idefics3", "smolvlm"],
        "datasets": list(datasets or []),
        "metrics": metrics,
        "primary_metric": primary_metric,
        "config": config or {},
        "intended_use": intended_use,
        "lineage": {**(lineage or {}), "model_uri": model_uri, "content_hash": content_hash},
    }
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(_flatten(metrics).items())) or "| (none) | |"
    body = f"""# {name}

Fine-tuned from `{base_model or 'unknown'}` with vlmtune (SFT, then DPO).

## Intended use
{intended_use}

## Evaluation
Primary metric: `{primary_metric or 'n/a'}`

| metric | value |
|---|---|
{rows}

## Lineage
- model artifact: registered from `{model_uri}` (content hash `{content_hash}`); the registry serves its own
  copy (the version's `model_uri`), so this folder may be cleaned up
- datasets: {", ".join(f"`{d}`" for d in datasets or []) or "n/a"}
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, default_flow_style=False) + "---\n\n" + body


def read_front_matter(card: str) -> dict:
    """The YAML front matter of a card as a dict (empty if the card has none)."""
    if not card.startswith("---\n"):
        return {}
    end = card.find("\n---\n", 4)
    return yaml.safe_load(card[4:end]) or {} if end != -1 else {}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
