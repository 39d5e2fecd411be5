"""Rows of ``prepare-data``: one raw source row in, the SmolVLM chat form of ``components.common.schema`` out.

:func:`normalize_row` maps a source row through the configured columns (question/answer, a ``messages``
column, or preference prompt/chosen/rejected) and collects its image references; a row that cannot become a
training example raises :class:`RowRejected` with a stable reason name, which the step counts in the
manifest, and a human ``detail`` (which column, what it held) that goes into ``rejects.jsonl``.
:func:`split_of` decides train/eval from the row id alone. Pure Python: no images are decoded here
(that is ``images.py``, in worker processes).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from components.common import schema
from components.prepare_data.config import PrepareDataConfig


class RowRejected(Exception):
    """A row that cannot become a training example; ``reason`` is the stable name counted in the manifest,
    ``detail`` says for a person what was wrong with this row."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class PendingRow:
    """A normalised row waiting for its images to be processed."""

    index: int
    label: str  # source position, for reject examples when the row has no id
    source_id: str | None
    text: dict[str, Any]  # messages/answers (sft) or prompt/chosen/rejected (preference)
    category: str | None
    refs: list  # ("bytes", b) | ("path", str)
    image_names: list[str] = dataclasses.field(default_factory=list)  # how a reject detail names each image
    where: Any = None  # sources.Where: file, line and row number, for rejects.jsonl


def image_names(refs: list, root_prefix: str) -> list[str]:
    """Names of a row's images for reject details: the path relative to the source (``root_prefix`` is the
    resolved source folder with a trailing separator), or ``image N (bytes)``. Plain string work: every row
    pays for it."""
    return [
        (value[len(root_prefix):] if value.startswith(root_prefix) else value) if kind == "path" else f"image {n} (bytes)"
        for n, (kind, value) in enumerate(refs, start=1)
    ]


def image_paths(row: dict, image_column: str, root: Path, root_resolved: Path) -> list[str]:
    """The local paths of the image files ``row`` names, resolved as :func:`normalize_row` resolves them
    (for fetching them from a remote source first); [] when its image column would reject the row."""
    if image_column not in row:
        return []
    try:
        refs = _image_refs(row[image_column], root, root_resolved, "")
    except RowRejected:
        return []
    return [value for kind, value in refs if kind == "path"]


def _text(value: Any, empty_reason: str, type_reason: str, what: str) -> str:
    if value is None:
        raise RowRejected(empty_reason, f"{what} is null")
    if not isinstance(value, str):
        raise RowRejected(type_reason, f"{what} holds {type(value).__name__} {_shown(value)}, not text")
    if not value.strip():
        raise RowRejected(empty_reason, f"{what} is blank ({_shown(value)})")
    return value


