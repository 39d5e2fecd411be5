"""prepare-data: a corpus of nasty inputs built here, exact rejects and exact good rows, crash safety, splits.

Run: pytest tests/components/prepare_data/test_core.py -q
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.common import artifacts, schema
from components.common.config import ConfigError, build_config
from components.prepare_data import cli, core, fanout
from components.prepare_data.rows import split_of
from components.common.dataset import ShardWriter, load_split
from components.prepare_data.config import PrepareDataConfig

WHITE = (255, 255, 255)


def cfg(**kw) -> PrepareDataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return build_config(PrepareDataConfig, kw)


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def write_source(folder: Path, rows: list[dict], files: dict[str, bytes]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    with open(folder / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return folder


def gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1), "RGB")


def read_rows(out: Path) -> dict[str, dict]:
    manifest = artifacts.read_manifest(str(out), kind=schema.DATASET_KIND)
    rows = {}
    for split in schema.SPLITS:
        for rel in manifest["splits"][split]["files"]:
            for row in pq.read_table(out / rel).to_pylist():
                rows[row["id"]] = {**row, "split": split}
    return rows


def sft_row(id_, image, question="What is it?", answer="a thing", category="misc"):
    return {"id": id_, "image": image, "question": question, "answer": answer, "category": category}


@pytest.fixture(scope="module")
def nasty(tmp_path_factory):
    """Good rows in every odd mode, and one bad row per reject reason."""
    root = tmp_path_factory.mktemp("nasty") / "src"
    files: dict[str, bytes] = {}
    rows: list = []
    good: dict[str, dict] = {}

    def add_good(id_, rel, data, expect, **kw):
        files[rel] = data
        row = sft_row(id_, rel, **kw)
        rows.append(row)
        good[id_] = {"row": row, **expect}

    add_good("rgb", "images/rgb.png", png(gradient(40, 30)), {"size": (40, 30), "passthrough": True})
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    add_good("rgba", "images/rgba.png", png(rgba), {"size": (20, 10), "pixel": ((0, 0), WHITE), "pixel2": ((5, 5), (255, 0, 0))})
    la = Image.new("LA", (10, 10), (100, 255))
    la.putpixel((1, 1), (0, 0))
    add_good("la", "images/la.png", png(la), {"size": (10, 10), "pixel": ((1, 1), WHITE), "pixel2": ((5, 5), (100, 100, 100))})
    pal = Image.new("P", (12, 12), 0)
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    add_good("palette", "images/p.png", png(pal), {"size": (12, 12), "pixel": ((3, 3), (0, 0, 255))})
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    add_good("cmyk", "images/cmyk.jpg", jpeg(cmyk), {"size": (16, 16), "format": "JPEG"})
    i16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert i16.mode.startswith("I;16")
    add_good("i16", "images/i16.png", png(i16), {"size": (8, 8), "pixel": ((2, 2), WHITE)})
    one = Image.new("1", (9, 9), 1)
    add_good("bilevel", "images/one.png", png(one), {"size": (9, 9), "pixel": ((4, 4), WHITE)})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    add_good("exif", "images/exif.jpg", jpeg(gradient(40, 20), exif=exif.tobytes()), {"size": (20, 40), "format": "JPEG"})
    files["images/multi_a.png"] = png(gradient(10, 10))
    files["images/multi_b.png"] = png(gradient(12, 6))
    multi = sft_row("multi", ["images/multi_a.png", "images/multi_b.png"], question="Which is wider?", answer="the second")
    rows.append(multi)
    good["multi"] = {"row": multi, "n_images": 2}
    # A row without an id gets a content-hash id.
    files["images/noid.png"] = png(gradient(11, 7))
    noid = sft_row(None, "images/noid.png", answer="no id")
    del noid["id"]
    rows.append(noid)

    # Bad rows: one per reason.
    bad = {}

    def add_bad(reason, row, rel=None, data=None):
        if rel is not None:
            files[rel] = data
        rows.append(row)
        bad[reason] = row.get("id")

    add_bad("not_an_image", sft_row("corrupt", "images/corrupt.png"), "images/corrupt.png", b"\x89PNX" + bytes(range(256)) * 4)
    full = jpeg(gradient(64, 64))
    add_bad("truncated_image", sft_row("truncated", "images/trunc.jpg"), "images/trunc.jpg", full[: len(full) // 2])
    add_bad("empty_file", sft_row("zero", "images/zero.png"), "images/zero.png", b"")
    add_bad("too_many_pixels", sft_row("huge", "images/huge.png"), "images/huge.png", png(Image.new("L", (400, 300))))
    add_bad("missing_image", sft_row("missing", "images/nope.png"))
    (root.parent / "outside.png").parent.mkdir(parents=True, exist_ok=True)
    (root.parent / "outside.png").write_bytes(png(gradient(5, 5)))
    add_bad("image_path_escapes_root", sft_row("escape", "../outside.png"))
    add_bad("empty_answer", sft_row("empty_answer", "images/rgb.png", answer="  "))
    add_bad("non_string_answer", sft_row("number_answer", "images/rgb.png", answer=42))
    add_bad("duplicate", {**good["rgb"]["row"], "id": "rgb_again"})
    add_bad("empty_question", sft_row("no_question", "images/rgb.png", question=None))
    # a text file is not an image
    add_bad("corrupt_or_text", sft_row("text", "images/text.png"), "images/text.png", b"hello, I am text\n" * 10)
    rows.append("{not json")
    bad["malformed_row"] = "rows.jsonl:" + str(len(rows))
    write_source(root, rows, files)
    out = root.parent / "out"
    manifest = core.run(cfg(max_invalid_fraction=1.0, max_image_pixels=100_000, eval_fraction=0.3), str(root), str(out))
    return {"root": root, "out": out, "manifest": manifest, "good": good, "bad": bad, "rows": rows}


def test_every_bad_row_is_rejected_with_its_reason(nasty):
    m = nasty["manifest"]
    rejects = {reason: e["count"] for reason, e in m["rejects"].items()}
    assert rejects == {
        "not_an_image": 2,  # random bytes + a text file
        "truncated_image": 1,
        "empty_file": 1,
        "too_many_pixels": 1,
        "missing_image": 1,
        "image_path_escapes_root": 1,
        "empty_answer": 1,
        "non_string_answer": 1,
        "duplicate": 1,
        "empty_question": 1,
        "malformed_row": 1,
    }
    assert m["rejects"]["not_an_image"]["examples"] == ["corrupt", "text"]
    assert m["rejects"]["duplicate"]["examples"] == ["rgb_again"]
    assert m["rejects"]["malformed_row"]["examples"] == [nasty["bad"]["malformed_row"]]
    assert m["counts"]["rows_in"] == len(nasty["rows"])
    assert m["counts"]["rows_out"] == len(nasty["good"]) + 1  # + the id-less row
    assert m["counts"]["invalid"] == 11  # duplicates are not "invalid"
    assert m["counts"]["rows_in"] == m["counts"]["rows_out"] + m["counts"]["rejected"]
    assert m["warnings"] and "11 of" in m["warnings"][0]


def test_good_rows_come_through_with_exact_content(nasty):
    rows = read_rows(nasty["out"])
    m = nasty["manifest"]
    assert sum(m["splits"][s]["rows"] for s in schema.SPLITS) == len(rows) == m["counts"]["rows_out"]
    for id_, expect in nasty["good"].items():
        row = rows[id_]
        src = expect["row"]
        n = expect.get("n_images", 1)
        assert row["messages"] == [schema.user_turn(src["question"], n), schema.assistant_turn(src["answer"])]
        assert row["answers"] == [src["answer"]]
        assert row["category"] == src["category"]
        assert len(row["images"]) == n
        ims = [Image.open(io.BytesIO(i["bytes"])) for i in row["images"]]
        for im in ims:
            im.load()
            assert im.mode == "RGB"
        if "size" in expect:
            assert ims[0].size == expect["size"], id_
        if "format" in expect:
            assert ims[0].format == expect["format"], id_
        for key in ("pixel", "pixel2"):
            if key in expect:
                xy, colour = expect[key]
                assert ims[0].getpixel(xy) == colour, (id_, key)
    # The RGB PNG went through byte for byte (no needless re-encode).
    assert rows["rgb"]["images"][0]["bytes"] == (nasty["root"] / "images/rgb.png").read_bytes()
    # CMYK red comes out red (JPEG: approximately).
    r, g, b = Image.open(io.BytesIO(rows["cmyk"]["images"][0]["bytes"])).convert("RGB").getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60
    # EXIF: the 40x20 gradient was rotated, so its left-right gradient now runs top-down.
    exif_im = Image.open(io.BytesIO(rows["exif"]["images"][0]["bytes"])).convert("RGB")
    assert exif_im.getpixel((10, 2))[0] < 40 and exif_im.getpixel((10, 37))[0] > 215
    # The id-less row got a content-hash id; the preference is stable.
    (noid,) = [r for i, r in rows.items() if i not in nasty["good"]]
    assert len(noid["id"]) == 32 and noid["answers"] == ["no id"]
    assert {r["split"] for r in rows.values()} == {"train", "eval"}
    for id_, row in rows.items():
        assert row["split"] == split_of(id_, 0.3)


def test_manifest_keys_and_files(nasty):
    m = nasty["manifest"]
    out = nasty["out"]
    for key in ("kind", "task", "splits", "content_hash", "counts", "rejects", "processor_settings", "images",
                "tokens_per_image", "config", "schema", "created_at"):
        assert key in m, key
    assert m["kind"] == schema.DATASET_KIND and m["task"] == "sft"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["eval/part-00000.parquet", "manifest.json", "rejects.jsonl", "train/part-00000.parquet"]
    assert m["rejects_file"] == "rejects.jsonl"
    assert m["config"]["max_image_pixels"] == 100_000
    assert m["processor_settings"] is None and m["tokens_per_image"] is None
    assert m["images"]["source_modes"]["CMYK"] == 1


def test_output_reads_with_pyarrow_and_datasets(nasty):
    import datasets

    out = nasty["out"]
    table = pq.read_table(out / "train/part-00000.parquet")
    assert table.schema.remove_metadata().equals(schema.SFT_SCHEMA)
    ds = datasets.load_dataset("parquet", data_files={"train": str(out / "train/*.parquet")}, split="train")
    assert len(ds) == nasty["manifest"]["splits"]["train"]["rows"]
    assert isinstance(ds[0]["images"][0], Image.Image)
    loaded = load_split(str(out), "eval")
    assert len(loaded) == nasty["manifest"]["splits"]["eval"]["rows"]
    assert loaded[0]["images"][0].mode == "RGB"
    assert loaded.column_names == schema.SFT_SCHEMA.names


def test_process_pool_gives_identical_output(nasty, tmp_path):
    m = core.run(cfg(max_invalid_fraction=1.0, max_image_pixels=100_000, eval_fraction=0.3, num_workers=2),
                 str(nasty["root"]), str(tmp_path / "out"))
    assert m["content_hash"] == nasty["manifest"]["content_hash"]
    assert m["rejects"] == nasty["manifest"]["rejects"]


def _good_source(root: Path, n: int, start: int = 0) -> Path:
    files = {f"images/{i}.png": png(gradient(8 + i % 5, 8)) for i in range(start, start + n)}
    rows = [sft_row(f"row-{i}", f"images/{i}.png", answer=f"answer {i}") for i in range(start, start + n)]
    if (root / "rows.jsonl").exists():
        rows = [json.loads(line) for line in (root / "rows.jsonl").read_text().splitlines()] + rows
    return write_source(root, rows, files)


def test_split_is_stable_when_data_is_appended(tmp_path):
    src = _good_source(tmp_path / "src", 60)
    core.run(cfg(), str(src), str(tmp_path / "a"))
    first = read_rows(tmp_path / "a")
    _good_source(src, 40, start=60)
    core.run(cfg(), str(src), str(tmp_path / "b"))
    second = read_rows(tmp_path / "b")
    assert len(first) == 60 and len(second) == 100
    assert all(second[i]["split"] == r["split"] for i, r in first.items())
    n_eval = sum(r["split"] == "eval" for r in second.values())
    assert 8 <= n_eval <= 35  # ~20%


def test_crash_mid_write_leaves_no_manifest(tmp_path, monkeypatch):
    src = _good_source(tmp_path / "src", 30)
    out = tmp_path / "out"
    core.run(cfg(), str(src), str(out))  # a complete earlier run in the same place
    assert artifacts.is_complete(str(out))
    real_add = ShardWriter.add
    written = []

    def crashing_add(self, row):
        written.append(row["id"])
        if len(written) > 10:
            raise RuntimeError("disk on fire")
        real_add(self, row)

    monkeypatch.setattr(ShardWriter, "add", crashing_add)
    with pytest.raises(RuntimeError, match="disk on fire"):
        core.run(cfg(row_group_rows=2), str(src), str(out))
    assert not (out / "manifest.json").exists()
    with pytest.raises(artifacts.IncompleteArtifactError, match="no manifest.json"):
        load_split(str(out), "train")
    # A hard kill can leave shards behind without a manifest: still refused.
    partial = tmp_path / "partial"
    (partial / "train").mkdir(parents=True)
    (partial / "train" / "part-00000.parquet").write_bytes(b"PAR1")
    with pytest.raises(artifacts.IncompleteArtifactError, match="did not finish"):
        load_split(str(partial), "train")


def _one_bad_in_ten(root: Path) -> Path:
    src = _good_source(root, 9)
    with open(src / "rows.jsonl", "a") as f:
        f.write(json.dumps(sft_row("bad", "images/missing.png")) + "\n")
    return src


def test_max_invalid_fraction_fails_above_and_warns_below(tmp_path, capsys):
    src = _one_bad_in_ten(tmp_path / "src")
    with pytest.raises(core.TooManyInvalidRowsError, match=r"1 of 10 rows .* invalid \(10.0%\).*missing_image=1 \(e.g. bad\)"):
        core.run(cfg(max_invalid_fraction=0.05), str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
    rc = cli.main(["--source", str(src), "--output", str(tmp_path / "out"), "--no-progress", "--set", "num_workers=0"])
    err = capsys.readouterr().err
    assert rc == 3 and "max_invalid_fraction" in err and "--max-invalid-fraction" in err and str(src) in err
    rc = cli.main(["--source", str(src), "--output", str(tmp_path / "out"), "--no-progress", "--num-workers", "0",
                   "--max-invalid-fraction", "0.2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "prepared 9 of 10 rows" in out and "missing_image" in out and "warning" in out
    assert f"every rejected row, with its source line and what was wrong: {tmp_path / 'out' / 'rejects.jsonl'}" in out
    assert artifacts.read_manifest(str(tmp_path / "out"))["counts"]["rows_out"] == 9


def test_cli_reports_config_and_source_errors(tmp_path, capsys):
    src = _good_source(tmp_path / "src", 3)
    rc = cli.main(["--source", str(src), "--output", str(tmp_path / "o"), "--set", "eval_fraction=1.5",
                   "--set", "image_format=gif"])
    err = capsys.readouterr().err
    assert rc == 2 and "eval_fraction" in err and "image_format" in err
    rc = cli.main(["--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere" in err
    rc = cli.main(["--source", str(src), "--output", str(src)])
    assert rc == 2 and "overwrite the source" in capsys.readouterr().err
    rc = cli.main(["--source", str(src), "--output", str(tmp_path / "o"), "--set", "image_colum=x"])
    assert rc == 2 and "unknown key 'image_colum'" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        build_config(PrepareDataConfig, {"preset": "nope"})


def test_wrong_column_mapping_names_the_column_and_stops_early(tmp_path, monkeypatch):
    src = _good_source(tmp_path / "src", 12)
    rows = [json.loads(line) for line in (src / "rows.jsonl").read_text().splitlines()]
    for r in rows:
        r["query"] = r.pop("question")
    (src / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(fanout, "EARLY_ROWS", 8)  # the give-up rule lives where parts run
    with pytest.raises(core.TooManyInvalidRowsError, match=r"stopped early.*column_not_found:question=\d+ \(e.g. row-0.*--set question_column"):
        core.run(cfg(), str(src), str(tmp_path / "out"))
    m = core.run(cfg(question_column="query"), str(src), str(tmp_path / "out"))
    assert m["counts"]["rows_out"] == 12


def test_in_process_run_leaves_pillow_guard_as_it_was(nasty):
    # The nasty run used max_image_pixels=100_000 in-process; other code in this interpreter keeps Pillow's default.
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > 1_000_000
    Image.open(io.BytesIO(png(Image.new("L", (1000, 1000))))).load()


def test_same_id_with_different_content_is_rejected(tmp_path):
    src = _good_source(tmp_path / "src", 3)
    with open(src / "rows.jsonl", "a") as f:
        f.write(json.dumps(sft_row("row-1", "images/2.png", answer="something else")) + "\n")
        f.write(json.dumps(sft_row("row-1", "images/1.png", answer="answer 1")) + "\n")  # exact duplicate
    m = core.run(cfg(max_invalid_fraction=0.5), str(src), str(tmp_path / "out"))
    assert m["rejects"] == {"duplicate_id": {"count": 1, "examples": ["row-1"]},
                            "duplicate": {"count": 1, "examples": ["row-1"]}}
    assert read_rows(tmp_path / "out")["row-1"]["answers"] == ["answer 1"]  # the first one wins


def test_rejects_jsonl_lists_every_rejected_row_with_position_and_detail(nasty):
    m = nasty["manifest"]
    records = [json.loads(line) for line in (nasty["out"] / "rejects.jsonl").read_text().splitlines()]
    assert len(records) == m["counts"]["rejected"] == 12
    assert {k for r in records for k in r} == {"id", "file", "line", "row", "reason", "detail"}
    # Same counts per reason as the manifest, and every line points at the very row it names.
    counts: dict[str, int] = {}
    for r in records:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
        assert r["file"] == "rows.jsonl" and r["line"] == r["row"]  # no blank lines in this source
        source_row = nasty["rows"][r["line"] - 1]
        if r["id"] is not None:
            assert source_row["id"] == r["id"]
    assert counts == {reason: e["count"] for reason, e in m["rejects"].items()}
    by_id = {r["id"]: r for r in records if r["id"] is not None}
    assert by_id["huge"]["detail"] == "images/huge.png: 400x300 = 120,000 pixels, above max_image_pixels=100,000"
    assert by_id["missing"]["detail"] == "images/nope.png: no such file"
    assert by_id["zero"]["detail"] == "images/zero.png: zero bytes"
    assert by_id["number_answer"]["detail"] == "answer column 'answer' holds int 42, not text"
    assert by_id["empty_answer"]["detail"] == "answer column 'answer' is blank ('  ')"
    assert by_id["no_question"]["detail"] == "question column 'question' is null"
    assert by_id["escape"]["detail"].startswith("'../outside.png' resolves to ") and "outside the source folder" in by_id["escape"]["detail"]
    assert by_id["rgb_again"]["reason"] == "duplicate" and "earlier row" in by_id["rgb_again"]["detail"]
    (malformed,) = [r for r in records if r["reason"] == "malformed_row"]
    assert malformed == {"id": None, "file": "rows.jsonl", "line": len(nasty["rows"]), "row": len(nasty["rows"]),
                         "reason": "malformed_row",
                         "detail": "not JSON: Expecting property name enclosed in double quotes at column 2"}


def test_too_many_invalid_rows_shows_first_rejects_and_leaves_the_full_list(tmp_path, capsys):
    src = _good_source(tmp_path / "src", 6)
    with open(src / "rows.jsonl", "a") as f:
        for i in range(7):
            f.write(json.dumps(sft_row(f"gone-{i}", f"images/gone-{i}.png")) + "\n")
    out = tmp_path / "out"
    rc = cli.main(["--source", str(src), "--output", str(out), "--no-progress", "--num-workers", "0",
                   "--max-invalid-fraction", "0.5"])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 3 and "Traceback" not in err
    # (the 7th bad row is the last one: the known total already shows the limit is passed)
    assert lines[0].startswith("prepare-data: after the first 13 rows (stopped early) 7 of 13 rows of ")
    assert "are invalid (53.8%), above max_invalid_fraction=50.0%" in lines[0]
    assert lines[1] == "First rejected rows:"
    assert lines[2:7] == [f"  rows.jsonl line {7 + i} (id gone-{i}): missing_image: images/gone-{i}.png: no such file"
                          for i in range(5)]
    assert lines[7] == f"Every rejected row (7) is listed in {out / 'rejects.jsonl'}."
    assert lines[8] == f"No manifest was written to {str(out)!r}."
    # The full list is there; the folder is still not a dataset.
    records = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"gone-{i}" for i in range(7)]
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]
    assert not artifacts.is_complete(str(out))
    with pytest.raises(artifacts.IncompleteArtifactError):
        load_split(str(out), "train")
    # A good rerun replaces the list with its own (here: empty) and publishes the dataset.
    m = core.run(cfg(max_invalid_fraction=0.6), str(src), str(out))
    assert m["counts"]["rejected"] == 7 and len((out / "rejects.jsonl").read_text().splitlines()) == 7
    for f in (src / "images").glob("gone-*"):
        f.unlink()
    (src / "rows.jsonl").write_text("".join(line + "\n" for line in (src / "rows.jsonl").read_text().splitlines()[:6]))
    m = core.run(cfg(), str(src), str(out))
    assert m["counts"]["rejected"] == 0 and (out / "rejects.jsonl").read_text() == ""


@pytest.mark.parametrize("workers", [0, 2])
def test_early_give_up_counts_every_row_it_read(tmp_path, capsys, workers):
    """Rows 100.. are all bad: even ones fail while being read (no answer), odd ones in the image workers (no
    image file). When the run gives up, the rows still in the workers are counted too: exact counts."""
    good = 100
    src = _good_source(tmp_path / "src", good)
    with open(src / "rows.jsonl", "a") as f:
        for i in range(good, 400):
            row = sft_row(f"bad-{i}", f"images/{i % good}.png", answer=None) if i % 2 == 0 else sft_row(f"bad-{i}", f"images/absent-{i}.png")
            f.write(json.dumps(row) + "\n")
    with pytest.raises(core.TooManyInvalidRowsError) as caught:
        core.run(cfg(max_invalid_fraction=0.1, num_workers=workers), str(src), str(tmp_path / "out"))
    e = caught.value
    counts, rejects = e.summary["counts"], e.summary["rejects"]
    rows_in = counts["rows_in"]
    bad = rows_in - good  # every row read after the good ones is bad, and every one of them is counted
    assert 40 < bad < 300  # stopped early: more than 10% of 400 invalid, long before the end
    assert counts["invalid"] == counts["rejected"] == bad and counts["rows_out"] == good
    assert rejects["empty_answer"]["count"] == (bad + 1) // 2 and rejects["missing_image"]["count"] == bad // 2
    first_line = str(e).splitlines()[0]
    assert first_line.startswith(f"after the first {rows_in} rows (stopped early) {bad} of {rows_in} rows of ")
    assert f"empty_answer={(bad + 1) // 2} " in first_line and f"missing_image={bad // 2} " in first_line
    records = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert len(records) == bad
