"""The register step core on the local registry (folder and gs:// on fake-gcs-server): the gate, lineage, the
model card, idempotent registration, champion promotion, and the CLI.

Run: pytest tests/components/register -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.common import artifacts, storage
from components.common.registry import (
    ModelVersion,
    RegistryError,
    current_champion,
    open_registry,
    resolve_reference,
)
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND
from components.register import core, model_card


def make_model(folder: Path, weights: bytes, *, with_hash: bool = True) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text('{"r": 16}')
    manifest = {"kind": MODEL_KIND, "base_model": "HuggingFaceTB/SmolVLM-256M-Instruct",
                "config": {"lr": 5e-3, "epochs": 2}}
    if with_hash:
        manifest["content_hash"] = artifacts.hash_files(
            [str(folder / "adapter_config.json"), str(folder / "adapter_model.safetensors")])
    artifacts.write_manifest(str(folder), manifest)
    return str(folder)


def make_eval(folder: Path, passed: bool, score: float = 0.8) -> str:
    folder.mkdir(parents=True)
    artifacts.write_manifest(str(folder), {"kind": EVAL_KIND, "passed": passed, "primary_metric": "vqa",
                                           "metrics": {"vqa": score, "anls": 0.7},
                                           "reasons": [] if passed else ["candidate 0.41 < base 0.45 + 0.01"]})
    return str(folder)


def make_dataset(folder: Path) -> str:
    folder.mkdir(parents=True)
    artifacts.write_manifest(str(folder), {"kind": DATASET_KIND, "content_hash": "d" * 64})
    return str(folder)


def register(reg, name: str, n: int, *, content_hash: str | None = None, make_champion: bool = True) -> ModelVersion:
    return reg.register(name, f"gs://models/run-{n}", content_hash=content_hash or f"{n:064x}", metrics={"vqa": n / 10},
                        lineage={"run": n}, card=f"card {n}", make_champion=make_champion)


# ---- register step core on a local folder ------------------------------------------------------------------------
def test_run_registers_versions_moves_champion_and_writes_card(tmp_path):
    registry = str(tmp_path / "registry")
    data = make_dataset(tmp_path / "data")
    m1, m2 = make_model(tmp_path / "m1", b"one"), make_model(tmp_path / "m2", b"two")
    e1, e2 = make_eval(tmp_path / "e1", True, 0.6), make_eval(tmp_path / "e2", True, 0.7)

    r1 = core.run(m1, e1, registry, "chart-vlm", dataset_uri=data)
    assert r1 == {"name": "chart-vlm", "version": 1, "model_uri": m1, "champion": True, "already_registered": False}
    r2 = core.run(m2, e2, registry, "chart-vlm", dataset_uri=data)
    assert r2["version"] == 2 and r2["champion"] and not r2["already_registered"]

    reg = open_registry(registry)
    assert [(v.version, v.aliases) for v in reg.list_versions("chart-vlm")] == [(1, []), (2, ["champion"])]
    assert reg.get("chart-vlm", "champion").version == 2
    assert reg.get("chart-vlm", "latest").version == 2
    assert reg.get("chart-vlm", 1).model_uri == m1
    assert reg.get("chart-vlm", "1").metrics == {"vqa": 0.6, "anls": 0.7}
    assert reg.get("chart-vlm", 3) is None and reg.get("chart-vlm", "staging") is None
    assert current_champion(registry, "chart-vlm").model_uri == m2
    assert current_champion(registry, "other-model") is None

    v2 = reg.get("chart-vlm", 2)
    assert v2.lineage["base_model"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert v2.lineage["dataset_hash"] == "d" * 64 and v2.lineage["evaluation_uri"] == e2
    front = model_card.read_front_matter(storage.read_text(v2.card_uri))
    assert front["base_model"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert front["datasets"] == [data]
    assert front["metrics"] == {"vqa": 0.7, "anls": 0.7}
    assert front["config"] == {"lr": 5e-3, "epochs": 2}
    assert front["lineage"]["content_hash"] == v2.content_hash and "intended_use" in front
    # the model stays where it is: the registry holds records and cards only
    files = sorted(Path(p).relative_to(registry).as_posix() for p in storage.list_files(registry))
    assert not [f for f in files if "safetensors" in f]
    assert "chart-vlm/versions/000002/version.json" in files and "chart-vlm/aliases/champion.json" in files


def test_run_is_idempotent_on_content_hash(tmp_path):
    registry = str(tmp_path / "registry")
    model = make_model(tmp_path / "m", b"weights")
    first = core.run(model, make_eval(tmp_path / "e1", True), registry, "vlm")
    # the same artifact copied elsewhere (same content) and evaluated again: still the same version
    copy = make_model(tmp_path / "copy", b"weights")
    again = core.run(copy, make_eval(tmp_path / "e2", True), registry, "vlm")
    assert first["version"] == again["version"] == 1
    assert again["already_registered"] and again["model_uri"] == model
    assert len(open_registry(registry).list_versions("vlm")) == 1


def test_run_computes_content_hash_when_manifest_has_none(tmp_path):
    registry = str(tmp_path / "registry")
    model = make_model(tmp_path / "m", b"w", with_hash=False)
    core.run(model, make_eval(tmp_path / "e", True), registry, "vlm")
    expected = artifacts.hash_files(sorted(str(p) for p in Path(model).iterdir() if p.name != "manifest.json"))
    assert open_registry(registry).get("vlm", 1).content_hash == expected


def test_run_refuses_failed_evaluation_and_leaves_registry_untouched(tmp_path):
    registry = str(tmp_path / "registry")
    core.run(make_model(tmp_path / "good", b"good"), make_eval(tmp_path / "e-good", True), registry, "vlm")
    with pytest.raises(core.EvaluationFailedError, match="did not pass the gate.*candidate 0.41"):
        core.run(make_model(tmp_path / "bad", b"bad"), make_eval(tmp_path / "e-bad", False), registry, "vlm")
    reg = open_registry(registry)
    assert [v.version for v in reg.list_versions("vlm")] == [1]
    assert reg.get("vlm", "champion").version == 1


def test_run_refuses_incomplete_or_wrong_artifacts(tmp_path):
    registry = str(tmp_path / "registry")
    (tmp_path / "half").mkdir()
    with pytest.raises(artifacts.IncompleteArtifactError, match="no manifest.json"):
        core.run(str(tmp_path / "half"), make_eval(tmp_path / "e", True), registry, "vlm")
    model = make_model(tmp_path / "m", b"w")
    with pytest.raises(artifacts.IncompleteArtifactError, match="'vlmtune.evaluation' artifact was expected"):
        core.run(model, model, registry, "vlm")


def test_champion_moves_only_after_a_complete_registration(tmp_path, monkeypatch):
    registry = str(tmp_path / "registry")
    reg = open_registry(registry)
    register(reg, "vlm", 1)
    real_write = storage.write_bytes

    def crash_on_record(uri, data):
        if uri.endswith("version.json"):
            raise OSError("disk full")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_record)
    with pytest.raises(OSError, match="disk full"):
        register(reg, "vlm", 2)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    assert reg.get("vlm", "champion").version == 1
    assert [v.version for v in reg.list_versions("vlm")] == [1]  # the crashed claim is not a version
    assert register(reg, "vlm", 3).version == 3  # its number is never reused
    assert reg.get("vlm", "champion").version == 3


@pytest.mark.gcs
def test_gcs_registry_end_to_end_through_core(gcs_bucket, tmp_path):
    root = f"gs://{gcs_bucket}/registry"
    result = core.run(make_model(tmp_path / "m", b"w"), make_eval(tmp_path / "e", True), root, "vlm")
    assert result["version"] == 1 and result["champion"]
    assert storage.exists(f"{root}/vlm/versions/000001/version.json")
    assert storage.exists(f"{root}/vlm/versions/000001/README.md")
    assert resolve_reference(f"{root}::vlm@champion") == result["model_uri"]
    assert current_champion(root, "never-registered") is None
    assert open_registry(root).get("vlm", "staging") is None and open_registry(root).get("vlm", 2) is None


# ---- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_register_list_show_promote(tmp_path, capsys):
    from components.register import cli

    registry = str(tmp_path / "registry")
    m1 = make_model(tmp_path / "m1", b"one")
    assert cli.main(["--model", m1, "--evaluation", make_eval(tmp_path / "e1", True), "--registry", registry,
                     "--name", "vlm"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert cli.main(["--model", make_model(tmp_path / "m2", b"two"), "--evaluation",
                     make_eval(tmp_path / "e2", True), "--registry", registry, "--name", "vlm", "--no-champion"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "vlm", "version": 2, "model_uri": str(tmp_path / "m2"),
                                                   "champion": False, "already_registered": False}
    assert cli.main(["--model", make_model(tmp_path / "m3", b"three"), "--evaluation",
                     make_eval(tmp_path / "e3", False), "--registry", registry, "--name", "vlm"]) == 2
    assert "did not pass the gate" in capsys.readouterr().err

    assert cli.registry_main(["list", "--registry", registry, "--name", "vlm"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == [1, 2]
    assert cli.registry_main(["show", "--registry", registry, "--name", "vlm"]) == 0
    assert json.loads(capsys.readouterr().out)["model_uri"] == m1
    assert cli.registry_main(["promote", "--registry", registry, "--name", "vlm", "--version", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == ["champion"]
    assert cli.registry_main(["show", "--registry", registry, "--name", "vlm", "--ref", "9"]) == 2  # bad input: exit 2
    assert "no version '9'" in capsys.readouterr().err


def test_run_refuses_a_model_other_than_the_evaluated_candidate(tmp_path):
    registry = str(tmp_path / "registry")
    judged = make_model(tmp_path / "judged", b"judged")
    other = make_model(tmp_path / "other", b"other")
    copy = make_model(tmp_path / "copy", b"judged")
    evaluation = make_eval(tmp_path / "e", True)
    manifest = artifacts.read_manifest(evaluation)
    artifacts.write_manifest(evaluation, {**manifest, "candidate_uri": judged})
    with pytest.raises(RegistryError, match="judged the model at"):
        core.run(other, evaluation, registry, "vlm")
    assert core.run(copy, evaluation, registry, "vlm")["version"] == 1  # same content elsewhere is fine
    assert core.run(judged, evaluation, registry, "vlm")["already_registered"]


@pytest.mark.gcs
def test_kfp_on_vertex_gcs_fuse_paths_are_registered_as_gs_uris(gcs_bucket, tmp_path):
    # KFP on Vertex gives components /gcs/BUCKET/... for gs://BUCKET/...; the record must hold the gs:// URI.
    model_local = make_model(tmp_path / "m", b"w")
    storage.upload_dir(model_local, f"gs://{gcs_bucket}/runs/1/model")
    evaluation_local = make_eval(tmp_path / "e", True)
    storage.upload_dir(evaluation_local, f"gs://{gcs_bucket}/runs/1/eval")
    result = core.run(f"/gcs/{gcs_bucket}/runs/1/model", f"/gcs/{gcs_bucket}/runs/1/eval",
                      f"gs://{gcs_bucket}/registry", "vlm")
    assert result["model_uri"] == f"gs://{gcs_bucket}/runs/1/model"
    version = open_registry(f"gs://{gcs_bucket}/registry").get("vlm", "champion")
    assert version.lineage["evaluation_uri"] == f"gs://{gcs_bucket}/runs/1/eval"


def test_registry_commands_run_from_the_vlmtune_cli(tmp_path, capsys):
    from pipelines.cli import main

    reg = open_registry(str(tmp_path / "registry"))
    register(reg, "vlm", 1)
    assert main(["registry", "show", "--registry", str(tmp_path / "registry"), "--name", "vlm"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
