"""Which tokens carry loss in supervised fine-tuning: the assistant's answers, and nothing else.

System and user turns, padding, and every image-related token (``<image>``, ``<fake_token_around_image>``,
``<global-img>``, ``<row_R_col_C>`` and the newlines between tiles) get label -100. Multi-turn rows train
on every assistant turn; the ``<end_of_utterance>`` closing each answer carries loss so the model learns to
stop, the newline after it does not.

How: the chat template is rendered once per row; the character span of each assistant turn is found by
rendering the conversation up to that turn (a template renders a prefix of itself). The *unexpanded* text
(one ``<image>`` per image) is tokenised with offsets and labelled by span; then the labels are carried over
to the processor's expanded sequence, where every image block (delimited by special tokens and ending with
the global image's closing ``<fake_token_around_image>``) is masked. The processor itself builds the model
inputs, so pixel values and token ids are exactly what inference sees.
"""
from __future__ import annotations

from typing import Any

from components.common.processor_settings import images_for_processor

IGNORE_INDEX = -100


class SequenceTooLongError(ValueError):
    """A row does not fit the token budget; such rows are dropped and counted, never truncated."""


class TooManyRowsOverBudgetError(ValueError):
    """More rows (or preference pairs) are over the token budget than ``max_too_long_fraction`` allows: the
    data is over its limit (exit status 3, like prepare-data's invalid-row limit), not a bad argument."""


def _render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def assistant_char_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of every assistant turn's reply."""
    text = _render(processor, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(processor, messages[:k], add_generation_prompt=True)
        through = _render(processor, messages[: k + 1])
        if not text.startswith(through) or not through.startswith(prompt):
            raise ValueError(
                "the chat template does not render conversations as prefixes of each other, so assistant turns "
                "cannot be located; use a SmolVLM-style template"
            )
        end = len(through.rstrip())  # keep <end_of_utterance>, drop the trailing newline
        spans.append((len(prompt), end))
    return text, spans


def image_token_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(name) for name in ("<image>", "<fake_token_around_image>", "<global-img>")}


def mask_prompt_and_image_tokens(processor, messages: list[dict], expanded_ids: list[int]) -> list[int]:
    """Labels for one row: ``expanded_ids`` where the assistant speaks, -100 everywhere else.

    ``expanded_ids`` is the processor's ``input_ids`` for this row (images expanded, no padding).
    """
    tokenizer = processor.tokenizer
    special = image_token_ids(tokenizer)
    text, spans = assistant_char_spans(processor, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    plain_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    def in_assistant_turn(start: int, end: int) -> bool:
        return start < end and any(start < span_end and end > span_start for span_start, span_end in spans)

    plain_labels = [
        tid if tid != special["<image>"] and in_assistant_turn(s, e) else IGNORE_INDEX
        for tid, (s, e) in zip(plain_ids, offsets)
    ]
    labels: list[int] = []
    j = 0
    for tid, label in zip(plain_ids, plain_labels):
        if tid == special["<image>"]:
            if j >= len(expanded_ids) or expanded_ids[j] != special["<fake_token_around_image>"]:
                raise ValueError("processor output does not start an image block where the template has <image>")
            seen_global = False
            while True:
                token = expanded_ids[j]
                j += 1
                labels.append(IGNORE_INDEX)
                if token == special["<global-img>"]:
                    seen_global = True
                elif token == special["<fake_token_around_image>"] and seen_global:
                    break
            continue
        if j >= len(expanded_ids) or expanded_ids[j] != tid:
            raise ValueError(
                "processor and tokenizer disagree on the text tokens; the chat template or processor is not "
                "SmolVLM-compatible"
            )
        labels.append(label)
        j += 1
    if j != len(expanded_ids):
        raise ValueError("processor output has tokens the template does not account for")
    return labels


def to_model_images(images: list[Any]) -> list:
    """PIL images from the dataset's image column (already RGB and resized by prepare-data)."""
    from PIL import Image
    import io

    out = []
    for image in images or []:
        if isinstance(image, dict):
            image = Image.open(io.BytesIO(image["bytes"]))
        out.append(image.convert("RGB") if image.mode != "RGB" else image)
    return out


class VisionSFTCollator:
    """Batches rows of ``{"messages", "images"}`` into model inputs with assistant-only labels.

    Padding is on the right for training; padded positions carry no loss. Rows longer than ``max_length``
    never reach here: the SFT step drops and counts them beforehand (truncating could cut an image).
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def encode(self, row: dict) -> dict:
        images = images_for_processor(self.processor, to_model_images(row.get("images")))
        text = _render(self.processor, row["messages"])
        enc = self.processor(text=[text], images=[images] if images else None, add_special_tokens=False)
        ids = list(enc["input_ids"][0])
        if self.max_length is not None and len(ids) > self.max_length:
            raise SequenceTooLongError(f"row has {len(ids)} tokens, over the budget of {self.max_length}")
        return {"input_ids": ids, "labels": mask_prompt_and_image_tokens(self.processor, row["messages"], ids)}

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        texts = [_render(self.processor, row["messages"]) for row in rows]
        images = [images_for_processor(self.processor, to_model_images(row.get("images"))) for row in rows]
        has_images = any(images)
        self.processor.tokenizer.padding_side = "right"
        batch = self.processor(
            text=texts, images=images if has_images else None, padding=True, add_special_tokens=False, return_tensors="pt"
        )
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, row in enumerate(rows):
            n = int(batch["attention_mask"][i].sum())
            row_labels = mask_prompt_and_image_tokens(self.processor, row["messages"], batch["input_ids"][i, :n].tolist())
            labels[i, :n] = torch.tensor(row_labels)
        batch["labels"] = labels
        return dict(batch)