def _answers(value: Any, by_frequency: bool, what: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        items = []
        for n, item in enumerate(value, start=1):
            if isinstance(item, dict):  # VQAv2 style {"answer": ..., "answer_confidence": ...}
                item = item.get("answer", item.get("text"))
            items.append(_text(item, "empty_answer", "non_string_answer", f"answer {n} of {what}"))
        if not items:
            raise RowRejected("empty_answer", f"{what} is an empty list")
    else:
        items = [_text(value, "empty_answer", "non_string_answer", what)]
    items = [a.strip() for a in items]
    if by_frequency:
        counts = collections.Counter(items)
        first_seen = {a: i for i, a in reversed(list(enumerate(items)))}
        items = sorted(counts, key=lambda a: (-counts[a], first_seen[a]))
    else:
        items = list(dict.fromkeys(items))  # drop repeats, keep order
    return items


def _image_refs(value: Any, root: Path, root_resolved: Path, what: str) -> list:
    if value is None:
        raise RowRejected("missing_image", f"{what} is null")
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise RowRejected("missing_image", f"{what} is an empty list")
    refs = []
    for item in items:
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data:
                refs.append(("bytes", bytes(data)))
                continue
            if data is not None and not path:
                refs.append(("bytes", b""))  # present but empty: a zero-byte image
                continue
            item = path
        if isinstance(item, (bytes, bytearray)):
            refs.append(("bytes", bytes(item)))
        elif isinstance(item, str) and item.strip():
            if "://" in item:
                raise RowRejected("remote_image_path", f"{_shown(item)} is a URL; images must be paths inside "
                                  f"the source folder, or bytes (copy remote images next to the rows)")
            p = Path(item)
            full = (p if p.is_absolute() else root / p).resolve()
            if not full.is_relative_to(root_resolved):
                raise RowRejected("image_path_escapes_root", f"{_shown(item)} resolves to {full}, outside the source "
                                  f"folder {root_resolved}")
            refs.append(("path", str(full)))
        elif hasattr(item, "save"):  # a decoded PIL image (datasets in python format)
            buf = io.BytesIO()
            item.save(buf, "PNG")
            refs.append(("bytes", buf.getvalue()))
        else:
            if not item:
                raise RowRejected("missing_image", f"{what} holds an empty value ({_shown(item)})")
            raise RowRejected("bad_image_value", f"{what} holds {type(item).__name__} {_shown(item)}, not a "
                              f"path, bytes or a {{bytes, path}} struct")
    return refs


def _parts(content: Any, turn: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RowRejected("malformed_messages", f"message {turn}: content holds {type(content).__name__}, not text or a list of parts")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, dict) and part.get("type") == "image":
            parts.append({"type": "image", "text": None})
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise RowRejected("malformed_messages", f"message {turn}: part {_shown(part)} is not {{type: image}} or "
                              f"{{type: text, text: ...}}")
    return parts


def _messages_from_column(value: Any, n_images: int, system: str | None) -> tuple[list[dict], list[str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowRejected("malformed_messages", f"the messages text is not JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(value, list) or not value:
        raise RowRejected("malformed_messages", f"messages must be a non-empty list of {{role, content}}, got {_shown(value)}")
    messages = []
    for turn, m in enumerate(value, start=1):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RowRejected("malformed_messages", f"message {turn} ({_shown(m)}) has no role system/user/assistant")
        messages.append({"role": m["role"], "content": _parts(m.get("content"), turn)})
    if system and messages[0]["role"] != "system":
        messages.insert(0, schema.system_turn(system))
    n_placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
    if n_placeholders == 0 and n_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowRejected("malformed_messages", "no user message to put the images in")
        first_user["content"] = [{"type": "image", "text": None}] * n_images + first_user["content"]
    elif n_placeholders != n_images:
        raise RowRejected("image_count_mismatch", f"the messages have {n_placeholders} image placeholders, the row "
                          f"{n_images} images")
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowRejected("empty_answer", f"the last message is from {last['role']!r}, not the assistant")
    answer = " ".join(p["text"] for p in last["content"] if p["type"] == "text").strip()
    if not answer:
        raise RowRejected("empty_answer", "the last assistant message has no text")
    return messages, [answer]


def _optional(row: dict, column: str | None) -> Any:
    return row.get(column) if column else None


def _required(row: dict, column: str) -> Any:
    # A column absent from the row is a mapping problem, not an empty value: say which column.
    if column not in row:
        shown = ", ".join(map(str, list(row)[:12])) + (", ..." if len(row) > 12 else "")
        raise RowRejected(f"column_not_found:{column}", f"the row has no column {column!r} (it has: {shown or 'none'})")
    return row[column]


def normalize_row(row: dict, cfg: PrepareDataConfig, root: Path, root_resolved: Path) -> tuple[str | None, dict, str | None, list]:
    """One raw source row -> (source id, text fields, category, image refs). Raises RowRejected."""
    get = functools.partial(_optional, row)
    need = functools.partial(_required, row)
    source_id = get(cfg.id_column)
    source_id = None if source_id is None or source_id == "" else str(source_id)
    category = get(cfg.category_column)
    category = None if category is None else str(category)
    system = get(cfg.system_prompt_column) or cfg.system_prompt
    if system is not None and not isinstance(system, str):
        raise RowRejected("non_string_system_prompt", f"system prompt column {cfg.system_prompt_column!r} holds "
                          f"{type(system).__name__} {_shown(system)}, not text")
    refs = _image_refs(need(cfg.image_column), root, root_resolved, f"image column {cfg.image_column!r}")
    head = [schema.system_turn(system)] if system else []
    question_what = f"question column {cfg.question_column!r}" if cfg.question_column else "the fixed `question`"
    if cfg.task == "preference":
        question = _text(need(cfg.question_column) if cfg.question_column else cfg.question, "empty_question",
                         "non_string_question", question_what)
        chosen = _text(need(cfg.chosen_column), "empty_answer", "non_string_answer", f"chosen column {cfg.chosen_column!r}").strip()
        rejected = _text(need(cfg.rejected_column), "empty_answer", "non_string_answer",
                         f"rejected column {cfg.rejected_column!r}").strip()
        if chosen == rejected:
            raise RowRejected("chosen_equals_rejected", f"chosen and rejected are the same text ({_shown(chosen)})")
        text = {
            "prompt": head + [schema.user_turn(question, len(refs))],
            "chosen": [schema.assistant_turn(chosen)],
            "rejected": [schema.assistant_turn(rejected)],
        }
    elif cfg.messages_column:
        messages, answers = _messages_from_column(need(cfg.messages_column), len(refs), system)
        text = {"messages": messages, "answers": answers}
    else:
        question = _text(need(cfg.question_column) if cfg.question_column else cfg.question, "empty_question",
                         "non_string_question", question_what)
        answers = _answers(need(cfg.answer_column), cfg.answers_by_frequency, f"answer column {cfg.answer_column!r}")
        text = {
            "messages": head + [schema.user_turn(question, len(refs)), schema.assistant_turn(answers[0])],
            "answers": answers,
        }
    return source_id, text, category, refs


def split_of(row_id: str, eval_fraction: float, seed: int = 0) -> str:
    """'train' or 'eval' from a hash of the id alone: stable across re-runs and when rows are appended."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") / 2**64 < eval_fraction else "train"


class RowIdentity:
    """Gives each accepted row its id and rejects repeats: identical content (text + image bytes, with
    ``duplicates='reject'``) and ids seen before. Keeps 64-bit keys, not strings, so the only state that grows
    with the dataset stays ~70 bytes a row."""

    def __init__(self, reject_duplicate_content: bool):
        self.reject_duplicate_content = reject_duplicate_content
        self.seen_content: set[int] = set()
        self.seen_ids: set[int] = set()

    def assign(self, pending: PendingRow, images: list) -> str:
        """The row id: the source id, else a hash of the row's content. Raises RowRejected on a repeat."""
        content_key, row_id = row_keys(pending, images)
        self.check(content_key, row_id)
        return row_id

    def check(self, content_key: int, row_id: str) -> None:
        """Record a row by its keys (from :func:`row_keys`); raises RowRejected when it repeats an earlier one.
        Split from :meth:`assign` so prepare-data's finalize can dedupe rows that parts keyed separately."""
        if self.reject_duplicate_content:
            if content_key in self.seen_content:
                raise RowRejected("duplicate", "the same text and image bytes as an earlier row (kept: the first; "
                                  "duplicates='keep' keeps repeats)")
            self.seen_content.add(content_key)
        id_key = int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big")
        if id_key in self.seen_ids:
            raise RowRejected("duplicate_id", f"id {row_id!r} is already taken by an earlier row with other content")
        self.seen_ids.add(id_key)


def row_keys(pending: PendingRow, images: list) -> tuple[int, str]:
    """(64-bit content key, row id) of a row: the key hashes its text and image bytes; the id is the source id,
    else the content hash. Pure: a part of a fanned-out run computes them, its finalize dedupes on them."""
    content = hashlib.blake2b(digest_size=16)
    content.update(json.dumps(pending.text, sort_keys=True).encode())
    for image in images:
        content.update(image.source_hash.encode())
    return int.from_bytes(content.digest()[:8], "big"), pending.source_id or content.hexdigest()
