"""Preemption and exact resume. SFT and DPO killed after a checkpoint (SIGKILL, or SIGTERM as Vertex spot /
Kubernetes send it) past the first epoch, with length-grouped batches, and restarted with the same command,
resume from the newest complete checkpoint and end with the same weights (bit for bit), the same run totals
(train_loss over every step, token counters) and the same steps as a run that was never interrupted. A rerun of a
finished run trains nothing more. The data order of an epoch is a pure function of (seed, epoch), on one process
or several.

Each training step is slowed down in the child process only (a ``sitecustomize`` on its PYTHONPATH wraps
``Trainer.training_step``) so the test can act between steps; the command line itself is the user's.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.fixtures_models import TINY_TRAINING

REPO = Path(__file__).resolve().parents[4]

SLOW_STEPS = '''
import os, time
import transformers.trainer as _t
_delay = float(os.environ["VLMTUNE_TEST_STEP_DELAY"])
_original = _t.Trainer.training_step
def training_step(self, *args, **kwargs):
    with open(os.environ["VLMTUNE_TEST_STEP_FILE"], "w") as f:
        f.write(str(self.state.global_step + 1))  # the optimiser step now running (no gradient accumulation)
    time.sleep(_delay)
    return _original(self, *args, **kwargs)
_t.Trainer.training_step = training_step
'''


@dataclass(frozen=True)
class Case:
    """One trainer's preemption run: batch 4 over the demo split, so an epoch is a few steps."""

    step: str  # sft | dpo
    steps_per_epoch: int  # train rows / 4
    max_steps: int  # ends inside an epoch, so a resumed finished run would have a step left to take
    save_steps: int

    def settings(self) -> dict:
        extra = {"learning_rate": 5e-2} if self.step == "dpo" else {}
        return {**TINY_TRAINING, **extra, "max_steps": self.max_steps, "save_steps": self.save_steps, "group_by_length": True}


CASES = [Case("sft", steps_per_epoch=10, max_steps=24, save_steps=4), Case("dpo", steps_per_epoch=4, max_steps=13, save_steps=3)]


@dataclass
class Inputs:
    tiny_model: Path
    sft_data: Path
    preference_data: Path
    sft_model: Path


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, prepared_sft, prepared_preference, sft_model_dir) -> Inputs:
    return Inputs(tiny_model_dir, prepared_sft, prepared_preference, sft_model_dir)


def step_command(case: Case, inputs: Inputs, output: Path, checkpoints: Path) -> list[str]:
    if case.step == "sft":
        command = [sys.executable, "-m", "pipelines.cli", "sft", "--dataset", str(inputs.sft_data),
                   "--base-model", str(inputs.tiny_model)]
    else:
        command = [sys.executable, "-m", "pipelines.cli", "dpo", "--dataset", str(inputs.preference_data),
                   "--sft-model", str(inputs.sft_model)]
    command += ["--output", str(output), "--checkpoint-uri", str(checkpoints)]
    for key, value in case.settings().items():
        command += ["--set", f"{key}={value}"]
    return command


def child_env(slow_dir: Path | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    if slow_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(slow_dir), str(REPO), env.get("PYTHONPATH", "")])
        env["VLMTUNE_TEST_STEP_DELAY"] = "0.5"
        env["VLMTUNE_TEST_STEP_FILE"] = str(slow_dir / "step")
    return env


@pytest.fixture(autouse=True)
def child_tmp(tmp_path, monkeypatch) -> Path:
    """The children's temporary folder (the trainer's local work folders land there), one per test."""
    folder = tmp_path / "child-tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def run_to_the_end(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, env=child_env(None), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


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


def wait_until_step_runs(run_dir: Path, step: int, proc, timeout: float = 60) -> None:
    """Return once optimiser step ``step`` has begun in the slowed child (it then sleeps before computing)."""
    deadline = time.time() + timeout
    step_file = run_dir / "slow" / "step"
    while not (step_file.exists() and step_file.read_text() == str(step)):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"step {step} never began (rc={proc.returncode}):\n{(run_dir / 'run.log').read_text()[-3000:]}")
        time.sleep(0.02)


