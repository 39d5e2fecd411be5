"""Image sizing (need / fixed): the tokens prepare-data's manifest gives each row are the image tokens SFT's
collator really produces for that row, for a mix of image sizes, with both sizings, at two processors built here
(no hub): the tiny model's settings (128 px, 64 px tiles, 4 tokens a tile) and SmolVLM-256M's real ones
(2048 px, 512 px tiles, 64 tokens a tile), each with the project's locally trained tokenizer and chat template.

Run: pytest tests/components/common/test_processor_settings.py -q
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from PIL import Image

from components.common import processor_settings
from components.common.config import build_config
from components.common.dataset import open_dataset
from components.prepare_data import core
from components.prepare_data.config import PrepareDataConfig

# (longest edge, tile, tokens per tile) of each processor; image sizes from far below one tile to above the cap.
PROCESSORS = {"tiny": (128, 64, 4), "smolvlm-256m": (2048, 512, 64)}
SIZES = {
    "tiny": [(16, 16), (64, 64), (100, 30), (128, 128), (65, 64), (200, 99), (500, 120), (33, 190)],
    "smolvlm-256m": [(64, 64), (128, 128), (300, 200), (600, 400), (1000, 250), (2500, 1200), (4000, 3000), (90, 3000)],
}


def build_processor(folder: Path, longest_edge: int, tile: int, image_seq_len: int) -> Path:
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from components.common.tiny_model import SMOLVLM_CHAT_TEMPLATE, build_tokenizer

    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    Idefics3Processor(image_processor=image_processor, tokenizer=build_tokenizer(), image_seq_len=image_seq_len,
                      chat_template=SMOLVLM_CHAT_TEMPLATE).save_pretrained(folder)
    return folder


def write_source(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """One row per size, plus a row with two images (the first and the last size)."""
    (root / "images").mkdir(parents=True)
    with open(root / "rows.jsonl", "w") as f:
        for i, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (20 * i % 255, 90, 160)).save(root / f"images/{i}.png")
            f.write(json.dumps({"id": f"r{i}", "image": f"images/{i}.png", "question": "What colour?", "answer": "blue"}) + "\n")
        f.write(json.dumps({"id": "two", "image": ["images/0.png", f"images/{len(sizes) - 1}.png"],
                            "question": "Which is larger?", "answer": "the second"}) + "\n")
    return root


def image_tokens_in(processor, row: dict, ids: list[int]) -> int:
    """Tokens the row's images expanded to in the processor's ``ids``: all of them minus the text's own tokens
    (each ``<image>`` is one token before expansion)."""
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    plain = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) - (len(plain) - len(row["images"]))


@pytest.mark.parametrize("image_sizing", ["need", "fixed"])
@pytest.mark.parametrize("name", list(PROCESSORS))
def test_manifest_token_counts_are_what_the_sft_collator_produces(tmp_path, name, image_sizing):
    from transformers import AutoProcessor

    from components.common.training.collator import VisionSFTCollator

    longest_edge, tile, per_tile = PROCESSORS[name]
    folder = build_processor(tmp_path / "processor", longest_edge, tile, per_tile)
    source = write_source(tmp_path / "src", SIZES[name])
    config = build_config(PrepareDataConfig, {"processor": str(folder), "image_sizing": image_sizing, "eval_fraction": 0.0,
                                              "num_workers": 0, "progress": False})
    manifest = core.run(config, str(source), str(tmp_path / "out"))
    settings = manifest["processor_settings"]
    assert settings["image_sizing"] == image_sizing and manifest["config"]["image_sizing"] == image_sizing

    dataset = open_dataset(str(tmp_path / "out"))
    rows = list(dataset.split("train"))
    assert len(rows) == len(SIZES[name]) + 1
    processor = AutoProcessor.from_pretrained(folder)
    processor_settings.apply_processor_settings(processor, dataset.processor_settings)  # what SFT does
    collator = VisionSFTCollator(processor)
    produced_per_image = collections.Counter()
    for row in rows:
        predicted = [processor_settings.tokens_for_size(*im.size, settings) for im in row["images"]]
        produced_per_image.update(predicted)
        assert image_tokens_in(processor, row, collator.encode(row)["input_ids"]) == sum(predicted), (row["id"], [im.size for im in row["images"]])
    # The manifest's histogram is those exact per-image counts.
    assert manifest["tokens_per_image"]["histogram"] == {str(k): v for k, v in sorted(produced_per_image.items())}

    # One batch mixing every size class: every tile and global image is a tile-sized square, so one call holds
    # them all; each row's real tokens are what it has alone.
    batch = collator(rows)
    assert tuple(batch["pixel_values"].shape[-3:]) == (3, tile, tile)
    for i, row in enumerate(rows):
        assert int(batch["attention_mask"][i].sum()) == len(collator.encode(row)["input_ids"]), row["id"]

    # Before/after side by side, and what each sizing enlarges.
    by_size = {row["id"]: row["images"][0].size for row in rows if row["id"] != "two"}
    fixed = [processor_settings.tokens_for_size(w, h, settings, "fixed") for w, h in by_size.values()]
    need = [processor_settings.tokens_for_size(w, h, settings, "need") for w, h in by_size.values()]
    assert manifest["tokens_per_image"]["fixed_size"]["max"] == max(fixed)
    assert manifest["tokens_per_image"]["need_based"]["min"] == min(need)
    small = sum(1 for w, h in SIZES[name] if max(w, h) < longest_edge) + 1  # + the small first image of "two"
    assert manifest["images"]["upscaled_by_fixed_size"] == small
    fixed_warned = any("upscaled" in w for w in manifest["warnings"])
    assert fixed_warned is (image_sizing == "fixed")  # need-based: a small image is no longer blown up, no warning
    if name == "smolvlm-256m":
        newline = settings["extra_split_newline_tokens"]
        small_row = next(row for row in rows if row["id"] == "r1")  # 128x128
        expected = 64 + 3 if image_sizing == "need" else processor_settings.image_tokens(4, 4, 64, newline)
        assert image_tokens_in(processor, small_row, collator.encode(small_row)["input_ids"]) == expected
        big_row = next(row for row in rows if row["id"] == "r6")  # 4000x3000, above the cap: stored at 2048x1536
        assert big_row["images"][0].size == (2048, 1536)
        assert image_tokens_in(processor, big_row, collator.encode(big_row)["input_ids"]) == processor_settings.image_tokens(3, 4, 64, newline)


def test_images_for_processor_caps_raw_images_only_under_need_sizing(tmp_path):
    """predict hands raw photos to the processor: under need they are brought within the cap first (as
    prepare-data stores them), so a 4,000 px photo costs what it cost in training; under fixed the processor
    resizes them itself and they are passed as they are."""
    from transformers import AutoProcessor

    folder = build_processor(tmp_path / "processor", 2048, 512, 64)
    photo, small = Image.new("RGB", (4000, 3000)), Image.new("RGB", (300, 200))
    processor = AutoProcessor.from_pretrained(folder)
    settings = processor_settings.load_processor_settings(str(folder))
    processor_settings.apply_processor_settings(processor, settings)
    capped, same = processor_settings.images_for_processor(processor, [photo, small])
    assert capped.size == processor_settings.capped_size(4000, 3000, 2048) == (2048, 1536) and same is small
    processor_settings.apply_processor_settings(processor, {**settings, "image_sizing": "fixed"})
    assert processor_settings.images_for_processor(processor, [photo])[0] is photo


def test_need_sizing_survives_save_pretrained(tmp_path):
    """A trained model's saved processor keeps sizing by need (``do_resize`` is a saved attribute)."""
    from transformers import AutoProcessor

    folder = build_processor(tmp_path / "processor", 2048, 512, 64)
    processor = AutoProcessor.from_pretrained(folder)
    processor_settings.apply_processor_settings(processor, processor_settings.load_processor_settings(str(folder)))
    processor.save_pretrained(tmp_path / "saved")
    again = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert again.image_processor.do_resize is False and again.image_processor.size["longest_edge"] == 2048
    assert len(again(text="<image>", images=[[Image.new("RGB", (128, 128))]], add_special_tokens=False)["input_ids"][0]) == 67


