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


def _row(i: int) -> dict:
    return {"id": f"r{i}", "image": "images/1.png", "question": "Colour?", "answer": f"red {i}"}


def _folder_with_strays(src: Path) -> Path:
    (src / "images").mkdir(parents=True)
    (src / "images/1.png").write_bytes(png_bytes())
    (src / "part-a.jsonl").write_text("".join(json.dumps(_row(i)) + "\n" for i in range(3)))
    (src / "part-b.json").write_text(json.dumps([_row(i) for i in range(3, 6)], indent=2))  # an array of rows
    (src / "part-c.json").write_text("".join(json.dumps(_row(i)) + "\n" for i in range(6, 8)))  # JSON lines
    (src / "metadata.json").write_text(json.dumps({"name": "my set", "license": "cc-by", "splits": [1, 2]}, indent=2))
    (src / "labels.json").write_text(json.dumps(["red", "green", "blue"]))
    (src / "stats.json").write_text(json.dumps({"rows": 8, "mean_width": 8.0}))  # one compact line, not a row
    (src / "README.md").write_text("# my data\n")
    return src


def test_folder_reads_json_rows_by_content_and_ignores_stray_files_with_a_note(tmp_path, capsys):
    src = _folder_with_strays(tmp_path / "src")
    manifest = core.run(cfg(max_invalid_fraction=0.0), str(src), str(tmp_path / "out"))
    assert set(rows_of(tmp_path / "out")) == {f"r{i}" for i in range(8)}
    assert manifest["counts"]["rows_in"] == 8 and manifest["rejects"] == {}
    notes = [
        "ignored labels.json in the source folder: it holds a JSON array of strings, not of row objects, not rows "
        "(a .json row file holds a JSON array of row objects, or one row object per line (JSON lines))",
        "ignored metadata.json in the source folder: it holds one JSON object spread over several lines "
        "(pretty-printed), not one object per line, not rows (a .json row file holds a JSON array of row objects, "
        "or one row object per line (JSON lines))",
        "ignored stats.json in the source folder: it holds objects without the image column 'image' (its first has: "
        "rows, mean_width; set image_column if one of these holds the images), not rows (a .json row file holds a "
        "JSON array of row objects, or one row object per line (JSON lines))",
    ]
    assert manifest["warnings"] == notes
    assert capsys.readouterr().err.splitlines() == [f"prepare-data: note: {n}" for n in notes]
    assert (tmp_path / "out" / "rejects.jsonl").read_text() == ""


