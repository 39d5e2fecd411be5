"""A gs:// source is listed, never downloaded whole: the plan fetches only the row files, each part only the
images its own rows reference, and the dataset equals the one prepared from a local copy of the source."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from components.common import storage
from components.prepare_data import core, remote_source
from tests.components.prepare_data.test_fanout import _comparable, _files, cfg, make_source

pytestmark = pytest.mark.gcs

STRAY = "videos/huge.bin"  # a big file beside the rows that no row names: never fetched


@pytest.fixture(scope="module")
def local_source(tmp_path_factory) -> Path:
    root = make_source(tmp_path_factory.mktemp("remote") / "src")
    (root / "images" / "unused.png").write_bytes((root / "images" / "0.png").read_bytes())
    (root / STRAY).parent.mkdir()
    (root / STRAY).write_bytes(os.urandom(3 << 20))
    return root


@pytest.fixture
def gs_source(gcs_bucket, local_source) -> str:
    uri = f"gs://{gcs_bucket}/datasets/src"
    storage.upload_dir(local_source, uri)
    return uri


@pytest.fixture(scope="module")
def local_run(local_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-run") / "out"
    return core.run(cfg(), str(local_source), str(out)), out


@pytest.fixture
def downloads(monkeypatch):
    """Every object the source side downloads, relative to the source folder, per call to ``take()``."""
    seen: list[str] = []
    real_files, real_dir = storage.download_files, storage.download_dir

    def files(uris, local_dir):
        seen.extend(u.split("/datasets/src/", 1)[1] for u in uris)
        return real_files(uris, local_dir)

    def whole(uri, local_dir):
        seen.append(f"WHOLE FOLDER {uri}")
        return real_dir(uri, local_dir)

    monkeypatch.setattr(storage, "download_files", files)
    monkeypatch.setattr(storage, "download_dir", whole)

    class Taken:
        def take(self) -> list[str]:
            out = list(seen)
            seen.clear()
            return out

    return Taken()


def _rows(local_source: Path) -> list[dict]:
    return [json.loads(line) for line in (local_source / "rows.jsonl").read_text().splitlines() if line.strip()]


def _referenced_images(local_source: Path, start: int, stop: int) -> set[str]:
    """The images the rows start..stop-1 name that exist (also those of a row rejected later, for its blank
    answer: images are fetched before rows are normalised)."""
    return {r["image"] for r in _rows(local_source)[start:stop] if (local_source / r["image"]).is_file()}


def _same_dataset(manifest: dict, out: Path, local_run) -> None:
    m_local, out_local = local_run
    drop = ("source",)
    assert {k: v for k, v in _comparable(manifest).items() if k not in drop} == \
           {k: v for k, v in _comparable(m_local).items() if k not in drop}  # counts, rejects, hash, statistics
    got, want = _files(out), _files(out_local)
    got.pop("manifest.json"), want.pop("manifest.json")
    assert got == want  # every shard and rejects.jsonl byte for byte


def test_plan_lists_the_bucket_and_downloads_only_the_row_file(gs_source, local_source, downloads, tmp_path):
    plan = core.plan(cfg(), gs_source, str(tmp_path / "plan.json"), shards=3)
    assert downloads.take() == ["rows.jsonl"]  # no image, no stray file, not the folder
    local_plan = core.plan(cfg(), str(local_source), str(tmp_path / "local-plan.json"), shards=3)
    assert plan["items"] == local_plan["items"] and plan["total_rows"] == local_plan["total_rows"] == 45
    assert plan["notes"] == local_plan["notes"]


def test_parts_fetch_only_their_rows_images_and_finalize_equals_a_local_source(
        gs_source, gcs_bucket, local_source, local_run, downloads, tmp_path):
    plan_uri = f"gs://{gcs_bucket}/work/plan.json"
    plan = core.plan(cfg(), gs_source, plan_uri, shards=3)
    downloads.take()
    parts = []
    fetched_by_items: set[str] = set()
    for entry in plan["items"]:
        part_uri = f"gs://{gcs_bucket}/work/parts/{entry['item']}"
        core.part(plan_uri, entry["item"], part_uri)
        fetched = downloads.take()
        assert fetched[0] == "rows.jsonl" and len(fetched) == len(set(fetched))  # nothing fetched twice
        images = set(fetched[1:])
        assert images == _referenced_images(local_source, entry["start"], entry["stop"])
        fetched_by_items |= images
        parts.append(part_uri)
    assert STRAY not in fetched_by_items and "images/unused.png" not in fetched_by_items
    assert "images/absent.png" not in fetched_by_items  # not in the listing: rejected as missing below
    out = tmp_path / "ds"
    manifest = core.finalize(plan_uri, parts, str(out))
    assert manifest["source"] == gs_source
    _same_dataset(manifest, out, local_run)
    details = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {"reason": "missing_image", "detail": "images/absent.png: no such file"}.items() <= \
           next(d for d in details if d["reason"] == "missing_image").items()


def test_one_container_run_from_gs_fetches_only_referenced_images(gs_source, local_source, local_run, downloads,
                                                                  tmp_path):
    out = tmp_path / "ds"
    manifest = core.run(cfg(), gs_source, str(out), shards=2)
    fetched = downloads.take()
    assert fetched[0] == "rows.jsonl"
    assert set(fetched[1:]) == _referenced_images(local_source, 0, 45)
    _same_dataset(manifest, out, local_run)


def test_folder_without_rows_jsonl_fetches_its_row_files_and_notes_stray_json(gcs_bucket, tmp_path, downloads):
    """No rows.jsonl: every top-level row-like file is fetched (a .json is read to tell rows from metadata);
    nested Parquet only when the top level holds no rows. Images still come by reference only."""
    root = make_source(tmp_path / "src", n=6)
    (root / "rows.jsonl").rename(root / "part-a.jsonl")
    (root / "meta.json").write_text(json.dumps({"name": "x", "version": 1}, indent=2))
    (root / "nested").mkdir()
    (root / "nested" / "ignored.parquet").write_bytes(b"not read: the top level has rows")
    uri = f"gs://{gcs_bucket}/datasets/src"
    storage.upload_dir(root, uri)
    with remote_source.open_view(uri, None, "image") as src:
        assert sorted(downloads.take()) == ["meta.json", "part-a.jsonl"]
        assert [f.path.name for f in src.files] == ["part-a.jsonl"]
        assert any("meta.json" in note for note in src.notes)
    with remote_source.open_view(str(root), None, "image") as local:
        assert local.notes == src.notes and [f.format for f in local.files] == [f.format for f in src.files]


def test_missing_gs_source_is_a_clear_error(gcs_bucket):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with remote_source.open_view(f"gs://{gcs_bucket}/nothing/here", None, "image"):
            pass


def test_a_gs_row_file_as_source_reads_images_beside_it(gs_source, local_source, downloads, tmp_path):
    out = tmp_path / "ds"
    manifest = core.run(cfg(), f"{gs_source}/rows.jsonl", str(out))
    fetched = downloads.take()
    assert fetched[0] == "rows.jsonl" and set(fetched[1:]) == _referenced_images(local_source, 0, 45)
    local = core.run(cfg(), str(local_source / "rows.jsonl"), str(tmp_path / "local"))
    _same_dataset(manifest, out, (local, tmp_path / "local"))


def test_nested_parquet_is_fetched_only_when_the_top_level_holds_no_rows(gcs_bucket, tmp_path, downloads):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = make_source(tmp_path / "src", n=6)
    rows = _rows(root)
    (root / "rows.jsonl").unlink()
    (root / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "train-0.parquet")
    (root / "meta.json").write_text(json.dumps({"name": "x"}, indent=2))  # top level: no rows
    uri = f"gs://{gcs_bucket}/datasets/src"
    storage.upload_dir(root, uri)
    out = tmp_path / "ds"
    manifest = core.run(cfg(), uri, str(out))
    fetched = downloads.take()
    assert fetched[:2] == ["meta.json", "data/train-0.parquet"]
    assert set(fetched[2:]) == {r["image"] for r in rows if (root / r["image"]).is_file()}
    local = core.run(cfg(), str(root), str(tmp_path / "local"))
    _same_dataset(manifest, out, (local, tmp_path / "local"))


def test_output_inside_a_gs_source_is_refused(gs_source):
    from components.common.config import ConfigError

    with pytest.raises(ConfigError, match="overwrite the source"):
        core.run(cfg(), gs_source, f"{gs_source}/prepared")


def test_a_run_that_gives_up_early_counts_what_a_local_run_counts(gcs_bucket, tmp_path):
    """Images are fetched a batch ahead of the reading, but rows are counted as they are read: a part that
    gives up on missing images stops at the same row, with the same counts, as from a local copy."""
    root = tmp_path / "src"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(json.dumps("not a png").encode())
    rows = [{"id": f"r{i}", "image": "images/ok.png" if i % 5 == 0 else f"images/gone-{i}.png",
             "question": "q", "answer": "a"} for i in range(300)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    uri = f"gs://{gcs_bucket}/datasets/src"
    storage.upload_dir(root, uri)
    caught = []
    for source in (str(root), uri):
        with pytest.raises(core.TooManyInvalidRowsError) as e:
            core.run(cfg(), source, str(tmp_path / f"out-{len(caught)}"))
        caught.append(e.value)
    local, remote = caught
    assert remote.summary["counts"] == local.summary["counts"]
    assert remote.summary["counts"]["rows_in"] < 300  # it did stop early
    assert remote.summary["rejects"] == local.summary["rejects"]


def test_a_datasets_save_to_disk_folder_on_gs_is_downloaded_whole(gcs_bucket, tmp_path, downloads):
    """Its images are inside its Arrow files: there is nothing to fetch by reference, so the folder comes whole."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "uid": datasets.Value("int64")})
    datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (5 + i, 5), (255, 0, 0)) for i in range(5)], "question": ["q"] * 5,
         "answer": [f"a{i}" for i in range(5)], "uid": list(range(5))}, features=features,
    ).save_to_disk(str(tmp_path / "hf"))
    uri = f"gs://{gcs_bucket}/datasets/src"
    storage.upload_dir(tmp_path / "hf", uri)
    manifest = core.run(cfg(id_column="uid"), uri, str(tmp_path / "ds"))
    assert downloads.take() == [f"WHOLE FOLDER {uri}"]
    local = core.run(cfg(id_column="uid"), str(tmp_path / "hf"), str(tmp_path / "local"))
    _same_dataset(manifest, tmp_path / "ds", (local, tmp_path / "local"))
    assert manifest["counts"]["rows_out"] == 5
