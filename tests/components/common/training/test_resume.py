"""Preemption: SFT killed after a checkpoint (SIGKILL, or SIGTERM as Vertex spot / Kubernetes send it) and
restarted with the same command resumes from the newest complete checkpoint and ends with the same steps
and the same weights as a run that was never interrupted.

Each training step is slowed down in the child process only (a ``sitecustomize`` on its PYTHONPATH wraps
``Trainer.training_step``) so the test can act between steps; the command line itself is the user's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.fixtures_models import TINY_TRAINING

REPO = Path(__file__).resolve().parents[4]
MAX_STEPS = 8
SAVE_STEPS = 3
TRAINING = {**TINY_TRAINING, "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS}

SLOW_STEPS = '''
import os, time
import transformers.trainer as _t
_delay = float(os.environ["VLMTUNE_TEST_STEP_DELAY"])
_original = _t.Trainer.training_step
def training_step(self, *args, **kwargs):
    time.sleep(_delay)
    return _original(self, *args, **kwargs)
_t.Trainer.training_step = training_step
'''


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared_sft, tiny_model_dir):
    from components.common.config import build_config
    from components.sft.config import SFTStepConfig
    from components.sft.core import run

    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    manifest = run(build_config(SFTStepConfig, {**TRAINING, "base_model": str(tiny_model_dir)}), str(prepared_sft), str(out))
    return out, manifest


def sft_command(prepared_sft, tiny_model_dir, output: Path, checkpoints: Path) -> list[str]:
    command = [sys.executable, "-m", "pipelines.cli", "sft", "--dataset", str(prepared_sft), "--output", str(output),
               "--base-model", str(tiny_model_dir), "--checkpoint-uri", str(checkpoints)]
    for key, value in TRAINING.items():
        command += ["--set", f"{key}={value}"]
    return command


def child_env(slow_dir: Path | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if slow_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(slow_dir), str(REPO), env.get("PYTHONPATH", "")])
        env["VLMTUNE_TEST_STEP_DELAY"] = "0.5"
    return env


def complete_steps(checkpoints: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*/COMPLETE"))


def start_slow_and_wait_for_checkpoint(command, run_dir: Path, checkpoints: Path, after_step: int, timeout: float = 240):
    """Start ``command`` with slowed steps; return it once a complete checkpoint newer than ``after_step`` exists."""
    slow_dir = run_dir / "slow"
    slow_dir.mkdir(parents=True)
    (slow_dir / "sitecustomize.py").write_text(SLOW_STEPS)
    log = open(run_dir / "run.log", "w")
    proc = subprocess.Popen(command, cwd=REPO, env=child_env(slow_dir), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while not [s for s in complete_steps(checkpoints) if s > after_step]:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"no new complete checkpoint appeared (rc={proc.returncode}):\n{(run_dir / 'run.log').read_text()[-3000:]}")
        time.sleep(0.05)
    return proc


def test_preempted_twice_sigterm_then_sigkill_resumes_each_time(tmp_path, prepared_sft, tiny_model_dir, uninterrupted):
    """One run preempted twice, as spot VMs are: SIGTERM (save at once, exit 143), restart; SIGKILL after the next
    checkpoint (no warning at all), restart; it finishes as if never interrupted."""
    output, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    command = sft_command(prepared_sft, tiny_model_dir, output, checkpoints)

    # 1. SIGTERM right after the first scheduled checkpoint: lands during step SAVE_STEPS + 1.
    proc = start_slow_and_wait_for_checkpoint(command, tmp_path / "1", checkpoints, after_step=0)
    assert complete_steps(checkpoints) == [SAVE_STEPS]
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    log = (tmp_path / "1" / "run.log").read_text()
    assert rc == 143, log[-3000:]
    # The SIGTERM save is off the save_steps grid: the signal, not the schedule, saved it, at the next step end.
    assert complete_steps(checkpoints) == [SAVE_STEPS, SAVE_STEPS + 1], log[-3000:]
    assert "resuming from" not in log and not (output / "manifest.json").exists()

    # 2. Restart with the same command; SIGKILL once the next scheduled checkpoint is complete.
    proc = start_slow_and_wait_for_checkpoint(command, tmp_path / "2", checkpoints, after_step=SAVE_STEPS + 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    log = (tmp_path / "2" / "run.log").read_text()
    assert f"resuming from {checkpoints}/checkpoint-{SAVE_STEPS + 1}" in log, log[-3000:]
    survived = max(complete_steps(checkpoints))
    assert SAVE_STEPS + 1 < survived < MAX_STEPS and not (output / "manifest.json").exists()
    # A checkpoint folder without its marker (what a kill during upload leaves) must be ignored.
    half = checkpoints / f"checkpoint-{survived + 1}"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.json").write_text("{not json")

    # 3. Restart again: resumes from the newest complete checkpoint and finishes.
    done = subprocess.run(command, cwd=REPO, env=child_env(None), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {checkpoints}/checkpoint-{survived}" in done.stderr
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from"] == f"checkpoint-{survived}"

    reference_dir, reference = uninterrupted
    assert manifest["metrics"]["global_steps"] == reference["metrics"]["global_steps"] == MAX_STEPS
    # Adapter, optimizer, scheduler, RNG and data position were all restored: the weights match a run that was
    # never interrupted (a fresh start, a reset optimizer or a different batch order would not).
    resumed, expected = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (output, reference_dir))
    assert set(resumed) == set(expected)
    for key in expected:
        assert resumed[key].allclose(expected[key], atol=1e-6), key
    # The loss curve is continuous: the restored log history plus the resumed steps, one entry per step.
    history = json.loads((output / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, MAX_STEPS + 1))


def test_latest_complete_checkpoint_ignores_folders_without_marker(tmp_path):
    from components.common.training.checkpoints import CHECKPOINT_MARKER, latest_complete_checkpoint

    for step, marked in ((2, True), (4, True), (6, False), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        if marked:
            (folder / CHECKPOINT_MARKER).write_text("{}")
    (tmp_path / "checkpoint-latest").mkdir()
    (tmp_path / "checkpoint-latest" / CHECKPOINT_MARKER).write_text("{}")
    assert latest_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert latest_complete_checkpoint(str(tmp_path / "nothing-here")) is None
    assert latest_complete_checkpoint(None) is None


def test_dpo_resumes_from_the_latest_complete_checkpoint(tmp_path, prepared_preference, sft_model_dir):
    import shutil

    from components.common.config import build_config
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    config = build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 4, "save_steps": 2, "learning_rate": 5e-2})
    full = run(config, str(prepared_preference), str(sft_model_dir), str(tmp_path / "full"), str(tmp_path / "ckpt-full"))
    assert full["metrics"]["resumed_from"] is None
    # A preempted run's checkpoint store: checkpoint-2 complete, checkpoint-4 half-written (no marker).
    shutil.copytree(tmp_path / "ckpt-full" / "checkpoint-2", tmp_path / "ckpt" / "checkpoint-2")
    shutil.copytree(tmp_path / "ckpt-full" / "checkpoint-4", tmp_path / "ckpt" / "checkpoint-4")
    (tmp_path / "ckpt" / "checkpoint-4" / "COMPLETE").unlink()
    resumed = run(config, str(prepared_preference), str(sft_model_dir), str(tmp_path / "resumed"), str(tmp_path / "ckpt"))
    assert resumed["metrics"]["resumed_from"] == "checkpoint-2"
    assert resumed["metrics"]["global_steps"] == full["metrics"]["global_steps"] == 4
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("full", "resumed"))
    assert set(a) == set(b) and all(a[k].allclose(b[k], atol=1e-6) for k in a)
    assert (tmp_path / "ckpt" / "checkpoint-4" / "COMPLETE").exists()  # re-saved, marker last


def test_two_processes_share_checkpoints_and_resume_exactly(tmp_path, prepared_sft, tiny_model_dir):
    """Data parallel on one node (torchrun, gloo on CPU, as docs/multi_gpu.md describes): one artifact, written
    by process 0; each checkpoint holds both processes' RNG states; a restart resumes to the same weights."""
    output, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipelines.cli", "sft", "--dataset", str(prepared_sft), "--output", str(output),
               "--base-model", str(tiny_model_dir), "--checkpoint-uri", str(checkpoints)]
    for key, value in {**TINY_TRAINING, "max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2}.items():
        command += ["--set", f"{key}={value}"]
    env = {**child_env(None), "ACCELERATE_USE_CPU": "true"}  # CPU processes use the gloo backend
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["metrics"]["global_steps"] == 4
    history = json.loads((output / "log_history.json").read_text())
    # 4 steps x 2 rows x 2 processes = 16 of the 40 train rows: the processes split the data, not repeat it.
    assert history[-1]["epoch"] == pytest.approx(16 / manifest["metrics"]["train_rows"])
    assert first.stderr.count(f"checkpoint {checkpoints}/checkpoint-4 published") == 1  # process 0 only
    assert {p.name for p in (checkpoints / "checkpoint-4").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    expected = load_file(output / "adapter" / "adapter_model.safetensors")

    (checkpoints / "checkpoint-4" / "COMPLETE").unlink()  # as if preempted while uploading checkpoint-4
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((output / "manifest.json").read_text())["metrics"]["resumed_from"] == "checkpoint-2"
    resumed = load_file(output / "adapter" / "adapter_model.safetensors")
    assert all(resumed[k].allclose(expected[k], atol=1e-6) for k in expected)


@pytest.mark.gcs
def test_checkpoints_on_gs_publish_marker_last_and_fetch_the_newest_complete(gcs_bucket, tmp_path):
    from components.common import storage
    from components.common.training.checkpoints import CHECKPOINT_MARKER, fetch_checkpoint, latest_complete_checkpoint, publish_checkpoint

    uri = f"gs://{gcs_bucket}/ckpt/run-1/sft"
    for step in (2, 4):
        local = tmp_path / "work" / f"checkpoint-{step}"
        local.mkdir(parents=True)
        (local / "optimizer.pt").write_bytes(b"o" * step)
        (local / "rng_state.pth").write_bytes(b"r")
        publish_checkpoint(local, uri, step)
    # checkpoint-6: what a kill during upload leaves (files, no marker), plus a stale file.
    storage.write_bytes(f"{uri}/checkpoint-6/optimizer.pt", b"half")
    assert latest_complete_checkpoint(uri) == f"{uri}/checkpoint-4"
    fetched = fetch_checkpoint(uri, tmp_path / "restart")
    assert fetched == str(tmp_path / "restart" / "checkpoint-4")
    assert sorted(p.name for p in Path(fetched).iterdir()) == ["optimizer.pt", "rng_state.pth"]
    # Re-publishing step 6 clears the half-written folder first: no stale file sits under the new marker.
    local = tmp_path / "work" / "checkpoint-6"
    local.mkdir()
    (local / "adapter_model.safetensors").write_bytes(b"a")
    publish_checkpoint(local, uri, 6)
    assert sorted(u.rsplit("/", 1)[1] for u in storage.list_files(f"{uri}/checkpoint-6")) == ["COMPLETE", "adapter_model.safetensors"]
    assert latest_complete_checkpoint(uri) == f"{uri}/checkpoint-6" and CHECKPOINT_MARKER == "COMPLETE"
