"""Local registry (folder and gs:// on fake-gcs-server) and the register step core."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from components.common import artifacts, storage
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND
from components.common.registry import (
    ModelVersion,
    RegistryError,
    current_champion,
    open_registry,
    parse_reference,
    resolve_reference,
)
from components.common.registry.local import LocalRegistry
from components.register import core, model_card

REPO = Path(__file__).resolve().parents[1]


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


def test_make_champion_false_and_set_alias(tmp_path):
    reg = open_registry(str(tmp_path / "registry"))
    register(reg, "vlm", 1)
    v2 = register(reg, "vlm", 2, make_champion=False)
    assert v2.aliases == [] and reg.get("vlm", "champion").version == 1
    reg.set_alias("vlm", "champion", 2)
    reg.set_alias("vlm", "staging", 1)
    assert reg.get("vlm", "champion").version == 2
    assert reg.get("vlm", 1).aliases == ["staging"]
    with pytest.raises(RegistryError, match="no such version"):
        reg.set_alias("vlm", "champion", 9)
    with pytest.raises(RegistryError, match="'latest' is reserved"):
        reg.set_alias("vlm", "latest", 1)
    with pytest.raises(RegistryError, match="model name"):
        register(reg, "../escape", 4)


def test_a_crashed_run_between_record_and_index_is_repaired_not_duplicated(tmp_path):
    registry = str(tmp_path / "registry")
    reg = open_registry(registry)
    register(reg, "vlm", 1)
    storage.delete(str(tmp_path / "registry" / "vlm" / "by_hash" / f"{1:064x}.json"))
    assert register(reg, "vlm", 1).version == 1
    assert len(reg.list_versions("vlm")) == 1
    assert (tmp_path / "registry" / "vlm" / "by_hash" / f"{1:064x}.json").exists()


# ---- references ----------------------------------------------------------------------------------------------------
def test_references_resolve_to_model_uris(tmp_path, monkeypatch):
    registry = str(tmp_path / "registry")
    reg = open_registry(registry)
    register(reg, "vlm", 1)
    register(reg, "vlm", 2, make_champion=False)
    assert parse_reference(f"{registry}::vlm@champion") == (registry, "vlm", "champion")
    assert parse_reference("gs://b/reg::vlm@3") == ("gs://b/reg", "vlm", 3)
    assert resolve_reference(f"{registry}::vlm@champion") == "gs://models/run-1"
    assert resolve_reference(f"{registry}::vlm@2") == "gs://models/run-2"
    assert resolve_reference(f"{registry}::vlm@latest") == "gs://models/run-2"
    # not references: folders, gs:// URIs, hub ids
    for plain in ("/data/models/run-1", "gs://bucket/models/run-1", "HuggingFaceTB/SmolVLM-256M-Instruct", "./m"):
        assert resolve_reference(plain) is None
    monkeypatch.delenv("VLMTUNE_REGISTRY", raising=False)
    with pytest.raises(RegistryError, match="without a registry"):
        resolve_reference("vlm@1")
    monkeypatch.setenv("VLMTUNE_REGISTRY", registry)
    assert resolve_reference("vlm@1") == "gs://models/run-1"
    with pytest.raises(RegistryError, match="has no version 7"):
        resolve_reference("vlm@7")


def test_open_registry_dispatches_on_scheme(tmp_path):
    assert isinstance(open_registry(str(tmp_path)), LocalRegistry)
    assert isinstance(open_registry("gs://bucket/reg"), LocalRegistry)
    with pytest.raises(RegistryError, match="unknown registry scheme"):
        open_registry("s3://bucket/reg")
    with pytest.raises(RegistryError, match="vertex://projects/PROJECT/locations/LOCATION"):
        open_registry("vertex://my-project")


# ---- concurrency -----------------------------------------------------------------------------------------------------
_WORKER = """
import json, sys
from components.common.registry import open_registry
root, name, n, content_hash = sys.argv[1:5]
reg = open_registry(root)
v = reg.register(name, f"gs://models/run-{n}", content_hash=content_hash, metrics={}, lineage={}, card="c")
print(json.dumps({"n": int(n), "version": v.version}))
"""


def _race_processes(root: str, hashes: list[str]) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, root, "vlm", str(i), h], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, h in enumerate(hashes)]
    versions = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        versions.append(json.loads(out.strip().splitlines()[-1])["version"])
    return versions


def _race_threads(reg, hashes: list[str]) -> list[int]:
    barrier = threading.Barrier(len(hashes))
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def work(i: int, content_hash: str) -> None:
        try:
            barrier.wait()
            results[i] = register(reg, "vlm", i, content_hash=content_hash).version
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, h)) for i, h in enumerate(hashes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return [results[i] for i in range(len(hashes))]


@pytest.mark.gcs
def test_threads_racing_on_gcs_get_distinct_versions(gcs_bucket):
    reg = open_registry(f"gs://{gcs_bucket}/registry")
    versions = _race_threads(reg, [f"{i:064x}" for i in range(6)])
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    listed = reg.list_versions("vlm")
    assert sorted(v.version for v in listed) == [1, 2, 3, 4, 5, 6]
    assert len({v.content_hash for v in listed}) == 6
    assert reg.get("vlm", "champion").version in versions


@pytest.mark.gcs
def test_processes_racing_on_gcs_get_distinct_versions(gcs_bucket):
    root = f"gs://{gcs_bucket}/registry"
    versions = _race_processes(root, [f"{i + 100:064x}" for i in range(3)])
    assert sorted(versions) == [1, 2, 3]
    assert [v.version for v in open_registry(root).list_versions("vlm")] == [1, 2, 3]


@pytest.mark.gcs
def test_racing_registrations_of_one_artifact_on_gcs_give_one_version(gcs_bucket):
    reg = open_registry(f"gs://{gcs_bucket}/registry")
    versions = _race_threads(reg, ["ab" * 32] * 4)
    assert len(set(versions)) == 1
    assert [v.content_hash for v in reg.list_versions("vlm")] == ["ab" * 32]
    # and a later, sequential re-registration is a no-op
    assert register(reg, "vlm", 9, content_hash="ab" * 32).version == versions[0]
    assert len(reg.list_versions("vlm")) == 1


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


def test_processes_racing_on_a_local_folder_get_distinct_versions(tmp_path):
    root = str(tmp_path / "registry")
    versions = _race_processes(root, [f"{i + 200:064x}" for i in range(3)])
    assert sorted(versions) == [1, 2, 3]


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
    assert cli.registry_main(["show", "--registry", registry, "--name", "vlm", "--ref", "9"]) == 1
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


def test_threads_racing_on_a_local_folder_get_distinct_versions(tmp_path):
    reg = open_registry(str(tmp_path / "registry"))
    versions = _race_threads(reg, [f"{i + 300:064x}" for i in range(6)])
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    versions = _race_threads(reg, ["ef" * 32] * 4)
    assert len(set(versions)) == 1 and len(reg.list_versions("vlm")) == 7


def test_an_index_pointing_at_a_deleted_version_is_replaced(tmp_path):
    reg = open_registry(str(tmp_path / "registry"))
    register(reg, "vlm", 1)
    storage.delete(str(tmp_path / "registry" / "vlm" / "versions" / "000001" / "version.json"))
    again = register(reg, "vlm", 1)
    assert again.version == 2
    assert reg.find_by_hash("vlm", f"{1:064x}").version == 2


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
