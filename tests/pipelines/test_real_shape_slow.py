"""Slow tier: the whole pipeline (prepare-data -> sft -> dpo -> evaluate -> register) through `vlmtune run`
(kfp.local) on a random-weight model with SmolVLM-256M's real shape (components/common/model_shapes.py), a
handful of demo rows, 2 steps of batch 2. Shape-dependent breakage (image token counts at 512 px tiles, a
49,280-row vocabulary, 30 decoder layers, QLoRA on that shape) shows here before a user's GPU hour does.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python -m pytest tests/pipelines/test_real_shape_slow.py -m slow -s

Images: the demo's 128 px shapes under prepare-data's default need-based sizing, at the processor's own
2048 px longest edge: each fits one 512 px tile, so 64 image tokens per image (the test asserts fewer than 100).
Before need-based sizing they were upscaled to 2048 px: 1,128 tokens a sample and ~13 GB for one CPU SFT step. The gate: with random weights every model scores ~0, so ``min_delta: -1.0`` (admit any
candidate) makes the outcome defined: the DPO model passes and is registered as version 1.
The test prints its wall time and the peak RSS of the largest step process (RUSAGE_CHILDREN).
"""
from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SFT_ROWS, PREFERENCE_ROWS = 12, 10  # eval_fraction 0.3 splits these 11/1 and 5/5 (both splits non-empty)


def _manifests(root: Path) -> dict[str, list[tuple[Path, dict]]]:
    found = collections.defaultdict(list)
    for path in root.rglob("manifest.json"):
        manifest = json.loads(path.read_text())
        if str(manifest.get("kind", "")).startswith("vlmtune."):
            found[manifest["kind"]].append((path.parent, manifest))
    return found


def _image_tokens_by_row(folder: Path, manifest: dict) -> list[int]:
    """Image prompt tokens of every row (train and eval), as the processor itself expands them."""
    from components.common.dataset import open_dataset
    from components.common.modeling import load_processor
    from components.common.processor_settings import apply_processor_settings, tokens_for_size

    dataset = open_dataset(str(folder))
    processor = load_processor(manifest["processor_settings"]["processor"])
    apply_processor_settings(processor, dataset.processor_settings)
    counts = []
    for split in ("train", "eval"):
        for row in dataset.split(split):
            for image in row["images"]:
                produced = len(processor(text=["<image>"], images=[[image]], add_special_tokens=False)["input_ids"][0])
                assert produced == tokens_for_size(image.width, image.height, dataset.processor_settings), row["id"]
                counts.append(produced)
    return counts


@pytest.mark.slow
def test_whole_pipeline_at_smolvlm_256m_shape(tmp_path):
    from components.common.demo_data import write_demo_data
    from components.common.model_shapes import build_shaped_model
    from components.common.registry import open_registry

    model = build_shaped_model(Path(os.environ.get("VLMTUNE_REAL_SHAPE_MODEL", tmp_path / "smolvlm-256m-random")))
    data = write_demo_data(tmp_path / "demo-data", rows=SFT_ROWS, preference_rows=PREFERENCE_ROWS)
    training = {"method": "qlora", "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                "learning_rate": 1e-4, "logging_steps": 1, "cpu_threads": 1, "max_length": 4096}
    config = {
        "base_model": str(model), "sft_source": str(data / "sft"), "preference_source": str(data / "preference"),
        "registry": str(tmp_path / "registry"), "registry_name": "smolvlm-256m-shape",
        "prepare_config": {"eval_fraction": 0.3},
        "sft_config": training, "dpo_config": {**training, "beta": 0.1},
        "eval_config": {"metric": "exact_match", "min_delta": -1.0, "batch_size": 2, "max_new_tokens": 2, "cpu_threads": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    vlmtune = Path(sys.executable).with_name("vlmtune")
    started = time.time()
    done = subprocess.run([str(vlmtune), "run", "--workdir", str(workdir), "--config", str(tmp_path / "config.yaml"), "--no-cache"],
                          capture_output=True, text=True, env=env, timeout=1500)
    wall = time.time() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"\nreal-shape pipeline: {wall:.0f} s wall, peak RSS of the largest process {peak_mb:,.0f} MB")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    found = _manifests(workdir)
    datasets = {m["task"]: (folder, m) for folder, m in found["vlmtune.dataset"]}
    assert set(datasets) == {"sft", "preference"}
    # Nothing dropped: rows in == rows out, no rejects, train + eval == rows in, in both datasets.
    for task, rows in (("sft", SFT_ROWS), ("preference", PREFERENCE_ROWS)):
        counts = datasets[task][1]["counts"]
        assert (counts["rows_in"], counts["rows_out"], counts["rejected"]) == (rows, rows, 0), (task, counts)
        assert sum(s["rows"] for s in datasets[task][1]["splits"].values()) == rows
    # The manifest's token counts are what the processor produces, row by row.
    folder, sft_manifest = datasets["sft"]
    assert sft_manifest["processor_settings"]["image_seq_len"] == 64  # SmolVLM-256M: 64 tokens per 512 px tile
    per_row = _image_tokens_by_row(folder, sft_manifest)
    assert len(per_row) == SFT_ROWS
    assert max(per_row) < 100, per_row  # one tile each, not the 17 tiles of an upscale to 2048 px
    assert {int(k): v for k, v in sft_manifest["tokens_per_image"]["histogram"].items()} == dict(collections.Counter(per_row))

    models = {m["stage"]: (folder, m) for folder, m in found["vlmtune.model"]}
    assert set(models) == {"sft", "dpo"}
    sft_metrics, dpo_metrics = models["sft"][1]["metrics"], models["dpo"][1]["metrics"]
    assert sft_metrics["global_steps"] == 2 and sft_metrics["rows_over_token_budget"] == 0
    assert sft_metrics["train_rows"] == sft_manifest["splits"]["train"]["rows"]  # every train row reached the trainer
    assert dpo_metrics["global_steps"] == 2 and dpo_metrics["pairs_over_token_budget"] == 0
    assert sft_metrics["total_parameters"] > 200e6  # the real shape, not the tiny model
    for stage in ("sft", "dpo"):
        assert (models[stage][0] / "adapter").is_dir(), stage

    (evaluation_folder, evaluation), = found["vlmtune.evaluation"]
    assert evaluation["passed"] is True and evaluation["candidate"] == "dpo"  # min_delta -1 admits any candidate
    assert set(evaluation["models"]) == {"base", "sft", "dpo"}
    assert (evaluation_folder / "report.html").exists()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["registered_version"] == 1
    versions = open_registry(config["registry"]).list_versions("smolvlm-256m-shape")
    assert [v.version for v in versions] == [1]
    assert versions[0].content_hash == models["dpo"][1]["content_hash"]
