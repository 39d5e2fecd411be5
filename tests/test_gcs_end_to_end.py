"""prepare-data -> sft -> evaluate -> register, each run as its CLI (as a step container runs it), with every
URI on the GCS emulator: the sources and the base model are uploaded to gs:// first, every output goes to
gs://. Asserts the outputs are complete (manifests), readable, linked by lineage, and that no step left a
local temp folder behind.

    pytest -m gcs tests/test_gcs_end_to_end.py
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gcs


def _vlmtune_temps() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("vlmtune-*")}


#: Known leak, reported to the lead: components.prepare_data.core.load_split downloads a gs:// dataset's Parquet
#: files into tempfile.mkdtemp(prefix="vlmtune-dataset-") and never removes it (once per sft/dpo/evaluate run).
KNOWN_LEAK = "vlmtune-dataset-"


def _run(argv: list[str]) -> None:
    from pipelines.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # step CLIs may sys.exit
        rc = e.code
    assert rc in (0, None), f"`vlmtune {' '.join(argv)}` exited {rc}"


def test_prepare_sft_evaluate_register_all_on_gs(gcs_bucket, tmp_path, monkeypatch):
    from components.common import artifacts, storage
    from components.common.demo_data import write_demo_data
    from components.common.tiny_model import build_tiny_model
    from components.register.registry import open_registry
    from pipelines.snapshots import should_train

    started = time.monotonic()
    # A private temp dir: what is left there is this test's, not a concurrent run's.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    # gs:// models are downloaded into a cache keyed by URI (components.common.modeling.resolve_model_ref), by
    # default under the temp dir and kept on purpose; name it, so what is left in the temp dir is a leak.
    model_cache = tmp_path / "model-cache"
    monkeypatch.setenv("VLMTUNE_CACHE", str(model_cache))
    root = f"gs://{gcs_bucket}"
    build_tiny_model(tmp_path / "model")
    write_demo_data(tmp_path / "data", rows=40, preference_rows=20)
    storage.upload_dir(tmp_path / "model", f"{root}/models/tiny")
    storage.upload_dir(tmp_path / "data", f"{root}/sources/demo")
    base, source = f"{root}/models/tiny", f"{root}/sources/demo/sft"
    dataset, sft_out, evaluation = f"{root}/run/dataset", f"{root}/run/sft", f"{root}/run/evaluation"
    registry, checkpoints = f"{root}/registry", f"{root}/checkpoints/run/sft"
    before = _vlmtune_temps()

    _run(["prepare-data", "--source", source, "--output", dataset, "--task", "sft", "--processor", base,
          "--num-workers", "0", "--no-progress"])
    _run(["sft", "--dataset", dataset, "--output", sft_out, "--base-model", base, "--checkpoint-uri", checkpoints,
          "--set", "max_steps=3", "--set", "per_device_train_batch_size=4", "--set", "cpu_threads=1",
          "--set", "learning_rate=1e-3", "--set", "save_steps=2"])
    # min_delta=-1: three steps on a random tiny model need not beat the base; the gate itself is tested elsewhere.
    _run(["evaluate", "--dataset", dataset, "--model", f"sft={sft_out}", "--output", evaluation, "--base-model", base,
          "--registry", registry, "--registry-name", "tiny", "--set", "max_rows=8", "--set", "cpu_threads=1",
          "--set", "min_delta=-1.0"])
    _run(["register", "--model", sft_out, "--evaluation", evaluation, "--registry", registry, "--name", "tiny",
          "--dataset", dataset])

    # Every artifact is complete (manifest written last) and readable from gs://.
    data_manifest = artifacts.read_manifest(dataset)
    model_manifest = artifacts.read_manifest(sft_out)
    eval_manifest = artifacts.read_manifest(evaluation)
    assert data_manifest["content_hash"] and data_manifest["splits"]["train"]["rows"] > 0
    for split in data_manifest["splits"].values():
        for name in split["files"]:
            assert storage.exists(storage.join(dataset, name)), name
    assert model_manifest["content_hash"]
    model_files = {u.rsplit("/", 1)[-1] for u in storage.list_files(sft_out)}
    assert {"manifest.json", "adapter_config.json"} <= model_files, model_files
    assert eval_manifest["passed"] is True
    assert storage.exists(f"{evaluation}/report.html") and storage.exists(f"{evaluation}/report.md")
    json.loads(storage.read_text(f"{evaluation}/manifest.json"))

    # The registry on gs:// has version 1 as champion, pointing at the gs:// model, with the dataset's fingerprint.
    champion = open_registry(registry).get("tiny", "champion")
    assert champion is not None and champion.version == 1
    assert champion.model_uri == sft_out
    assert champion.lineage["dataset_hash"] == data_manifest["content_hash"]
    # ...so a scheduled run on the very same data would skip training.
    assert should_train(data_manifest, champion.lineage)[0] is False

    assert list(model_cache.glob("*/.complete")), "the gs:// base model should come through the model cache"
    assert time.monotonic() - started < 90, "the gs:// end-to-end test should stay under 90 s"
    # Nothing local left behind by any step.
    leftover = _vlmtune_temps() - before
    if leftover and all(name.startswith(KNOWN_LEAK) for name in leftover):
        pytest.xfail(f"known leak in load_split (step core): {sorted(leftover)} left in {private_tmp}")
    assert leftover == set()
