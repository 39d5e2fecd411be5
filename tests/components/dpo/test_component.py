"""The DPO component's multi-node branch hands the job both inputs by URI (the dataset and the SFT model)."""
from __future__ import annotations

import json
import types

import pytest

from components.common.launch import LaunchError
from components.common.launch.common import LAUNCH_ENV
from components.dpo.component import dpo


def artifact(path):
    return types.SimpleNamespace(path=str(path), uri=str(path), metadata={})


def test_a_multi_node_dpo_needs_gs_uris_for_both_inputs_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(LAUNCH_ENV, json.dumps({"launcher": "vertex", "image": "img:1", "project": "p",
                                               "location": "us-central1", "machine_type": "g2-standard-96"}))
    metrics = types.SimpleNamespace(path=str(tmp_path / "metrics"), log_metric=lambda k, v: None)
    with pytest.raises(LaunchError) as e:
        dpo(artifact(tmp_path / "pref"), artifact("gs://b/sft/model"), {"nodes": 2, "base_model": "m"}, "gs://b/ckpt",
            artifact(tmp_path / "dpo"), metrics)
    text = str(e.value)
    assert f"--dataset is '{tmp_path / 'pref'}'" in text and f"--output is '{tmp_path / 'dpo'}'" in text
    assert "--sft-model" not in text and "--checkpoint-uri" not in text  # those are gs:// already
    assert not (tmp_path / "dpo.launch").exists()
