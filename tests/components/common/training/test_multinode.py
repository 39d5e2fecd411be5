"""Training on several nodes, on this machine: two torchrun launches (``--nnodes 2 --nproc_per_node 1``, a c10d
rendezvous on localhost, gloo) stand for two nodes, each with its own temporary folder (its own local disk).
Their adapter equals a one-node, two-process run with the same global batch (bit for bit: the same rows per
global rank, the same RNG states, and gloo's sum of two gradients is the same whichever rank adds), every
rank's RNG state reaches the published checkpoint, a resume with another number of processes is refused, and
a run whose node is killed resumes to the same adapter.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_models import TINY_TRAINING

REPO = Path(__file__).resolve().parents[4]
SETTINGS = {**TINY_TRAINING, "per_device_train_batch_size": 2, "group_by_length": True}
SLOW_STEPS = '''
import time
import transformers.trainer as _t
_original = _t.Trainer.training_step
def training_step(self, *args, **kwargs):
    time.sleep(0.5)
    return _original(self, *args, **kwargs)
_t.Trainer.training_step = training_step
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def sft_args(dataset: Path, model: Path, output: Path, checkpoints: Path, **settings) -> list[str]:
    args = ["-m", "pipelines.cli", "sft", "--dataset", str(dataset), "--output", str(output),
            "--base-model", str(model), "--checkpoint-uri", str(checkpoints)]
    for key, value in {**SETTINGS, **settings}.items():
        args += ["--set", f"{key}={value}"]
    return args


def env_for(tmp: Path, slow: Path | None = None) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "TMPDIR": str(tmp)}  # CPU processes use the gloo backend
    env["PYTHONPATH"] = os.pathsep.join([p for p in (str(slow) if slow else "", str(REPO), env.get("PYTHONPATH", "")) if p])
    return env


def one_node(args: list[str], tmp: Path, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args]
    return subprocess.run(command, cwd=REPO, env=env_for(tmp), capture_output=True, text=True, timeout=600)


def start_two_nodes(args: list[str], tmp: Path, slow: Path | None = None, rendezvous: str = "c10d") -> list[subprocess.Popen]:
    """Two torchrun agents, one per "node", each in its own session (so a node can be killed whole) and with its
    own TMPDIR (its own disk). ``c10d``: they meet at a c10d rendezvous on localhost, which assigns the node
    ranks; ``static``: ``--node_rank``/``--master_addr``/``--master_port``, what the Vertex AI launcher
    (``components/common/launch``) gives torchrun."""
    port = free_port()
    nodes = []
    for node in range(2):
        if rendezvous == "c10d":
            meet = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", f"test-{port}"]
        else:
            meet = ["--node_rank", str(node), "--master_addr", "localhost", "--master_port", str(port)]
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *meet,
                   "--max_restarts", "0", *args]
        log = open(tmp / f"node{node}.log", "w")
        nodes.append(subprocess.Popen(command, cwd=REPO, env=env_for(tmp / f"node{node}-tmp", slow), stdout=log,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return nodes


def wait_all(nodes: list[subprocess.Popen], tmp: Path, timeout: float = 600) -> list[str]:
    logs = []
    for i, node in enumerate(nodes):
        node.wait(timeout=timeout)
        logs.append((tmp / f"node{i}.log").read_text())
    return logs


def adapter(output: Path) -> dict:
    return load_file(output / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}: max abs difference " \
                          f"{float((a[different[0]].float() - b[different[0]].float()).abs().max())}"


def rng_files(checkpoint: Path) -> set[str]:
    return {p.name for p in checkpoint.glob("rng_state*")}


@pytest.mark.parametrize("rendezvous", ["c10d", pytest.param("static", marks=pytest.mark.slow)])
def test_two_nodes_train_the_adapter_of_one_node_with_two_processes(tmp_path, prepared_sft, tiny_model_dir, rendezvous):
    """Default tier (c10d): 4 steps, a checkpoint every 2. Global batch 2 rows x 2 processes either way."""
    reference = one_node(sft_args(prepared_sft, tiny_model_dir, tmp_path / "ref", tmp_path / "ref-ckpt",
                                  max_steps=4, save_steps=2), tmp_path / "ref-tmp")
    assert reference.returncode == 0, reference.stderr[-3000:]

    nodes = start_two_nodes(sft_args(prepared_sft, tiny_model_dir, tmp_path / "out", tmp_path / "ckpt",
                                     max_steps=4, save_steps=2), tmp_path, rendezvous=rendezvous)
    logs = wait_all(nodes, tmp_path)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert_same_adapter(adapter(tmp_path / "out"), adapter(tmp_path / "ref"))
    # Each node saved its own rank's RNG state on its own disk; both reached the published checkpoint, which
    # global rank 0 alone published (one "published" line over both nodes).
    for step in (2, 4):
        assert rng_files(tmp_path / "ckpt" / f"checkpoint-{step}") == {"rng_state_0.pth", "rng_state_1.pth"}
        assert (tmp_path / "ckpt" / f"checkpoint-{step}" / "COMPLETE").exists()
    assert sum(log.count(f"checkpoint-4 published") for log in logs) == 1
    # Nothing is left in either node's work folder, and every node's TMPDIR got its own (no sharing).
    for node in range(2):
        assert not list((tmp_path / f"node{node}-tmp").glob("vlmtune-sft-*")), f"node {node} left its work folder"
    totals = json.loads((tmp_path / "ckpt" / "checkpoint-4" / "vlmtune_run_totals.json").read_text())
    assert (totals["nodes"], totals["processes_per_node"], totals["world_size"]) == (2, 1, 2)

    # Another number of processes: refused, naming both counts and the fix; nothing trained.
    (tmp_path / "ckpt" / "checkpoint-4" / "COMPLETE").unlink()
    single = subprocess.run([sys.executable, *sft_args(prepared_sft, tiny_model_dir, tmp_path / "single",
                                                       tmp_path / "ckpt", max_steps=4, save_steps=2)],
                            cwd=REPO, env=env_for(tmp_path / "single-tmp"), capture_output=True, text=True, timeout=600)
    assert single.returncode == 2, single.stderr[-3000:]
    assert "checkpoint-2 was saved by 2 process(es) (2 node(s) x 1 process(es)); this run has 1" in single.stderr
    assert "Restart with 2 processes in all" in single.stderr and "--checkpoint-uri" in single.stderr
    assert not (tmp_path / "single" / "manifest.json").exists()



def test_resume_is_refused_for_another_world_size_and_names_both_layouts(tmp_path):
    from components.common.training.resume import check_same_world_size

    (tmp_path / "checkpoint-6").mkdir()
    check_same_world_size(tmp_path / "checkpoint-6", {"world_size": 2, "nodes": 2, "processes_per_node": 1}, 2)
    with pytest.raises(ValueError) as refused:
        check_same_world_size(tmp_path / "checkpoint-6", {"world_size": 4, "nodes": 2, "processes_per_node": 2}, 2)
    message = str(refused.value)
    assert "checkpoint-6 was saved by 4 process(es) (2 node(s) x 2 process(es)); this run has 2" in message
    assert "Restart with 4 processes in all" in message and "another --checkpoint-uri" in message
    # A checkpoint saved before the topology was recorded: its RNG files count the processes.
    for rank in range(2):
        (tmp_path / "checkpoint-6" / f"rng_state_{rank}.pth").write_bytes(b"")
    check_same_world_size(tmp_path / "checkpoint-6", {}, 2)
    with pytest.raises(ValueError, match="saved by 2 process"):
        check_same_world_size(tmp_path / "checkpoint-6", {}, 1)


@pytest.mark.slow
def test_two_nodes_resume_after_one_node_is_killed(tmp_path, prepared_sft, tiny_model_dir):
    """12 steps, a checkpoint every 4 (an epoch is 10 steps of 2 x 2 rows, so the resume is inside the second
    epoch). One node is killed whole (SIGKILL to its torchrun and worker) after checkpoint-4 is published; the
    other node's torchrun fails on its own; both are started again and end with the uninterrupted adapter. Then
    the same checkpoints resume on one node with two processes (the same world size), again exactly."""

    args = dict(max_steps=12, save_steps=4)
    reference = one_node(sft_args(prepared_sft, tiny_model_dir, tmp_path / "ref", tmp_path / "ref-ckpt", **args),
                         tmp_path / "ref-tmp")
    assert reference.returncode == 0, reference.stderr[-3000:]

    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_STEPS)
    command = sft_args(prepared_sft, tiny_model_dir, tmp_path / "out", tmp_path / "ckpt", **args)
    first = tmp_path / "first"
    first.mkdir()
    nodes = start_two_nodes(command, first, slow)
    deadline = time.time() + 300
    while not (tmp_path / "ckpt" / "checkpoint-4" / "COMPLETE").exists():
        assert time.time() < deadline and all(n.poll() is None for n in nodes), \
            "\n".join((first / f"node{i}.log").read_text()[-2000:] for i in range(2))
        time.sleep(0.2)
    os.killpg(nodes[1].pid, signal.SIGKILL)
    nodes[1].wait(timeout=30)
    survivor = nodes[0].wait(timeout=300)  # fails by itself: its peer is gone
    assert survivor != 0
    assert not (tmp_path / "out" / "manifest.json").exists()
    published = sorted(int(p.parent.name.split("-")[1]) for p in (tmp_path / "ckpt").glob("checkpoint-*/COMPLETE"))
    assert published and published[-1] < 12
    assert rng_files(tmp_path / "ckpt" / f"checkpoint-{published[-1]}") == {"rng_state_0.pth", "rng_state_1.pth"}

    again = tmp_path / "again"
    again.mkdir()
    nodes = start_two_nodes(command, again)
    logs = wait_all(nodes, again)
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    metrics = json.loads((tmp_path / "out" / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from"] == f"checkpoint-{published[-1]}" and metrics["global_steps"] == 12
    assert_same_adapter(adapter(tmp_path / "out"), adapter(tmp_path / "ref"))
    ref_metrics = json.loads((tmp_path / "ref" / "manifest.json").read_text())["metrics"]
    assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"], rel=1e-9)

    # Another node layout, the same world size: 1 node x 2 processes resumes the 2-node checkpoint-8 exactly.
    (tmp_path / "ckpt" / "checkpoint-12" / "COMPLETE").unlink()
    resumed = one_node(sft_args(prepared_sft, tiny_model_dir, tmp_path / "resumed", tmp_path / "ckpt", **args),
                       tmp_path / "resumed-tmp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((tmp_path / "resumed" / "manifest.json").read_text())["metrics"]
    assert (metrics["resumed_from"], metrics["steps_this_run"]) == ("checkpoint-8", 4)
    assert_same_adapter(adapter(tmp_path / "resumed"), adapter(tmp_path / "ref"))


BATCH_LOG = '''
import os
from components.common.training import collator as _c
_original = _c.VisionSFTCollator.__call__
def __call__(self, rows):
    with open(os.environ["VLMTUNE_TEST_BATCH_LOG"], "a") as f:
        f.write(f"{os.environ['RANK']} {sum(1 for r in rows if r.get('images'))}\\n")
    return _original(self, rows)
_c.VisionSFTCollator.__call__ = __call__
'''
FIND_UNUSED_OFF = '''
import transformers.training_args as _ta
_original = _ta.TrainingArguments.__post_init__
def __post_init__(self):
    self.ddp_find_unused_parameters = False  # what transformers picks for a plain model with activation checkpointing
    _original(self)
_ta.TrainingArguments.__post_init__ = __post_init__
'''


def text_only_every_other_row(prepared: Path, out: Path) -> Path:
    """A copy of a prepared SFT dataset whose even train rows have no image (no image part in the user turn, an
    empty ``images`` list): the layout ``common/schema.py`` allows. (prepare-data refuses such source rows as
    ``missing_image`` today; the copy's manifest keeps the source's content_hash, which training only reports.)"""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(prepared, out)
    for shard in sorted((out / "train").glob("*.parquet")):
        table = pq.read_table(shard)
        rows = table.to_pylist()
        for i, row in enumerate(rows):
            if i % 2 == 0:
                row["images"] = []
                for message in row["messages"]:
                    message["content"] = [part for part in message["content"] if part["type"] != "image"]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)
    return out


def mixed_run(tmp_path: Path, dataset: Path, model: Path, name: str, patch: str) -> tuple[subprocess.CompletedProcess, list[tuple[int, int]]]:
    patches = tmp_path / f"{name}-patches"
    patches.mkdir()
    (patches / "sitecustomize.py").write_text(patch)
    env = {**env_for(tmp_path / f"{name}-tmp", patches), "VLMTUNE_TEST_BATCH_LOG": str(tmp_path / f"{name}-batches.log")}
    args = sft_args(dataset, model, tmp_path / name, tmp_path / f"{name}-ckpt", max_steps=8, save_steps=100)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # A hang is the failure this guards against: the timeout turns it into a test failure.
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = tmp_path / f"{name}-batches.log"
    batches = [tuple(int(x) for x in line.split()) for line in log.read_text().splitlines()] if log.exists() else []
    return done, batches


def test_ranks_whose_batch_has_no_image_do_not_hang_or_fail(tmp_path, prepared_sft, tiny_model_dir):
    """Two processes (gloo) on a half text-only dataset, 2 rows per process and step, length-grouped (text-only
    rows are short, so they batch together): some steps give one rank only text while the other has images. The
    vision connector (trained in full, ``modules_to_save``) then gets a gradient on one rank only; with
    unused-parameter detection DDP still all-reduces it (a zero from the text-only rank) and the run ends."""
    mixed = text_only_every_other_row(prepared_sft, tmp_path / "mixed")
    done, batches = mixed_run(tmp_path, mixed, tiny_model_dir, "out", BATCH_LOG)
    assert done.returncode == 0, done.stderr[-3000:]
    # The batches of each step, in order per rank (no gradient accumulation: one batch per rank and step).
    per_rank = {rank: [n for r, n in batches if r == rank] for rank in (0, 1)}
    steps = list(zip(per_rank[0], per_rank[1]))[:8]
    assert any((a == 0) != (b == 0) for a, b in steps), f"no step mixed a text-only rank with an image rank: {steps}"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["global_steps"] == 8

    # The control: the same run with detection off (transformers' choice for a plain model with activation
    # checkpointing) fails on the first step a rank had no image, which is what the setting prevents.
    control, _ = mixed_run(tmp_path, mixed, tiny_model_dir, "control", FIND_UNUSED_OFF)
    assert control.returncode != 0
    assert "Expected to have finished reduction in the prior iteration" in control.stderr


def test_training_arguments_ask_ddp_to_find_unused_parameters(tiny_model_dir):
    from components.common.config import build_config
    from components.common.training.arguments import common_training_arguments
    from components.sft.config import SFTStepConfig

    config = build_config(SFTStepConfig, {"base_model": str(tiny_model_dir), "gradient_checkpointing": "true"})
    assert common_training_arguments(config, "/tmp/x", None)["ddp_find_unused_parameters"] is True