def adapter(output: Path) -> dict:
    return load_file(output / "adapter" / "adapter_model.safetensors")


def max_abs_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def last_logged(output: Path, key: str):
    return [h[key] for h in json.loads((output / "log_history.json").read_text()) if key in h][-1]


@dataclass
class Reference:
    output: Path
    checkpoints: Path
    metrics: dict


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs):
    """The same command never interrupted (one per trainer, run on first use)."""
    runs: dict[str, Reference] = {}

    def get(case: Case) -> Reference:
        if case.step not in runs:
            root = tmp_path_factory.mktemp(f"reference-{case.step}")
            run_to_the_end(step_command(case, inputs, root / "out", root / "ckpt"))
            metrics = json.loads((root / "out" / "manifest.json").read_text())["metrics"]
            assert metrics["global_steps"] == case.max_steps and metrics["resumed_from"] is None
            assert metrics["train_rows"] == 4 * case.steps_per_epoch  # the epochs this test counts on
            runs[case.step] = Reference(root / "out", root / "ckpt", metrics)
        return runs[case.step]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c.step for c in CASES])
def test_preempted_after_the_first_epoch_by_sigterm_then_sigkill_resumes_exactly(tmp_path, case, inputs, reference, child_tmp):
    """One run preempted twice past its first epoch, as spot VMs are: SIGTERM (save at once, exit 143), restart;
    SIGKILL after the next checkpoint (no warning at all), restart; it finishes as if never interrupted."""
    expected = reference(case)
    output, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    command = step_command(case, inputs, output, checkpoints)

    # 1. SIGTERM during the step after the first checkpoint of the second epoch.
    proc = start_slow_and_wait_for_checkpoint(command, tmp_path / "1", checkpoints, after_step=case.steps_per_epoch)
    first = min(s for s in complete_steps(checkpoints) if s > case.steps_per_epoch)
    wait_until_step_runs(tmp_path / "1", first + 1, proc)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    log = (tmp_path / "1" / "run.log").read_text()
    assert rc == 143, log[-3000:]
    # The SIGTERM save is off the save_steps grid: the signal, not the schedule, saved it, at the next step end.
    assert complete_steps(checkpoints)[-2:] == [first, first + 1], log[-3000:]
    assert (first + 1) % case.save_steps and first + 1 > case.steps_per_epoch
    assert "resuming from" not in log and not (output / "manifest.json").exists()
    assert not list(child_tmp.glob(f"vlmtune-{case.step}-*"))  # a clean exit removes the trainer's work folder

    # 2. Restart with the same command; SIGKILL during the step after the next scheduled checkpoint.
    proc = start_slow_and_wait_for_checkpoint(command, tmp_path / "2", checkpoints, after_step=first + 1)
    survived = max(complete_steps(checkpoints))
    wait_until_step_runs(tmp_path / "2", survived + 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    log = (tmp_path / "2" / "run.log").read_text()
    assert f"resuming from {checkpoints}/checkpoint-{first + 1}" in log, log[-3000:]
    assert max(complete_steps(checkpoints)) == survived
    assert first + 1 < survived < case.max_steps and not (output / "manifest.json").exists()
    # The killed run's work folder stays behind (nothing runs after SIGKILL) but holds no checkpoint: the
    # downloaded one was rotated out and each new one deleted once published.
    left = list(child_tmp.glob(f"vlmtune-{case.step}-*"))
    assert len(left) == 1 and not list(left[0].glob("checkpoint-*")), [list(d.iterdir()) for d in left]
    # A checkpoint folder without its marker (what a kill during upload leaves) must be ignored.
    half = checkpoints / f"checkpoint-{survived + 1}"
    half.mkdir(exist_ok=True)
    (half / "trainer_state.json").write_text("{not json")

    # 3. Restart again: resumes from the newest complete checkpoint and finishes.
    done = run_to_the_end(command)
    assert f"resuming from {checkpoints}/checkpoint-{survived}" in done.stderr
    metrics = json.loads((output / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from"] == f"checkpoint-{survived}"
    assert metrics["global_steps"] == expected.metrics["global_steps"] == case.max_steps
    assert metrics["steps_this_run"] == case.max_steps - survived

    # Adapter, optimizer, scheduler, RNG and the data order of every epoch were restored: the weights are those of
    # the run that was never interrupted, bit for bit (a fresh start, a reset optimizer or another batch order
    # would not give them).
    difference = max_abs_difference(adapter(output), adapter(expected.output))
    assert difference == 0.0, f"max abs difference from the uninterrupted run: {difference}"
    # Run totals cover every step, not only the ones after the last restart.
    assert metrics["train_loss"] == pytest.approx(expected.metrics["train_loss"], rel=1e-9)
    assert metrics["input_tokens_seen"] == expected.metrics["input_tokens_seen"] > 0
    assert last_logged(output, "num_tokens") == last_logged(expected.output, "num_tokens") > 0
    # The loss curve is continuous: the restored log history plus the resumed steps, one entry per step.
    history = json.loads((output / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, case.max_steps + 1))


@pytest.mark.parametrize("case", CASES, ids=[c.step for c in CASES])
def test_rerun_of_a_finished_run_trains_no_more_and_writes_the_outputs(tmp_path, case, inputs, reference):
    """The last checkpoint is the final step: killed after its marker but before the artifact was written, or a
    completed command run again with the same --checkpoint-uri. Either way no step is trained and no checkpoint
    written; the artifact comes from that checkpoint."""
    expected = reference(case)
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(expected.checkpoints, checkpoints)
    markers = {p.parent.name: p.read_bytes() for p in checkpoints.glob("checkpoint-*/COMPLETE")}
    assert max(complete_steps(checkpoints)) == case.max_steps
    output = tmp_path / "out"
    for attempt in ("artifact missing", "artifact present"):
        done = run_to_the_end(step_command(case, inputs, output, checkpoints))
        assert f"resuming from {checkpoints}/checkpoint-{case.max_steps}" in done.stderr, attempt
        metrics = json.loads((output / "manifest.json").read_text())["metrics"]
        assert (metrics["global_steps"], metrics["steps_this_run"], metrics["resumed_from"]) == (
            case.max_steps, 0, f"checkpoint-{case.max_steps}"), attempt
        assert {p.parent.name: p.read_bytes() for p in checkpoints.glob("checkpoint-*/COMPLETE")} == markers, attempt
        assert sorted(p.name for p in checkpoints.iterdir()) == sorted(markers), attempt
        assert max_abs_difference(adapter(output), adapter(expected.output)) == 0.0, attempt
        assert metrics["train_loss"] == pytest.approx(expected.metrics["train_loss"], rel=1e-9), attempt
        assert metrics["input_tokens_seen"] == expected.metrics["input_tokens_seen"], attempt


def test_epoch_order_is_a_pure_function_of_seed_and_epoch_and_processes_split_it():
    """The sampler both steps use: the same (seed, epoch) gives the same order in any process, another epoch
    another order; accelerate's BatchSamplerShard gives two processes disjoint shares that cover every row."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from components.common.training.resume import EpochSeededSampler

    lengths = [(i * 37) % 50 + 1 for i in range(40)]

    def order(seed, epoch, grouped=True):
        sampler = EpochSeededSampler(len(lengths), seed, lengths if grouped else None, batch_size=4)
        sampler.set_epoch(epoch)
        return list(sampler)

    for grouped in (True, False):
        assert order(0, 1, grouped) == order(0, 1, grouped)  # two samplers, nothing shared: the same order
        assert sorted(order(0, 1, grouped)) == list(range(40))
        assert len({tuple(order(0, e, grouped)) for e in range(4)}) == 4  # each epoch its own order
        assert order(1, 1, grouped) != order(0, 1, grouped)
    # Plain shuffles keep accelerate's SeedableRandomSampler order (seed + epoch), as before this sampler.
    import torch

    assert order(42, 3, grouped=False) == torch.randperm(40, generator=torch.Generator().manual_seed(45)).tolist()
    # Length grouping: every 4-row batch holds rows of similar length (sorted within each mega-batch).
    grouped_order = order(0, 2)
    batches = [grouped_order[i:i + 4] for i in range(0, 40, 4)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    random_order = order(0, 2, grouped=False)
    random_spread = sum(max(lengths[i] for i in random_order[j:j + 4]) - min(lengths[i] for i in random_order[j:j + 4])
                        for j in range(0, 40, 4))
    assert spread < random_spread

    def share(rank, epoch):
        sampler = EpochSeededSampler(len(lengths), 7, lengths, batch_size=2)
        sampler.set_epoch(epoch)
        shard = BatchSamplerShard(BatchSampler(sampler, batch_size=2, drop_last=False), num_processes=2, process_index=rank)
        return [i for batch in shard for i in batch]

    for epoch in (0, 1, 2):
        zero, one = share(0, epoch), share(1, epoch)
        assert share(0, epoch) == zero and not set(zero) & set(one) and sorted(zero + one) == list(range(40))
    assert share(0, 1) != share(0, 2)


def test_sampler_refuses_length_grouping_without_a_length_column(tmp_path, tiny_model_dir):
    import datasets
    from trl import SFTTrainer
    from transformers import AutoModelForImageTextToText

    from components.common.config import build_config
    from components.common.modeling import load_processor
    from components.common.training.resume import with_exact_resume
    from components.sft.config import SFTStepConfig
    from components.sft.core import training_arguments

    args = training_arguments(build_config(SFTStepConfig, {**TINY_TRAINING, "base_model": str(tiny_model_dir)}), str(tmp_path))
    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}] * 4)
    trainer = with_exact_resume(SFTTrainer)(model=AutoModelForImageTextToText.from_pretrained(tiny_model_dir), args=args,
                                            train_dataset=rows, data_collator=lambda r: r,
                                            processing_class=load_processor(str(tiny_model_dir)))
    with pytest.raises(ValueError, match="needs a 'length' column .* or set group_by_length=false"):
        trainer._get_train_sampler()


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


def test_dpo_resumes_in_process_and_local_checkpoints_go_once_published(tmp_path, prepared_preference, sft_model_dir, monkeypatch):
    """In process (as the pipeline's component runs it): resume from the newest complete checkpoint to the same
    weights; the trainer's local work folder never holds more than the checkpoint being published."""
    from components.common.config import build_config
    from components.common.training import checkpoints
    from components.dpo.config import DPOStepConfig
    from components.dpo.core import run

    local_checkpoints = []
    real_publish = checkpoints.publish_checkpoint

    def publish_and_count(local, *args, **kwargs):
        before = sorted(p.name for p in local.parent.glob("checkpoint-*"))
        target = real_publish(local, *args, **kwargs)
        local_checkpoints.append((before, sorted(p.name for p in local.parent.glob("checkpoint-*"))))
        return target

    monkeypatch.setattr(checkpoints, "publish_checkpoint", publish_and_count)
    config = build_config(DPOStepConfig, {**TINY_TRAINING, "max_steps": 7, "save_steps": 3, "learning_rate": 5e-2})
    full = run(config, str(prepared_preference), str(sft_model_dir), str(tmp_path / "full"), str(tmp_path / "ckpt-full"))
    assert full["metrics"]["resumed_from"] is None
    assert local_checkpoints == [([f"checkpoint-{s}"], []) for s in (3, 6, 7)]
    # A preempted run's checkpoint store: checkpoint-6 complete (4 steps an epoch: inside the second epoch),
    # checkpoint-7 half-written.
    for step in (6, 7):
        shutil.copytree(tmp_path / "ckpt-full" / f"checkpoint-{step}", tmp_path / "ckpt" / f"checkpoint-{step}")
    (tmp_path / "ckpt" / "checkpoint-7" / "COMPLETE").unlink()
    local_checkpoints.clear()
    resumed = run(config, str(prepared_preference), str(sft_model_dir), str(tmp_path / "resumed"), str(tmp_path / "ckpt"))
    assert resumed["metrics"]["resumed_from"] == "checkpoint-6"
    assert resumed["metrics"]["global_steps"] == full["metrics"]["global_steps"] == 7
    # The downloaded checkpoint-6 is rotated out (save_total_limit=1) when checkpoint-7 is written.
    assert local_checkpoints == [(["checkpoint-7"], [])]
    difference = max_abs_difference(adapter(tmp_path / "full"), adapter(tmp_path / "resumed"))
    assert difference == 0.0, f"max abs difference from the uninterrupted run: {difference}"
    assert resumed["metrics"]["train_loss"] == pytest.approx(full["metrics"]["train_loss"], rel=1e-9)
    assert (tmp_path / "ckpt" / "checkpoint-7" / "COMPLETE").exists()  # re-saved, marker last

    # A checkpoint written before run totals were saved: the weights still match; train_loss is then the mean of
    # the resumed steps only (what the Trainer reports), not a sum over the whole run divided by every step.
    from components.common.training.resume import RUN_TOTALS

    shutil.copytree(tmp_path / "ckpt-full" / "checkpoint-6", tmp_path / "ckpt-old" / "checkpoint-6")
    (tmp_path / "ckpt-old" / "checkpoint-6" / RUN_TOTALS).unlink()
    old = run(config, str(prepared_preference), str(sft_model_dir), str(tmp_path / "old"), str(tmp_path / "ckpt-old"))
    assert max_abs_difference(adapter(tmp_path / "full"), adapter(tmp_path / "old")) == 0.0
    step_7 = [h["loss"] for h in json.loads((tmp_path / "old" / "log_history.json").read_text()) if h.get("step") == 7 and "loss" in h]
    assert old["metrics"]["train_loss"] == pytest.approx(step_7[0], rel=1e-6)
    assert abs(old["metrics"]["train_loss"] - full["metrics"]["train_loss"]) > 1e-3


def test_two_processes_share_checkpoints_and_resume_exactly_past_an_epoch(tmp_path, prepared_sft, tiny_model_dir):
    """Data parallel on one node (torchrun, gloo on CPU, as docs/multi_gpu.md describes): one artifact, written
    by process 0; each checkpoint holds both processes' RNG states; a restart inside the second epoch (each
    process skipping its share of the epoch's first batches) resumes to the same weights."""
    output, checkpoints = tmp_path / "out", tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "pipelines.cli", "sft", "--dataset", str(prepared_sft), "--output", str(output),
               "--base-model", str(tiny_model_dir), "--checkpoint-uri", str(checkpoints)]
    settings = {**TINY_TRAINING, "max_steps": 14, "save_steps": 4, "per_device_train_batch_size": 2, "group_by_length": True}
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    env = {**child_env(None), "ACCELERATE_USE_CPU": "true"}  # CPU processes use the gloo backend
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["metrics"]["global_steps"] == 14
    history = json.loads((output / "log_history.json").read_text())
    # 14 steps x 2 rows x 2 processes = 56 rows of 40: 10 steps an epoch, so the processes split the data.
    assert history[-1]["epoch"] == pytest.approx(56 / manifest["metrics"]["train_rows"])
    assert first.stderr.count(f"checkpoint {checkpoints}/checkpoint-12 published") == 1  # process 0 only
    assert {p.name for p in (checkpoints / "checkpoint-12").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    expected = adapter(output)

    (checkpoints / "checkpoint-14" / "COMPLETE").unlink()  # as if preempted while uploading checkpoint-14
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((output / "manifest.json").read_text())["metrics"]
    assert (metrics["resumed_from"], metrics["steps_this_run"]) == ("checkpoint-12", 2)
    difference = max_abs_difference(adapter(output), expected)
    assert difference == 0.0, f"max abs difference from the uninterrupted run: {difference}"
    assert metrics["train_loss"] == pytest.approx(manifest["metrics"]["train_loss"], rel=1e-9)
    assert metrics["input_tokens_seen"] == manifest["metrics"]["input_tokens_seen"]


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
