"""The benchmarks run end to end on a CPU (scaled down), so a GPU session only has to press the button."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_smolvlm_256m_config_has_its_parameter_count():
    """The config written out in benchmarks/gpu_qlora.py builds a 256M-parameter model (on the meta device)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from benchmarks.gpu_qlora import SMOLVLM_256M as spec

    config = Idefics3Config(vision_config=dict(spec["vision"]), text_config={"model_type": "llama", **spec["text"]},
                            scale_factor=spec["scale_factor"], tie_word_embeddings=False)
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    assert 250e6 < total < 262e6, total
    assert sum(p.numel() for p in model.model.vision_model.parameters()) == pytest.approx(86.4e6, rel=0.01)  # SigLIP-B/16 at 512 px


def test_gpu_qlora_smoke_on_cpu(tmp_path, capsys):
    from benchmarks import gpu_qlora

    summary = gpu_qlora.main(["--smoke", "--workdir", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ratio"] == pytest.approx(summary["ratio"])
    for name in ("seed", "ours"):
        result = summary[name]
        assert result["steps"] == 2 and result["batch_size"] == 2
        assert result["tokens_per_s"] > 0 and result["samples_per_s"] > 0 and result["image_tiles"] > 0
        assert result["peak_memory_bytes"] > 0 and result["model_tflops_per_s"] > 0
        assert result["mfu"] is None  # no GPU peak to compare with on a CPU
    assert summary["seed"]["gradient_checkpointing"] is True  # TRL's default
    assert summary["ours"]["gradient_checkpointing"] is False  # auto: off on CPU, on with CUDA


def test_gradient_checkpointing_smoke_on_cpu(tmp_path, capsys):
    """Both settings run side by side on the tiny model; the JSON line carries what the README row needs."""
    from benchmarks import gradient_checkpointing

    summary = gradient_checkpointing.main(["--smoke", "--workdir", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["cases"].keys() == summary["cases"].keys() == {"tiny"}
    case = summary["cases"]["tiny"]
    assert (case["off"]["gradient_checkpointing"], case["on"]["gradient_checkpointing"]) == (False, True)
    for setting in ("off", "on"):
        assert case[setting]["steps"] == 2 and case[setting]["cpu_s_per_step"] > 0 and case[setting]["peak_rss_mb"] > 100
    assert case["on"]["real_tokens_per_sample"] == case["off"]["real_tokens_per_sample"] > 0  # same rows, same tokens
    assert case["text_layers_x_hidden"] == 128
    sys.path.insert(0, str(REPO / "benchmarks"))
    import readme_figures

    (row,) = readme_figures._rows_gradient_checkpointing(summary)
    assert row[0].startswith("gradient checkpointing on CPU, tiny") and "x**, RSS **" in row[3]


@pytest.mark.slow
def test_train_throughput_runs_and_prints_a_ratio(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--rows", "24", "--repeats", "1",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ratio"] > 0 and set(summary["padded_tokens_per_real_token"]) == {"seed", "seed_no_gc", "ours"}
    assert summary["ours"]["real_tokens"] == summary["seed"]["real_tokens"]  # same rows, same tokens


def test_readme_figures_render_every_row_from_saved_results(tmp_path, monkeypatch):
    """The README's benchmark table comes from the benchmarks' own JSON lines: render it from saved results."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import readme_figures

    monkeypatch.setattr(readme_figures, "RESULTS", tmp_path)
    record = {"command": "python benchmarks/generate.py", "date": "2026-12-03", "cores": 2, "load_average_at_start": 1.0,
              "result": {"rows": 78, "batch_size": 16, "batched_samples_per_s": 7.58, "one_by_one_samples_per_s": 1.42,
                         "ratio": 5.34, "answers_identical": True, "answers_differing": 0}}
    (tmp_path / "generate.json").write_text(json.dumps(record))
    table = readme_figures.render()
    assert "| batched generation (78 rows, batch 16) | 7.58 samples/s | one prompt at a time: 1.42 samples/s | " \
           "**5.34x** (identical answers) | `python benchmarks/generate.py` (2026-12-03, 2 cores, load 1.0) |" in table
    assert "| prepare_data | not measured yet |" in table  # a missing result is said, never invented
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_figures.START}\nold\n{readme_figures.END}\nrest\n")
    readme_figures.write_readme(table, readme)
    assert readme.read_text() == f"intro\n{table}\nrest\n"


def test_tokens_benchmark_smoke_on_cpu(capsys):
    """benchmarks/tokens.py end to end with a tiny processor and model: the real processor's token counts for
    both sizings (checked against the formula inside), a smaller step for the small image, the JSON line last."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import tokens

    summary = tokens.main(["--smoke", "--threads", "1", "--steps", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == summary
    by_size = {r["size"]: r for r in summary["tokens_per_image"]}
    assert by_size["64x64"]["need"] == 4 + 3 and by_size["64x64"]["fixed"] > 4 * by_size["64x64"]["need"]
    assert summary["above_cap_unchanged"] is True and by_size["4000x3000"]["ratio"] == 1.0
    assert summary["sft_step"]["64x64"]["need"]["tiles"] == 1 and summary["sft_step"]["64x64"]["fixed"]["tiles"] == 5


def test_prepare_fanout_smoke(tmp_path, capsys):
    """Two items at once vs one container on a tiny source: same dataset (checked inside), figures reported."""
    from benchmarks import prepare_fanout

    result = prepare_fanout.main(["--rows", "12", "--items", "2", "--workdir", str(tmp_path)])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert result["same_content_hash"] and result["rows_out"] == 12 and result["items"] == 2
    assert result["speedup"] > 0 and result["parallel_efficiency"] == pytest.approx(result["speedup"] / 2, abs=1e-3)
    assert len(result["peak_rss_per_item_mb"]) == 2 and all(v > 0 for v in result["peak_rss_per_item_mb"])


def test_demo_search_runs_the_step_clis_and_scores_every_category(tmp_path):
    """benchmarks/demo_search.py scaled down (40 rows, 2 SFT steps): the step CLIs run in order and the last
    line is one JSON object with held-out exact match per question type for the base and the SFT model."""
    import os
    import subprocess

    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "demo_search.py"), "--workdir", str(tmp_path), "--rows", "40",
         "--set", "max_steps=2", "--set", "eval_steps=1", "--data", '{"question_cycle": ["shape", "colour"]}'],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["rows"] == 40 and figures["data"] == {"question_cycle": ["shape", "colour"]}
    assert set(figures["sft"]) == {"overall", "shape", "colour"}  # only the asked question types
    assert set(figures["base"]) == set(figures["sft"]) and figures["sft_cpu_s"] > 0
    assert (tmp_path / "eval" / "metrics.json").is_file()
