"""The SFT component's multi-node branch: nodes > 1 launches one job through components.common.launch (here with a
fake engine that publishes a model) and publishes that job's manifest like an in-process run; without a launcher
it refuses before any work."""
from __future__ import annotations

import json
import types

import pytest

from components.common import artifacts
from components.common.launch import LaunchError
from components.common.launch.common import LAUNCH_ENV
from components.common.schema import MODEL_KIND
from components.sft.component import sft


class Metrics:
    def __init__(self, path):
        self.path, self.logged = str(path), {}

    def log_metric(self, key, value):
        self.logged[key] = value


def artifact(path):
    return types.SimpleNamespace(path=str(path), uri=str(path), metadata={})


def test_nodes_above_one_without_a_launcher_fail_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    model = artifact(tmp_path / "model")
    with pytest.raises(LaunchError, match=r"sft_config.nodes=2 needs a multi-node launcher.*or set sft_config.nodes=1"):
        sft(artifact(tmp_path / "missing-dataset"), "m", {"nodes": 2}, "", model, Metrics(tmp_path / "metrics"))
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.launch").exists()
    assert "vlmtune-step-failed: exit status 2:" in capsys.readouterr().err


def test_nodes_above_one_publish_the_launched_jobs_model(tmp_path, monkeypatch):
    import components.common.launch as launch

    monkeypatch.setenv(LAUNCH_ENV, json.dumps({"launcher": "kubeflow", "image": "img:1", "poll_seconds": 0.001}))
    monkeypatch.setattr(launch, "launch_problems", lambda *a: [])  # local folders stand in for gs:// URIs
    out = tmp_path / "model"
    sent = []

    class Job:
        name = "vlmtune-sft-1"

        def poll(self):
            out.mkdir()
            artifacts.write_manifest(str(out), {"kind": MODEL_KIND, "content_hash": "abc",
                                                "metrics": {"train_loss": 0.25, "note": "x"}})
            return "succeeded", None

        def cancel(self):
            raise AssertionError("a finished job is not cancelled")

        def new_log_lines(self):
            return iter(())

    monkeypatch.setattr(launch, "_submitters", lambda: {"kubeflow": lambda spec, s: sent.append(spec) or Job()})
    model, metrics = artifact(out), Metrics(tmp_path / "metrics.json")
    sft(artifact(tmp_path / "data"), "HuggingFaceTB/SmolVLM-256M-Instruct", {"nodes": 2, "gpus_per_node": 8},
        "", model, metrics)
    (spec,) = sent
    assert (spec.nodes, spec.gpus_per_node, spec.image) == (2, 8, "img:1")
    assert spec.command[spec.command.index("--dataset") + 1] == str(tmp_path / "data")
    assert model.metadata == {"stage": "sft", "base_model": "HuggingFaceTB/SmolVLM-256M-Instruct", "content_hash": "abc"}
    assert metrics.logged == {"train_loss": 0.25}
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"train_loss": 0.25, "note": "x"}