def test_json_array_rows_carry_their_line_in_rejects(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images/1.png").write_bytes(png_bytes())
    rows = [_row(0), {**_row(1), "image": "images/none.png"}, "not an object"]
    (src / "data.json").write_text(json.dumps(rows, indent=1))
    core.run(cfg(max_invalid_fraction=1.0), str(src / "data.json"), str(tmp_path / "out"))
    records = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    text = (src / "data.json").read_text().splitlines()
    assert sorted(records, key=lambda r: r["row"]) == [
        {"id": "r1", "file": "data.json", "line": 8, "row": 2, "reason": "missing_image",
         "detail": "images/none.png: no such file"},
        {"id": None, "file": "data.json", "line": 14, "row": 3, "reason": "malformed_row",
         "detail": "element 3 of the array is a JSON string, not a row object"},
    ]
    assert text[7].strip() == "{" and text[13].strip() == '"not an object"'


def test_json_lines_file_with_a_bad_first_line_is_still_rows(tmp_path):
    src = write_jsonl(tmp_path / "src", [])
    (src / "rows.jsonl").unlink()
    (src / "data.json").write_text('{"id": "r0", "image": \n' + "".join(json.dumps(_row(i)) + "\n" for i in (1, 2)))
    manifest = core.run(cfg(max_invalid_fraction=0.5), str(src), str(tmp_path / "out"))
    assert set(rows_of(tmp_path / "out")) == {"r1", "r2"} and manifest["warnings"][0].startswith("1 of 3 rows invalid")
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert record == {"id": None, "file": "data.json", "line": 1, "row": 1, "reason": "malformed_row",
                      "detail": "not JSON: Expecting value at column 24"}  # the end of the line


def test_extra_row_files_beside_rows_jsonl_get_a_note(tmp_path, capsys):
    src = write_jsonl(tmp_path / "src", [_row(0)])
    (src / "extra.jsonl").write_text(json.dumps(_row(1)) + "\n")
    manifest = core.run(cfg(), str(src), str(tmp_path / "out"))
    assert set(rows_of(tmp_path / "out")) == {"r0"}
    assert manifest["warnings"] == ["ignored extra.jsonl in the source folder: it has rows.jsonl, the only row file "
                                    "read when present (merge them into rows.jsonl, or remove it to read every row file)"]
    assert "prepare-data: note: ignored extra.jsonl" in capsys.readouterr().err


def _cli(src: Path, out: Path, capsys) -> tuple[int, list[str], str]:
    from components.prepare_data import cli

    rc = cli.main(["--source", str(src), "--output", str(out), "--no-progress", "--num-workers", "0"])
    captured = capsys.readouterr()
    return rc, captured.err.splitlines(), captured.err


@pytest.mark.parametrize("content,first_line_end", [
    (json.dumps({"rows": [_row(0)]}, indent=2),
     "it holds one JSON object spread over several lines (pretty-printed), not one object per line; a .json row "
     "file holds a JSON array of row objects, or one row object per line (JSON lines)"),
    ('["a", "b"]', "it holds a JSON array of strings, not of row objects; a .json row file holds a JSON array of "
                   "row objects, or one row object per line (JSON lines)"),
], ids=["pretty-printed-object", "array-of-strings"])
def test_a_json_source_that_is_not_rows_fails_with_what_it_holds(tmp_path, capsys, content, first_line_end):
    (tmp_path / "data.json").write_text(content)
    rc, lines, err = _cli(tmp_path / "data.json", tmp_path / "out", capsys)
    assert rc == 2 and "Traceback" not in err
    assert lines[0] == (f"prepare-data: cannot read --source {str(tmp_path / 'data.json')!r}: source "
                        f"{str(tmp_path / 'data.json')!r} is not a row file: {first_line_end}")
    assert not (tmp_path / "out").exists()


def test_a_broken_json_array_fails_naming_line_and_column(tmp_path, capsys):
    src = write_jsonl(tmp_path / "src", [])
    (src / "rows.jsonl").unlink()
    text = json.dumps([_row(0), _row(1)], indent=2)
    (src / "data.json").write_text(text.replace('"r1",', '"r1"', 1))  # a missing comma on line 9
    rc, lines, err = _cli(src / "data.json", tmp_path / "out", capsys)
    assert rc == 2 and "Traceback" not in err
    assert lines[0] == (f"prepare-data: cannot read --source {str(src / 'data.json')!r}: {str(src / 'data.json')!r} "
                        f"is not a valid JSON array: Expecting ',' delimiter at line 10 column 5. Fix the file, or "
                        f"write it as JSON lines (one row object per line), where a bad line rejects only that row")
    assert not artifacts.is_complete(str(tmp_path / "out"))


def test_a_folder_of_only_stray_json_says_what_it_ignored(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "metadata.json").write_text(json.dumps({"name": "x"}, indent=2))
    rc, lines, err = _cli(src, tmp_path / "out", capsys)
    assert rc == 2 and "Traceback" not in err
    assert lines[-1].startswith(f"prepare-data: cannot read --source {str(src)!r}: source folder {str(src)!r} holds "
                                f"no rows (ignored metadata.json in the source folder: it holds one JSON object")
    assert not (tmp_path / "out").exists()


@pytest.mark.gcs
def test_gs_output_of_a_failed_run_holds_only_the_rejects_list(gcs_bucket, tmp_path):
    rows = [{"id": f"r{i}", "image": "images/1.png" if i < 3 else f"images/none-{i}.png", "question": "q",
             "answer": f"a{i}"} for i in range(6)]
    src = write_jsonl(tmp_path / "src", rows)
    out = f"gs://{gcs_bucket}/failed"
    with pytest.raises(core.TooManyInvalidRowsError) as caught:
        core.run(cfg(max_invalid_fraction=0.2), str(src), out)
    assert caught.value.rejects_file == f"{out}/rejects.jsonl"
    assert str(caught.value).splitlines()[-1] == f"Every rejected row (3) is listed in {out}/rejects.jsonl."
    assert storage.list_files(out) == [f"{out}/rejects.jsonl"]
    records = [json.loads(line) for line in storage.read_text(f"{out}/rejects.jsonl").splitlines()]
    assert [(r["id"], r["reason"], r["line"]) for r in records] == [(f"r{i}", "missing_image", i + 1) for i in range(3, 6)]
    assert not artifacts.is_complete(out)
