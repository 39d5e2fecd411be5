"""prepare-data reads every supported source layout and preset into the same row schema.

Run: pytest tests/components/prepare_data/test_sources.py -q
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.common import artifacts, schema, storage
from components.common.config import build_config
from components.prepare_data import core
from components.common.dataset import load_split
from components.prepare_data.config import PrepareDataConfig


def cfg(**kw) -> PrepareDataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return build_config(PrepareDataConfig, kw)


def png_bytes(colour=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def rows_of(out: Path) -> dict[str, dict]:
    manifest = artifacts.read_manifest(str(out), kind=schema.DATASET_KIND)
    rows = {}
    for split in schema.SPLITS:
        for rel in manifest["splits"][split]["files"]:
            rows.update({r["id"]: r for r in pq.read_table(out / rel).to_pylist()})
    return rows


def check_image(row: dict, colour=(255, 0, 0), n=1) -> None:
    assert len(row["images"]) == n
    for item in row["images"]:
        assert Image.open(io.BytesIO(item["bytes"])).convert("RGB").getpixel((0, 0)) == colour


def test_csv_with_image_paths_and_json_lists(tmp_path):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    (src / "imgs/a.png").write_bytes(png_bytes())
    (src / "imgs/b.png").write_bytes(png_bytes((0, 0, 255)))
    with open(src / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "question", "answer", "category"])
        w.writerow(["r1", "imgs/a.png", "Colour?", "red", "colour"])
        w.writerow(["r2", '["imgs/a.png", "imgs/b.png"]', "Colours?", '["red and blue", "red, blue"]', ""])
    core.run(cfg(), str(src), str(tmp_path / "out"))
    rows = rows_of(tmp_path / "out")
    assert rows["r1"]["messages"] == [schema.user_turn("Colour?"), schema.assistant_turn("red")]
    assert rows["r1"]["category"] == "colour"
    assert rows["r2"]["answers"] == ["red and blue", "red, blue"] and rows["r2"]["category"] is None
    check_image(rows["r1"])
    assert len(rows["r2"]["images"]) == 2 and rows["r2"]["messages"][0] == schema.user_turn("Colours?", 2)


def test_parquet_with_image_bytes_and_paths(tmp_path):
    src = tmp_path / "src"
    (src / "pics").mkdir(parents=True)
    (src / "pics/x.png").write_bytes(png_bytes())
    table = pa.table({
        "id": ["b1", "p1", "l1"],
        "image": [{"bytes": png_bytes(), "path": "ignored.png"}, {"bytes": None, "path": "pics/x.png"}, None],
        "raw": [png_bytes(), png_bytes(), png_bytes()],
        "question": ["q1", "q2", "q3"],
        "answer": ["a1", "a2", "a3"],
    })
    pq.write_table(table, src / "train-0001.parquet")
    core.run(cfg(max_invalid_fraction=0.5), str(src), str(tmp_path / "out"))
    rows = rows_of(tmp_path / "out")
    assert set(rows) == {"b1", "p1"}
    check_image(rows["b1"])
    check_image(rows["p1"])
    assert artifacts.read_manifest(str(tmp_path / "out"))["rejects"]["missing_image"]["examples"] == ["l1"]
    # Raw bytes column, mapped by name, from a single-file source.
    core.run(cfg(image_column="raw"), str(src / "train-0001.parquet"), str(tmp_path / "out2"))
    assert len(rows_of(tmp_path / "out2")) == 3


def test_datasets_save_to_disk_dict_with_image_feature(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "uid": datasets.Value("int64")})
    def split(n, start):
        return datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (5, 5), (255, 0, 0)) for _ in range(n)], "question": ["q"] * n,
             "answer": [f"a{i}" for i in range(start, start + n)], "uid": list(range(start, start + n))},
            features=features)
    datasets.DatasetDict({"train": split(4, 0), "test": split(2, 100)}).save_to_disk(str(tmp_path / "hf"))
    core.run(cfg(id_column="uid"), str(tmp_path / "hf"), str(tmp_path / "out"))
    rows = rows_of(tmp_path / "out")
    assert set(rows) == {"0", "1", "2", "3", "100", "101"}
    check_image(rows["100"])
    core.run(cfg(id_column="uid", source_split="test"), str(tmp_path / "hf"), str(tmp_path / "out_test"))
    assert set(rows_of(tmp_path / "out_test")) == {"100", "101"}


def write_jsonl(src: Path, rows: list[dict]) -> Path:
    (src / "images").mkdir(parents=True, exist_ok=True)
    (src / "images/1.png").write_bytes(png_bytes())
    (src / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def test_preset_vqav2_orders_answers_by_frequency(tmp_path):
    answers = [{"answer": a, "answer_confidence": "yes"} for a in ["two", "2", "two", "2", "two", "three"]]
    src = write_jsonl(tmp_path / "src", [{"question_id": 7, "image": "images/1.png", "question": "How many?",
                                          "answers": answers, "answer_type": "number"}])
    core.run(cfg(preset="vqav2"), str(src), str(tmp_path / "out"))
    (row,) = rows_of(tmp_path / "out").values()
    assert row["id"] == "7" and row["answers"] == ["two", "2", "three"] and row["category"] == "number"
    assert row["messages"][-1] == schema.assistant_turn("two")


def test_preset_chartqa_and_captioning(tmp_path):
    src = write_jsonl(tmp_path / "c", [{"image": "images/1.png", "query": "Max?", "label": ["42"],
                                        "human_or_machine": 0}])
    core.run(cfg(preset="chartqa"), str(src), str(tmp_path / "out_c"))
    (row,) = rows_of(tmp_path / "out_c").values()
    assert row["messages"] == [schema.user_turn("Max?"), schema.assistant_turn("42")] and row["category"] == "0"
    src = write_jsonl(tmp_path / "cap", [{"image": "images/1.png", "caption": "A red square."}])
    core.run(cfg(preset="captioning", system_prompt="Be brief."), str(src), str(tmp_path / "out_cap"))
    (row,) = rows_of(tmp_path / "out_cap").values()
    assert row["messages"] == [schema.system_turn("Be brief."), schema.user_turn("Describe this image."),
                               schema.assistant_turn("A red square.")]


def test_preset_messages_multi_turn(tmp_path):
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "Which colour?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    bad_count = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
                 {"role": "assistant", "content": "x"}]
    src = write_jsonl(tmp_path / "m", [{"id": "c1", "images": ["images/1.png"], "messages": chat},
                                       {"id": "c2", "images": ["images/1.png"], "messages": bad_count}])
    core.run(cfg(preset="messages", max_invalid_fraction=0.5), str(src), str(tmp_path / "out"))
    rows = rows_of(tmp_path / "out")
    assert rows["c1"]["messages"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What is it?"}]},
        schema.assistant_turn("A square."),
        {"role": "user", "content": [{"type": "text", "text": "Which colour?"}]},
        schema.assistant_turn("Red."),
    ]
    assert rows["c1"]["answers"] == ["Red."]
    assert artifacts.read_manifest(str(tmp_path / "out"))["rejects"] == {
        "image_count_mismatch": {"count": 1, "examples": ["c2"]}}


def test_preference_rows_and_rlaif_v_preset(tmp_path):
    src = write_jsonl(tmp_path / "p", [
        {"idx": 1, "image": "images/1.png", "question": "Colour?", "chosen": "red", "rejected": "blue", "ds_name": "x"},
        {"idx": 2, "image": "images/1.png", "question": "Colour?", "chosen": "red", "rejected": "red", "ds_name": "x"},
    ])
    manifest = core.run(cfg(preset="rlaif_v", max_invalid_fraction=0.5), str(src), str(tmp_path / "out"))
    assert manifest["task"] == "preference"
    rows = rows_of(tmp_path / "out")
    assert rows["1"]["prompt"] == [schema.user_turn("Colour?")]
    assert rows["1"]["chosen"] == [schema.assistant_turn("red")] and rows["1"]["rejected"] == [schema.assistant_turn("blue")]
    assert rows["1"]["category"] == "x"
    assert manifest["rejects"] == {"chosen_equals_rejected": {"count": 1, "examples": ["2"]}}
    table = pq.read_table(tmp_path / "out" / manifest["splits"]["train"]["files"][0])
    assert table.schema.remove_metadata().equals(schema.PREFERENCE_SCHEMA)
    split = next(s for s in schema.SPLITS if manifest["splits"][s]["rows"])
    loaded = load_split(str(tmp_path / "out"), split)
    assert loaded.column_names == schema.PREFERENCE_SCHEMA.names and loaded[0]["images"][0].mode == "RGB"


@pytest.mark.gcs
def test_gs_source_and_output(gcs_bucket, tmp_path):
    src = write_jsonl(tmp_path / "src", [{"id": f"r{i}", "image": "images/1.png", "question": "q", "answer": f"a{i}"}
                                         for i in range(6)])
    storage.upload_dir(src, f"gs://{gcs_bucket}/src")
    out = f"gs://{gcs_bucket}/prepared"
    manifest = core.run(cfg(eval_fraction=0.5), f"gs://{gcs_bucket}/src", out)
    assert artifacts.read_manifest(out, kind=schema.DATASET_KIND)["content_hash"] == manifest["content_hash"]
    loaded = {s: load_split(out, s) for s in schema.SPLITS}
    assert sum(len(d) for d in loaded.values()) == 6
    row = loaded["train"][0]  # the downloaded shards are gone; rows still read from datasets' own cache
    assert row["images"][0].size == (8, 6) and row["answers"][0].startswith("a")
