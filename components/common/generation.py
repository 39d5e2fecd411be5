"""Batched generation with a VLM: the one place that turns (conversation, images) into answers.

Prompts are left-padded so every row's answer starts at the same position, which is what makes batching
correct for decoder-only models. Used by the evaluate step and by ``vlmtune predict``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from components.common.processor_settings import images_for_processor


@dataclass
class GenerationOptions:
    max_new_tokens: int = field(default=32, metadata={"help": "Longest answer, in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with do_sample)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1: no beam search)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": ">1 discourages repeats."})

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams,
                  "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The conversation up to (not including) its final assistant turn: what the model is asked."""
    messages = list(messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    return messages


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate_answers(
    model,
    processor,
    conversations: Sequence[Sequence[dict]],
    images: Sequence[Sequence] | None = None,
    batch_size: int = 16,
    options: GenerationOptions | None = None,
    progress: bool = False,
    processor_kwargs: dict | None = None,
) -> list[str]:
    """One answer per conversation; ``images[i]`` are the PIL images of conversation ``i`` in order.

    ``processor_kwargs`` go to the processor call, e.g. ``{"do_image_splitting": False}`` for video frames:
    one tile per frame instead of SmolVLM's up-to-17 tiles, as SmolVLM's own video processing does."""
    import torch
    from tqdm.auto import tqdm

    options = options or GenerationOptions()
    images = list(images) if images is not None else [[] for _ in conversations]
    tokenizer = processor.tokenizer
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    order = list(range(len(conversations)))
    bar = tqdm(total=len(order), desc="generate", unit="row", disable=not progress)
    try:
        for idx in _batches(order, batch_size):
            texts = [processor.apply_chat_template(prompt_messages(conversations[i]), add_generation_prompt=True) for i in idx]
            # Within the processor's cap under need-based sizing, as training saw them (processor_settings).
            batch_images = [images_for_processor(processor, images[i]) for i in idx]
            inputs = processor(
                text=texts,
                images=batch_images if any(batch_images) else None,
                padding=True,
                add_special_tokens=False,
                return_tensors="pt",
                **(processor_kwargs or {}),
            ).to(device)
            with torch.inference_mode():
                output = model.generate(**inputs, **options.generate_kwargs(),
                                        pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True))
            bar.update(len(idx))
    finally:
        tokenizer.padding_side = pad_side
        bar.close()
    return answers