def test_need_longest_edge_rounds_up_to_whole_tiles_within_the_cap():
    assert processor_settings.need_longest_edge(128, 128, 2048, 512) == 512
    assert processor_settings.need_longest_edge(512, 100, 2048, 512) == 512
    assert processor_settings.need_longest_edge(513, 100, 2048, 512) == 1024
    assert processor_settings.need_longest_edge(100, 2048, 2048, 512) == 2048
    assert processor_settings.need_longest_edge(4000, 3000, 2048, 512) == 2048  # above the cap: the cap


def test_unknown_image_sizing_is_a_config_error_naming_the_choices():
    from components.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"image_sizing: must be one of \('need', 'fixed'\), got 'auto'"):
        build_config(PrepareDataConfig, {"image_sizing": "auto"})


def test_trl_dpo_collator_follows_need_sizing_on_mixed_sizes(tmp_path):
    """DPO hands images to TRL's own vision preference collator, which calls the processor itself: with the
    settings applied, each prompt's image tokens are what the manifest's formula gives for its stored size."""
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    folder = build_processor(tmp_path / "processor", 2048, 512, 64)
    processor = AutoProcessor.from_pretrained(folder)
    settings = processor_settings.load_processor_settings(str(folder))
    processor_settings.apply_processor_settings(processor, settings)
    sizes = [(128, 128), (600, 400), (2048, 1536)]
    examples = [{"images": [Image.new("RGB", size, (10, 200, 10))],
                 "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
                 "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "green"}]}],
                 "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]} for size in sizes]
    batch = DataCollatorForVisionPreference(processor)(examples)
    image_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<global-img>")}
    for i, size in enumerate(sizes):
        tokens = [t for t in batch["input_ids"][i].tolist() if t in image_ids]
        tiles = processor_settings.tile_grid(*size, 2048, 512, True, "need")
        n_frames = tiles[0] * tiles[1] + 1
        assert len(tokens) == n_frames * 64 + 1, size  # 64 per tile and the global image, one <global-img>
        assert processor_settings.tokens_for_size(*size, settings) == processor_settings.image_tokens(*tiles, 64, settings["extra_split_newline_tokens"])
    assert [processor_settings.tile_grid(*s, 2048, 512, True, "need") for s in sizes] == [(0, 0), (2, 2), (3, 4)]
