"""The SFT loss mask, checked position by position against masks built by hand.

Expected sequences are assembled from pieces (template text, the Idefics3 image block spelled out token by
token) with the loss-carrying pieces marked, independently of the offset-based code under test.
"""
from __future__ import annotations

import pytest
from PIL import Image

from components.common.schema import assistant_turn, system_turn, user_turn
from components.common.training.collator import IGNORE_INDEX, VisionSFTCollator

EOU = "<end_of_utterance>"


def image_block(rows: int, cols: int, tokens_per_tile: int = 4) -> str:
    """What the tiny processor puts in place of one <image>: row/col tiles, then the global image."""
    text = ""
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            text += f"<fake_token_around_image><row_{r}_col_{c}>" + "<image>" * tokens_per_tile
        text += "\n"
    return text + "\n<fake_token_around_image><global-img>" + "<image>" * tokens_per_tile + "<fake_token_around_image>"


def expected(processor, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, carries_loss in pieces:
        piece_ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if carries_loss else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def square():
    return Image.new("RGB", (128, 128), (200, 30, 30))


def wide():
    return Image.new("RGB", (128, 64), (30, 30, 200))


def check(processor, row, pieces):
    batch = VisionSFTCollator(processor)([row])
    ids, labels = expected(processor, pieces)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    return batch


def test_single_turn_only_the_answer_and_its_end_token_carry_loss(processor):
    row = {"messages": [user_turn("What colour is the shape?"), assistant_turn("red")], "images": [square()]}
    batch = check(processor, row, [
        ("<|im_start|>User:" + image_block(2, 2) + f"What colour is the shape?{EOU}\nAssistant:", False),
        (f" red{EOU}", True),
        ("\n", False),
    ])
    carried = [processor.tokenizer.convert_ids_to_tokens(t) for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert carried == ["Ġred", EOU]


def test_system_prompt_carries_no_loss(processor):
    row = {"messages": [system_turn("Answer in one word."), user_turn("What shape is it?"), assistant_turn("circle")],
           "images": [square()]}
    check(processor, row, [
        (f"<|im_start|>System: Answer in one word.{EOU}\nUser:" + image_block(2, 2) + f"What shape is it?{EOU}\nAssistant:", False),
        (f" circle{EOU}", True),
        ("\n", False),
    ])


def test_multi_turn_trains_on_every_assistant_turn(processor):
    row = {"messages": [user_turn("What colour is the shape?"), assistant_turn("red"),
                        {"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]}, assistant_turn("circle")],
           "images": [square()]}
    check(processor, row, [
        ("<|im_start|>User:" + image_block(2, 2) + f"What colour is the shape?{EOU}\nAssistant:", False),
        (f" red{EOU}", True),
        (f"\nUser: What shape is it?{EOU}\nAssistant:", False),
        (f" circle{EOU}", True),
        ("\n", False),
    ])


def test_multi_image_masks_every_image_block(processor):
    row = {"messages": [user_turn("Are they the same colour?", n_images=2), assistant_turn("no")], "images": [square(), wide()]}
    check(processor, row, [
        ("<|im_start|>User:" + image_block(2, 2) + image_block(1, 2) + f"Are they the same colour?{EOU}\nAssistant:", False),
        (f" no{EOU}", True),
        ("\n", False),
    ])


def test_padding_carries_no_loss_and_rows_keep_their_own_labels(processor):
    short = {"messages": [user_turn("What colour is the shape?"), assistant_turn("red")], "images": [square()]}
    long = {"messages": [system_turn("Answer in one word, please, and be brief about it."), user_turn("What colour is the shape?"),
                         assistant_turn("blue")], "images": [square()]}
    batch = VisionSFTCollator(processor)([short, long])
    pad = processor.tokenizer.pad_token_id
    n_short = int(batch["attention_mask"][0].sum())
    assert n_short < batch["input_ids"].shape[1]
    assert batch["input_ids"][0, n_short:].eq(pad).all()
    assert batch["labels"][0, n_short:].eq(IGNORE_INDEX).all()
    single = VisionSFTCollator(processor)([short])
    assert batch["labels"][0, :n_short].tolist() == single["labels"][0].tolist()


def test_image_related_tokens_never_carry_loss(processor):
    row = {"messages": [user_turn("What colour is the shape?"), assistant_turn("red")], "images": [square()]}
    batch = VisionSFTCollator(processor)([row])
    image_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in
                 ["<image>", "<fake_token_around_image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]}
    assert not image_ids & set(batch["labels"][0].tolist())
    assert image_ids & set(batch["input_ids"][0].tolist())


def test_rows_over_the_budget_are_refused_not_truncated(processor):
    from components.common.training.collator import SequenceTooLongError

    row = {"messages": [user_turn("What colour is the shape?"), assistant_turn("red")], "images": [square()]}
    with pytest.raises(SequenceTooLongError):
        VisionSFTCollator(processor, max_length=10).encode(row)
