"""The on-disk row schemas the steps agree on (Parquet written by prepare-data, read by training/eval).

Images follow the `datasets` ``Image`` encoding (a struct of ``bytes`` and ``path``), so the shards load with
``datasets.load_dataset("parquet", ...)`` as PIL images, and with plain pyarrow as bytes.

SFT rows (``task == "sft"``):
    id        string                  stable content id (also decides the train/eval split)
    images    list<Image>             in the order of the ``{"type": "image"}`` entries in ``messages``
    messages  list<Message>           SmolVLM chat form: user turns hold image and text parts, assistant text
    answers   list<string>            reference answers of the (last) assistant turn, for evaluation metrics
    category  string (nullable)       for per-category breakdowns

Preference rows (``task == "preference"``), TRL's conversational DPO form:
    id, images, category as above
    prompt    list<Message>           the user turn(s), with image parts
    chosen    list<Message>           one assistant turn
    rejected  list<Message>           one assistant turn

Dataset folder layout:
    <out>/train/part-00000.parquet ...   <out>/eval/part-00000.parquet ...   <out>/manifest.json (last)
"""
from __future__ import annotations

import pyarrow as pa

DATASET_KIND = "vlmtune.dataset"
MODEL_KIND = "vlmtune.model"
EVAL_KIND = "vlmtune.evaluation"
SPLITS = ("train", "eval")

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
CONTENT_PART = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(CONTENT_PART))])
MESSAGES = pa.list_(MESSAGE)

SFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("images", pa.list_(IMAGE)),
        ("messages", MESSAGES),
        ("answers", pa.list_(pa.string())),
        ("category", pa.string()),
    ]
)

PREFERENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("images", pa.list_(IMAGE)),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("category", pa.string()),
    ]
)

SCHEMAS = {"sft": SFT_SCHEMA, "preference": PREFERENCE_SCHEMA}


def user_turn(question: str, n_images: int = 1) -> dict:
    """A SmolVLM user turn: image placeholders first, then the question."""
    return {
        "role": "user",
        "content": [{"type": "image", "text": None} for _ in range(n_images)] + [{"type": "text", "text": question}],
    }


def assistant_turn(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def system_turn(text: str) -> dict:
    return {"role": "system", "content": [{"type": "text", "text": text}]}
