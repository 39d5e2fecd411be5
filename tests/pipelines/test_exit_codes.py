"""One exit-code convention for every `vlmtune` command, per step: 0 done, 2 the user's input (one message, no
traceback, nothing written), 3 data over an invalid-row limit, 1 a bug (the exception propagates, so the
`vlmtune` script prints its traceback and exits 1).

Each bad input below is run through the `vlmtune` command table (pipelines/cli.py, what the console script
calls) in this process; `vlmtune run` also as a subprocess, to time it and to see what a user sees.

Run: pytest tests/pipelines/test_exit_codes.py -q
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.common import artifacts
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]


def fake_artifact(folder: Path, kind: str, **extra) -> str:
    folder.mkdir(parents=True)
    artifacts.write_manifest(str(folder), {"kind": kind, **extra})
    return str(folder)


def raw_source(folder: Path) -> str:
    (folder / "images").mkdir(parents=True)
    (folder / "rows.jsonl").write_text(json.dumps({"image": "images/a.png", "question": "q", "answer": "a"}) + "\n")
    return str(folder)


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err.strip().splitlines()


# ----------------------------------------------------------------------------------------------- prepare-data
def test_prepare_data_bad_input_is_2_and_over_the_invalid_limit_is_3(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(["prepare-data", "--source", str(tmp_path / "nowhere"), "--output", str(out)], capsys)
    assert rc == 2 and err[0].startswith("prepare-data: cannot read --source") and "nowhere" in err[0]
    rc, err = run_cli(["prepare-data", "--source", raw_source(tmp_path / "src"), "--output", str(out),
                       "--set", "eval_fracton=0.1"], capsys)
    assert rc == 2 and err[0] == "prepare-data: invalid input: --set: unknown key 'eval_fracton' (did you mean 'eval_fraction'?)"
    # The one row names an image that is not there: 100% invalid, over the 5% limit.
    rc, err = run_cli(["prepare-data", "--source", str(tmp_path / "src"), "--output", str(out), "--no-progress",
                       "--num-workers", "0"], capsys)
    assert rc == 3 and "max_invalid_fraction" in "\n".join(err)
    assert not artifacts.is_complete(str(out))


# ----------------------------------------------------------------------------------------------- sft / dpo
def test_sft_refuses_a_missing_or_raw_dataset_with_the_true_reason(tmp_path, capsys):
    out = tmp_path / "sft"
    rc, err = run_cli(["sft", "--dataset", str(tmp_path / "no-such"), "--output", str(out), "--base-model", "org/m"], capsys)
    assert rc == 2
    assert err[0] == (f"error: invalid input: --dataset: '{tmp_path / 'no-such'}' does not exist; expected a vlmtune "
                      f"dataset (the output folder of `vlmtune prepare-data`). Check the path; if a step was to write "
                      f"it, that step has not run or did not finish (it writes nothing without its manifest.json).")
    source = raw_source(tmp_path / "raw")
    rc, err = run_cli(["sft", "--dataset", source, "--output", str(out), "--base-model", "org/m"], capsys)
    assert rc == 2 and f"'{source}' exists but is not a vlmtune dataset" in err[0]
    assert f"run prepare-data on it first: `vlmtune prepare-data --source {source} --output DIR`" in err[0]
    assert not out.exists()


def test_sft_reports_config_and_dataset_problems_together(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text("learnin_rate: 1.0e-4\nlora_r: 0\n")
    rc, err = run_cli(["sft", "--dataset", str(tmp_path / "no-such"), "--output", str(tmp_path / "o"),
                       "--base-model", "org/m", "--config", str(config), "--set", "max_steps=ten"], capsys)
    assert rc == 2 and err[0] == "error: invalid input (4 problems):"
    assert err[1:] == [
        f"  - {config}: unknown key 'learnin_rate' (did you mean 'learning_rate'?)",
        "  - --set: max_steps: expected an integer, got 'ten'",
        f"  - {config}: lora_r must be > 0, got 0",
        err[4],
    ] and err[4].startswith("  - --dataset: ") and "does not exist" in err[4]


def test_sft_over_the_token_budget_is_3(tmp_path, capsys, prepared_sft, tiny_model_dir):
    rc, err = run_cli(["sft", "--dataset", str(prepared_sft), "--output", str(tmp_path / "o"), "--base-model",
                       str(tiny_model_dir), "--max-length", "8", "--max-steps", "1", "--cpu-threads", "1"], capsys)
    assert rc == 3 and err[-1].startswith("error: ") and "exceed max_length=8 tokens" in err[-1]
    assert not artifacts.is_complete(str(tmp_path / "o"))


def test_dpo_over_the_token_budget_is_3(tmp_path, capsys, prepared_preference, sft_model_dir):
    rc, err = run_cli(["dpo", "--dataset", str(prepared_preference), "--sft-model", str(sft_model_dir), "--output",
                       str(tmp_path / "o"), "--max-length", "8", "--max-steps", "1", "--cpu-threads", "1"], capsys)
    assert rc == 3 and err[-1].startswith("error: ") and "preference pairs exceed max_length=8 tokens" in err[-1]
    assert not artifacts.is_complete(str(tmp_path / "o"))


def test_dpo_refuses_a_dataset_given_as_the_sft_model(tmp_path, capsys):
    data = fake_artifact(tmp_path / "prefs", DATASET_KIND, task="preference")
    rc, err = run_cli(["dpo", "--dataset", data, "--sft-model", data, "--output", str(tmp_path / "o")], capsys)
    assert rc == 2 and err[0].startswith(f"error: invalid input: --sft-model: '{data}' holds a 'vlmtune.dataset' artifact")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- evaluate / register
def test_evaluate_says_a_missing_model_does_not_exist(tmp_path, capsys):
    data = fake_artifact(tmp_path / "data", DATASET_KIND, task="sft")
    rc, err = run_cli(["evaluate", "--dataset", data, "--model", "sft=/no/such/path", "--output", str(tmp_path / "e")], capsys)
    assert rc == 2
    assert err[0] == ("error: invalid input: --model sft: '/no/such/path' does not exist; expected a vlmtune model (the "
                      "output folder of `vlmtune sft` or `vlmtune dpo`). Check the path; if a step was to write it, that "
                      "step has not run or did not finish (it writes nothing without its manifest.json).")
    rc, err = run_cli(["evaluate", "--dataset", data, "--model", "sft", "--output", str(tmp_path / "e")], capsys)
    assert rc == 2 and err[0] == "error: invalid input: --model 'sft' must be NAME=URI, e.g. --model sft=./models/sft"
    assert not (tmp_path / "e").exists()


def test_register_says_a_missing_evaluation_does_not_exist_and_a_failed_gate_is_input(tmp_path, capsys):
    model = fake_artifact(tmp_path / "model", MODEL_KIND, content_hash="a" * 64, base_model="org/m")
    registry = str(tmp_path / "registry")
    rc, err = run_cli(["register", "--model", model, "--evaluation", "/no/such/path", "--registry", registry,
                       "--name", "m"], capsys)
    assert rc == 2 and err[0].startswith("vlmtune register: invalid input: --evaluation: '/no/such/path' does not exist; "
                                         "expected a vlmtune evaluation (the output folder of `vlmtune evaluate`)")
    refused = fake_artifact(tmp_path / "eval", EVAL_KIND, passed=False, reasons=["dpo 0.1 < base 0.2"],
                            candidate_uri=model, metrics={})
    rc, err = run_cli(["register", "--model", model, "--evaluation", refused, "--registry", registry, "--name", "m"], capsys)
    assert rc == 2 and "did not pass the gate" in err[0]
    assert not Path(registry).exists() or not list(Path(registry).rglob("*.json"))
    rc, err = run_cli(["registry", "show", "--registry", registry, "--name", "m", "--ref", "3"], capsys)
    assert rc == 2 and err[0].startswith("vlmtune registry: ")


# ----------------------------------------------------------------------------------------------- predict
def test_predict_missing_image_is_2(tmp_path, capsys):
    rc, err = run_cli(["predict", "--model", "org/m", "--image", str(tmp_path / "none.png"), "--question", "q"], capsys)
    assert rc == 2 and err[0].startswith("error: ") and "none.png" in err[0]


# ----------------------------------------------------------------------------------------------- a bug is 1
def test_an_unexpected_error_is_a_bug_and_propagates(tmp_path, monkeypatch, capsys):
    """Not swallowed into a neat message: the traceback is what a bug report needs (the script exits 1)."""
    from components.common.cli import exit_status
    from components.sft import core

    data = fake_artifact(tmp_path / "data", DATASET_KIND, task="sft")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(core, "run", broken)
    with pytest.raises(ZeroDivisionError):
        main(["sft", "--dataset", data, "--output", str(tmp_path / "o"), "--base-model", "org/m"])
    assert exit_status(ZeroDivisionError()) == 1 and exit_status(ValueError()) == 2


# ----------------------------------------------------------------------------------------------- run / submit
def vlmtune(*args: str, cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_run_with_a_misspelt_section_fails_in_seconds_and_builds_nothing(tmp_path):
    (tmp_path / "my-run.yaml").write_text("sft_confg:\n  learning_rate: 1.0e-4\n")
    workdir = tmp_path / "work"
    done, seconds = vlmtune("run", "--workdir", str(workdir), "--config", "my-run.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert seconds < 10
    assert done.stderr.splitlines()[0] == (
        "error: invalid pipeline parameters: my-run.yaml: unknown parameter 'sft_confg' (did you mean 'sft_config'?)")
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not workdir.exists()  # no tiny model, no demo data, no pipeline root, no log


def test_run_with_a_missing_config_or_a_misspelt_set_fails_up_front(tmp_path):
    workdir = tmp_path / "work"
    done, _ = vlmtune("run", "--workdir", str(workdir), "--config", "missing.yaml", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.splitlines()[0] == (
        "error: invalid pipeline parameters: --config 'missing.yaml': no such file")
    done, _ = vlmtune("run", "--workdir", str(workdir), "--set", "sft_config.learnin_rate=1e-4",
                      "--set", "sft_source=./no-data", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: invalid pipeline parameters (2 problems):",
        "  - --set: sft_config: unknown key 'learnin_rate' (did you mean 'learning_rate'?)",
        "  - --set: sft_source: './no-data' does not exist; expected the source folder or file",
    ]
    assert "Traceback" not in done.stderr and not workdir.exists()


def test_submit_names_the_params_file_of_a_misspelt_section(tmp_path, capsys):
    params = tmp_path / "run.yaml"
    params.write_text("sft_source: gs://b/sft\npreference_source: gs://b/pref\nbase_model: org/m\n"
                      "registry: gs://b/registry\ndpo_confg:\n  beta: 0.2\n")
    rc, err = run_cli(["submit", "--target", "vertex", "--project", "p", "--region", "us-central1", "--pipeline-root",
                       "gs://b/root", "--params", str(params), "--dry-run"], capsys)
    assert rc == 2 and err == ["error: invalid pipeline parameters: "
                               f"{params}: unknown parameter 'dpo_confg' (did you mean 'dpo_config'?)"]
