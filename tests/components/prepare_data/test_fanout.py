"""prepare-data fanned out (plan -> parts -> finalize) writes the dataset the one-container run writes, and
never takes a part whose item did not finish."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from components.common.config import build_config
from components.prepare_data import cli, core, fanout
from components.prepare_data.config import PrepareDataConfig

REPO = Path(__file__).resolve().parents[3]


def cfg(**kw) -> PrepareDataConfig:
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("rows_per_shard", 7)  # several shards per split, so finalize has to re-shard across parts
    kw.setdefault("row_group_rows", 3)
    kw.setdefault("max_invalid_fraction", 0.5)
    return build_config(PrepareDataConfig, kw)


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def make_source(root: Path, n: int = 40) -> Path:
    """n rows with varied image sizes, plus repeats spread over the whole source (so across items): content
    duplicates, an id taken twice, a missing image and an empty answer."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        (root / "images" / f"{i}.png").write_bytes(_png((20 + 7 * (i % 9), 30 + 5 * (i % 4)), (i * 6 % 256, 40, 90)))
        rows.append({"id": f"r{i}", "image": f"images/{i}.png", "question": "What colour?", "answer": f"c{i}"})
    rows.insert(30, {"id": "dup-of-r2", "image": "images/2.png", "question": "What colour?", "answer": "c2"})
    rows.insert(33, {"id": None, "image": "images/3.png", "question": "What colour?", "answer": "c3"})  # content dup
    rows.insert(25, {"id": "r5", "image": "images/6.png", "question": "other", "answer": "x"})  # duplicate_id
    rows.insert(12, {"id": "gone", "image": "images/absent.png", "question": "q", "answer": "a"})
    rows.insert(20, {"id": "blank", "image": "images/1.png", "question": "q", "answer": "  "})
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("seconds", "created_at", "items")}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("fanout") / "src")


