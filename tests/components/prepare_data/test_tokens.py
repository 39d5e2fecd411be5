"""Token-aware resizing: the tokens per image the manifest reports are what the Idefics3 processor produces.

Processors are built here (no hub): SmolVLM-Instruct's image settings (1536 px, 384 px tiles, 81 tokens per
tile) and the tiny model's (128 px, 64 px tiles, 4 tokens per tile), with the project's locally trained tokenizer.

Run: pytest tests/components/prepare_data/test_tokens.py -q
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.common.config import build_config
from components.prepare_data import core
from components.common import processor_settings
from components.prepare_data import images as imagelib
from components.prepare_data.config import PrepareDataConfig

SIZES = [(2000, 1000), (600, 1800), (300, 200), (1024, 768), (3000, 90), (384, 384), (770, 385)]


def build_processor(folder: Path, longest_edge: int, tile: int, image_seq_len: int) -> Path:
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from components.common.tiny_model import build_tokenizer

    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, do_image_splitting=True
    )
    Idefics3Processor(image_processor=image_processor, tokenizer=build_tokenizer(), image_seq_len=image_seq_len).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smolvlm_processor(tmp_path_factory):
    return build_processor(tmp_path_factory.mktemp("smolvlm-instruct-like"), 1536, 384, 81)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok-src")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "rows.jsonl", "w") as f:
        for i, (w, h) in enumerate(SIZES):
            im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
            im.save(root / f"images/{i}.jpg", quality=80)
            f.write(json.dumps({"id": f"img{i}", "image": f"images/{i}.jpg", "question": "q?", "answer": "a"}) + "\n")
    return root


def processor_tokens(processor, im: Image.Image) -> int:
    ids = processor(text="<image>", images=[[im]], add_special_tokens=False)["input_ids"][0]
    return len(ids)


def stored_images(out: Path, manifest: dict):
    for split in ("train", "eval"):
        for rel in manifest["splits"][split]["files"]:
            for row in pq.read_table(out / rel).to_pylist():
                yield row["id"], Image.open(io.BytesIO(row["images"][0]["bytes"]))


@pytest.mark.parametrize("longest_edge", [None, 768])
def test_reported_tokens_match_the_processor(smolvlm_processor, source, tmp_path, longest_edge):
    from transformers import AutoProcessor

    config = build_config(PrepareDataConfig, {"processor": str(smolvlm_processor), "longest_edge": longest_edge,
                                              "num_workers": 0, "progress": False})
    manifest = core.run(config, str(source), str(tmp_path / "out"))
    settings = manifest["processor_settings"]
    edge = longest_edge or 1536
    assert settings["size"] == {"longest_edge": edge} and settings["max_image_size"] == {"longest_edge": 384}
    assert settings["do_image_splitting"] is True and settings["image_seq_len"] == 81
    processor = AutoProcessor.from_pretrained(smolvlm_processor)
    processor_settings.apply_processor_settings(processor, settings)  # what training does with the manifest
    assert processor.image_processor.size["longest_edge"] == edge
    produced = {}
    for id_, im in stored_images(tmp_path / "out", manifest):
        assert max(im.size) <= edge
        produced[id_] = processor_tokens(processor, im)
        assert produced[id_] == processor_settings.tokens_for_size(*im.size, settings), (id_, im.size)
    hist = manifest["tokens_per_image"]["histogram"]
    assert sum(hist.values()) == len(SIZES)
    expected_hist: dict[str, int] = {}
    for n in produced.values():
        expected_hist[str(n)] = expected_hist.get(str(n), 0) + 1
    assert hist == expected_hist
    assert manifest["tokens_per_image"]["max"] == max(produced.values())
    assert manifest["tokens_per_sample"]["max"] == max(produced.values())
    if longest_edge == 768:
        # 1024x768 photo at 768 px: 2x2 tiles + the global image = 5 x 81 image tokens, plus layout tokens.
        assert produced["img3"] == processor_settings.image_tokens(2, 2, 81, settings["extra_split_newline_tokens"])
        at_full_size = processor_settings.tokens_for_size(2000, 1000, {**settings, "size": {"longest_edge": 1536}})
        assert produced["img0"] < at_full_size  # the smaller size really saves tokens


@pytest.mark.parametrize("image_sizing", ["need", "fixed"])
def test_formula_matches_processor_on_many_sizes(tmp_path, image_sizing):
    """The size/tile arithmetic alone, against the real processor, on awkward aspect ratios (tiny tiles)."""
    from transformers import AutoProcessor

    folder = build_processor(tmp_path / "tiny", 128, 64, 4)
    processor = AutoProcessor.from_pretrained(folder)
    settings = processor_settings.load_processor_settings(str(folder), image_sizing=image_sizing)
    processor_settings.apply_processor_settings(processor, settings)
    assert processor.image_processor.do_resize is (image_sizing == "fixed")
    for w, h in [(1, 1), (64, 64), (65, 64), (130, 20), (20, 130), (127, 129), (200, 99), (33, 190), (500, 499)]:
        im = Image.new("RGB", (w, h), (10, 20, 30))
        (given,) = processor_settings.images_for_processor(processor, [im])  # what every vlmtune call does
        assert processor_tokens(processor, given) == processor_settings.tokens_for_size(w, h, settings), (w, h)
        sw, sh = imagelib.stored_size(w, h, 128)
        assert max(sw, sh) <= max(128, 1)
        # Storing at the reduced size costs exactly the same tokens as the original.
        assert processor_settings.tokens_for_size(sw, sh, settings) == processor_settings.tokens_for_size(w, h, settings), (w, h)


SMOLVLM_256M_SIZES = [(1, 1), (64, 64), (128, 128), (100, 30), (30, 100), (511, 512), (513, 512), (600, 400),
                      (1023, 1025), (1537, 700), (2048, 2048), (2049, 10), (4000, 3000), (90, 3000), (3001, 2999)]


def test_need_sizing_is_the_processor_at_a_per_image_size_and_saves_tokens(tmp_path):
    """At SmolVLM-256M's settings (2048 px, 512 px tiles, 64 tokens a tile): ``do_resize`` off plus the cap is
    exactly the processor called with ``size={"longest_edge": need_longest_edge(...)}`` image by image, the
    formula predicts it, a 128 px image is one tile (the global image) instead of 17, and images at or above
    the cap cost what the fixed size costs."""
    from transformers import AutoProcessor

    folder = build_processor(tmp_path / "smolvlm-256m-like", 2048, 512, 64)
    need = AutoProcessor.from_pretrained(folder)
    settings = processor_settings.load_processor_settings(str(folder))
    assert settings["image_sizing"] == "need"
    processor_settings.apply_processor_settings(need, settings)
    fixed = AutoProcessor.from_pretrained(folder)
    processor_settings.apply_processor_settings(fixed, {**settings, "image_sizing": "fixed"})
    newline = settings["extra_split_newline_tokens"]
    for w, h in SMOLVLM_256M_SIZES:
        im = Image.new("RGB", (w, h), (200, 10, 10))
        (given,) = processor_settings.images_for_processor(need, [im])
        assert max(given.size) <= 2048
        target = processor_settings.need_longest_edge(w, h, 2048, 512)
        assert target % 512 == 0 and target <= 2048 and (target >= max(w, h) or max(w, h) > 2048)
        per_image = len(fixed(text="<image>", images=[[processor_settings.images_for_processor(fixed, [given])[0]]],
                              size={"longest_edge": target}, add_special_tokens=False)["input_ids"][0])
        ours = processor_tokens(need, given)
        assert ours == per_image == processor_settings.tokens_for_size(w, h, settings), (w, h)
        before = processor_tokens(fixed, im)
        assert before == processor_settings.tokens_for_size(w, h, settings, "fixed"), (w, h)
        if max(w, h) >= 2048:
            assert ours == before, (w, h)  # at or above the cap: unchanged
        if max(w, h) <= 512:
            assert ours == 64 + 3, (w, h)  # one tile: the global image and its delimiters
    assert processor_tokens(fixed, Image.new("RGB", (128, 128))) == processor_settings.image_tokens(4, 4, 64, newline)


@pytest.mark.gcs
def test_processor_from_gs_folder_skips_weights(gcs_bucket, smolvlm_processor, tmp_path, monkeypatch):
    from components.common import storage

    storage.upload_dir(smolvlm_processor, f"gs://{gcs_bucket}/model")
    storage.write_bytes(f"gs://{gcs_bucket}/model/model.safetensors", b"not really weights")
    read = []
    real_download = storage.download_files
    monkeypatch.setattr(storage, "download_files", lambda uris, local_dir: read.extend(uris) or real_download(uris, local_dir))
    settings = processor_settings.load_processor_settings(f"gs://{gcs_bucket}/model", longest_edge=800)
    assert settings["size"] == {"longest_edge": 768}  # snapped down to whole 384 px tiles
    assert settings["image_seq_len"] == 81
    assert read and not any(uri.endswith(".safetensors") for uri in read)


def test_demo_data_through_the_cli_with_the_shipped_config(tmp_path, capsys):
    """The lead's demo generator + pipelines/configs/prepare_data/demo*.yaml + a tiny-model-like processor, via the CLI."""
    from components.common.demo_data import write_demo_data
    from components.prepare_data import cli

    demo = write_demo_data(tmp_path / "demo", rows=30, preference_rows=12)
    processor = build_processor(tmp_path / "proc", 128, 64, 4)
    configs = Path(__file__).resolve().parents[3] / "pipelines" / "configs" / "prepare_data"
    for task, config in (("sft", "demo.yaml"), ("preference", "demo_preference.yaml")):
        rc = cli.main(["--source", str(demo / task), "--output", str(tmp_path / task), "--config", str(configs / config),
                       "--processor", str(processor), "--no-progress", "--num-workers", "0"])
        out = capsys.readouterr().out
        assert rc == 0, out
        manifest = json.loads((tmp_path / task / "manifest.json").read_text())
        n = 30 if task == "sft" else 12
        assert manifest["task"] == task and manifest["counts"]["rows_out"] == n and manifest["rejects"] == {}
        # 128 px demo images fit the 128 px processor size: stored byte for byte, 2x2 tiles + global image.
        assert manifest["counts"]["images_passed_through"] == n
        assert manifest["tokens_per_image"]["histogram"] == {str(processor_settings.image_tokens(2, 2, 4, manifest["processor_settings"]["extra_split_newline_tokens"])): n}
        assert f"prepared {n} of {n} rows" in out


def test_unavailable_processor_is_a_clear_config_error(source, tmp_path, monkeypatch, capsys):
    from components.prepare_data import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main(["--source", str(source), "--output", str(tmp_path / "out"), "--processor", str(tmp_path / "no-model"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "processor" in err and "no-model" in err and "preprocessor_config.json" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