@pytest.fixture(scope="module")
def single(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    return core.run(cfg(), str(source), str(out)), out


def test_three_items_write_exactly_the_one_container_dataset(source, single, tmp_path):
    m1, out1 = single
    m3 = core.run(cfg(), str(source), str(tmp_path / "out3"), shards=3)
    assert m3["items"] == 3 and m1["items"] == 1
    assert _comparable(m3) == _comparable(m1)  # counts, rejects, splits, statistics, content hash
    files1, files3 = _files(out1), _files(tmp_path / "out3")
    files1.pop("manifest.json"), files3.pop("manifest.json")
    assert files3 == files1  # every shard and rejects.jsonl byte for byte
    assert len(m1["splits"]["train"]["files"]) > 1
    # The repeats were spread over the items: dedup ran over all of them, the first one kept.
    assert m1["rejects"]["duplicate"] == {"count": 2, "examples": ["dup-of-r2", "rows.jsonl:37"]}
    assert m1["rejects"]["duplicate_id"]["count"] == 1
    assert {"missing_image", "empty_answer"} <= set(m1["rejects"])
    assert m1["counts"]["rows_in"] == 45 and m1["counts"]["rows_out"] == 40 and m1["counts"]["rejected"] == 5
    records = [json.loads(line) for line in (out1 / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == sorted(r["line"] for r in records)  # source order, whatever the items


def test_more_items_than_rows_is_capped(source, single, tmp_path):
    plan = core.plan(cfg(), str(source), str(tmp_path / "plan.json"), shards=1000)
    assert len(plan["items"]) == plan["total_rows"] == 45
    assert [(e["start"], e["stop"]) for e in plan["items"]][:2] == [(0, 1), (1, 2)]


def _cli(*args: str) -> int:
    return cli.main(list(args))


def test_step_clis_in_pipeline_order_equal_the_single_run_and_refuse_an_unfinished_part(source, single, tmp_path, capsys):
    m1, out1 = single
    plan = str(tmp_path / "plan.json")
    assert _cli("plan", "--source", str(source), "--plan", plan, "--shards", "3", "--num-workers", "0",
                "--rows-per-shard", "7", "--row-group-rows", "3", "--max-invalid-fraction", "0.5") == 0
    parts = [str(tmp_path / f"part-{i}") for i in range(3)]
    for i in (2, 0):  # any order
        assert _cli("part", "--plan", plan, "--item", str(i), "--output", parts[i]) == 0
    # Item 1 killed mid-write: its shards are there, its part.json is not.
    assert _cli("part", "--plan", plan, "--item", "1", "--output", parts[1]) == 0
    (Path(parts[1]) / fanout.PART_MANIFEST).unlink()
    capsys.readouterr()
    assert _cli("finalize", "--plan", plan, "--parts", *parts, "--output", str(tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert "item(s) [1] have none" in err and parts[1] in err and "--item N" in err
    assert not (tmp_path / "ds" / "manifest.json").exists()
    # A part missing from the list altogether is named the same way.
    assert _cli("finalize", "--plan", plan, "--parts", parts[0], parts[2], "--output", str(tmp_path / "ds")) == 2
    assert "item(s) [1] have none" in capsys.readouterr().err
    # The rerun item overwrites its half-written part; then finalize takes all three.
    (Path(parts[1]) / "train" / "stale-leftover.parquet").write_bytes(b"half")
    assert _cli("part", "--plan", plan, "--item", "1", "--output", parts[1]) == 0
    assert not (Path(parts[1]) / "train" / "stale-leftover.parquet").exists()
    assert _cli("finalize", "--plan", plan, "--parts", *parts, "--output", str(tmp_path / "ds")) == 0
    m3 = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m3["content_hash"] == m1["content_hash"] and m3["counts"] == m1["counts"] and m3["rejects"] == m1["rejects"]
    assert (tmp_path / "ds" / "rejects.jsonl").read_bytes() == (out1 / "rejects.jsonl").read_bytes()


def test_a_part_of_another_plan_is_not_taken(source, tmp_path, capsys):
    plan_a, plan_b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    core.plan(cfg(), str(source), plan_a, shards=2)
    core.plan(cfg(eval_fraction=0.5), str(source), plan_b, shards=2)
    core.part(plan_a, 0, str(tmp_path / "a0"))
    core.part(plan_b, 1, str(tmp_path / "b1"))
    with pytest.raises(core.FanoutError, match=r"item\(s\) \[1\] have none.*Parts of another plan"):
        core.finalize(plan_a, [str(tmp_path / "a0"), str(tmp_path / "b1")], str(tmp_path / "ds"))


def test_a_part_killed_by_sigkill_leaves_nothing_finalize_takes(source, single, tmp_path):
    """A real SIGKILL of the part process while it writes; then its rerun and finalize equal the single run."""
    plan = str(tmp_path / "plan.json")
    core.plan(cfg(), str(source), plan, shards=2)
    core.part(plan, 0, str(tmp_path / "p0"))
    # The item is slowed down in its own process (image work sleeps), so the kill lands mid-write.
    script = (
        "import sys, time\n"
        "from components.prepare_data import images\n"
        "orig = images.process_chunk\n"
        "def slow(tasks, settings):\n"
        "    time.sleep(0.2)\n"
        "    return orig(tasks, settings)\n"
        "images.process_chunk = slow\n"
        "from components.prepare_data import parallel\n"
        "parallel.imagelib.process_chunk = slow\n"
        "from components.prepare_data import cli\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, "part", "--plan", plan, "--item", "1", "--output",
                             str(tmp_path / "p1")], env=env, cwd=REPO)
    deadline = time.time() + 60
    staged = []
    while time.time() < deadline and not staged:
        staged = [p for p in tmp_path.rglob("*.parquet") if "p1" in str(p.parent) or ".p1" in str(p)]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert staged, "the part process wrote no shard before it was killed"
    with pytest.raises(core.FanoutError, match=r"item\(s\) \[1\] have none"):
        core.finalize(plan, [str(tmp_path / "p0"), str(tmp_path / "p1")], str(tmp_path / "ds"))
    core.part(plan, 1, str(tmp_path / "p1"))  # the retry
    m = core.finalize(plan, [str(tmp_path / "p0"), str(tmp_path / "p1")], str(tmp_path / "ds"))
    assert m["content_hash"] == single[0]["content_hash"] and m["counts"] == single[0]["counts"]
