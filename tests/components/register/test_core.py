"""The register step core on the local registry (folder and gs:// on fake-gcs-server): the gate, lineage, the
model card, the registry's own copy, idempotent registration, compare-and-set champion promotion (stale
evaluations, racing registrations), and the CLI.

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
    registry_identity,
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


def make_eval(folder: Path, passed: bool, score: float = 0.8, *, champion: ModelVersion | None = None,
              registry: str | None = None, name: str = "vlm") -> str:
    """An evaluation manifest as evaluate writes it: ``champion`` is the version it compared with (None: none),
    ``registry`` the registry it read that from (None: no registry given)."""
    folder.mkdir(parents=True)
    artifacts.write_manifest(str(folder), {
        "kind": EVAL_KIND, "passed": passed, "primary_metric": "vqa", "metrics": {"vqa": score, "anls": 0.7},
        "reasons": [] if passed else ["candidate 0.41 < base 0.45 + 0.01"],
        "champion": ({"version": champion.version, "model_uri": champion.model_uri,
                      "content_hash": champion.content_hash} if champion else None),
        "champion_registry": {"registry": registry_identity(registry), "name": name} if registry else None,
    })
    return str(folder)


def make_dataset(folder: Path) -> str:
    folder.mkdir(parents=True)
    artifacts.write_manifest(str(folder), {"kind": DATASET_KIND, "content_hash": "d" * 64})
    return str(folder)


def register(reg, name: str, n: int, *, content_hash: str | None = None, make_champion: bool = True,
             folder: Path) -> ModelVersion:
    source = folder / f"run-{n}"
    if not source.exists():
        make_model(source, f"weights {n}".encode())
    return reg.register(name, str(source), content_hash=content_hash or f"{n:064x}", metrics={"vqa": n / 10},
                        lineage={"run": n}, card=f"card {n}", make_champion=make_champion)


def copy_of(registry: str, name: str, version: int) -> str:
    return storage.join(registry, name, "versions", f"{version:06d}", "model")


# ---- register step core on a local folder ------------------------------------------------------------------------
def test_run_registers_versions_moves_champion_and_writes_card(tmp_path):
    registry = str(tmp_path / "registry")
    data = make_dataset(tmp_path / "data")
    m1, m2 = make_model(tmp_path / "m1", b"one"), make_model(tmp_path / "m2", b"two")
    e1 = make_eval(tmp_path / "e1", True, 0.6)

    r1 = core.run(m1, e1, registry, "chart-vlm", dataset_uri=data)
    # model_uri is the registry's copy (changed on purpose: it used to be the registered folder itself)
    assert r1 == {"name": "chart-vlm", "version": 1, "model_uri": copy_of(registry, "chart-vlm", 1), "source_uri": m1,
                  "champion": True, "already_registered": False, "champion_version": 1, "evaluated_against": None,
                  "reason": None}
    # e2 compared m2 with the champion registered just now (version 1), so m2 takes its place
    e2 = make_eval(tmp_path / "e2", True, 0.7, champion=open_registry(registry).get("chart-vlm", 1),
                   registry=registry, name="chart-vlm")
    r2 = core.run(m2, e2, registry, "chart-vlm", dataset_uri=data)
    assert r2["version"] == 2 and r2["champion"] and not r2["already_registered"] and r2["evaluated_against"] == 1

    reg = open_registry(registry)
    assert [(v.version, v.aliases) for v in reg.list_versions("chart-vlm")] == [(1, []), (2, ["champion"])]
    assert reg.get("chart-vlm", "champion").version == 2
    assert reg.get("chart-vlm", "latest").version == 2
    assert reg.get("chart-vlm", 1).model_uri == copy_of(registry, "chart-vlm", 1)
    assert reg.get("chart-vlm", 1).source_uri == m1
    assert reg.get("chart-vlm", "1").metrics == {"vqa": 0.6, "anls": 0.7}
    assert reg.get("chart-vlm", 3) is None and reg.get("chart-vlm", "staging") is None
    assert current_champion(registry, "chart-vlm").model_uri == copy_of(registry, "chart-vlm", 2)
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
    # the registry keeps its own copy of each model (changed on purpose: it used to hold records and cards only),
    # and the champion's moves as a log of create-only entries (it used to be one overwritten aliases/champion.json)
    files = sorted(Path(p).relative_to(registry).as_posix() for p in storage.list_files(registry))
    assert [f for f in files if "safetensors" in f] == [f"chart-vlm/versions/00000{n}/model/adapter_model.safetensors"
                                                        for n in (1, 2)]
    assert Path(copy_of(registry, "chart-vlm", 2), "adapter_model.safetensors").read_bytes() == b"two"
    assert "chart-vlm/versions/000002/version.json" in files
    assert [f for f in files if "/aliases/" in f] == ["chart-vlm/aliases/champion/000001.json",
                                                      "chart-vlm/aliases/champion/000002.json"]


def test_run_is_idempotent_on_content_hash(tmp_path):
    registry = str(tmp_path / "registry")
    model = make_model(tmp_path / "m", b"weights")
    first = core.run(model, make_eval(tmp_path / "e1", True), registry, "vlm")
    # the same artifact copied elsewhere (same content) and evaluated again: still the same version
    copy = make_model(tmp_path / "copy", b"weights")
    again = core.run(copy, make_eval(tmp_path / "e2", True), registry, "vlm")
    assert first["version"] == again["version"] == 1
    assert again["already_registered"] and again["model_uri"] == first["model_uri"] == copy_of(registry, "vlm", 1)
    assert len(open_registry(registry).list_versions("vlm")) == 1
    assert len([f for f in storage.list_files(registry) if f.endswith(".safetensors")]) == 1  # copied once


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
    register(reg, "vlm", 1, folder=tmp_path)
    real_write = storage.write_bytes

    def crash_on_record(uri, data):
        if uri.endswith("version.json"):
            raise OSError("disk full")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_record)
    with pytest.raises(OSError, match="disk full"):
        register(reg, "vlm", 2, folder=tmp_path)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    assert reg.get("vlm", "champion").version == 1
    assert [v.version for v in reg.list_versions("vlm")] == [1]  # the crashed claim is not a version
    assert register(reg, "vlm", 3, folder=tmp_path).version == 3  # its number is never reused
    assert reg.get("vlm", "champion").version == 3


@pytest.mark.gcs
def test_gcs_registry_end_to_end_through_core(gcs_bucket, tmp_path):
    root = f"gs://{gcs_bucket}/registry"
    result = core.run(make_model(tmp_path / "m", b"w"), make_eval(tmp_path / "e", True), root, "vlm")
    assert result["version"] == 1 and result["champion"]
    assert storage.exists(f"{root}/vlm/versions/000001/version.json")
    assert storage.exists(f"{root}/vlm/versions/000001/README.md")
    assert result["model_uri"] == f"{root}/vlm/versions/000001/model"
    assert storage.read_bytes(f"{root}/vlm/versions/000001/model/adapter_model.safetensors") == b"w"
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
    assert json.loads(capsys.readouterr().out) == {
        "name": "vlm", "version": 2, "model_uri": copy_of(registry, "vlm", 2), "source_uri": str(tmp_path / "m2"),
        "champion": False, "already_registered": False, "champion_version": 1, "evaluated_against": None,
        "reason": None}
    assert cli.main(["--model", make_model(tmp_path / "m3", b"three"), "--evaluation",
                     make_eval(tmp_path / "e3", False), "--registry", registry, "--name", "vlm"]) == 2
    assert "did not pass the gate" in capsys.readouterr().err

    assert cli.registry_main(["list", "--registry", registry, "--name", "vlm"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == [1, 2]
    assert cli.registry_main(["show", "--registry", registry, "--name", "vlm"]) == 0
    assert json.loads(capsys.readouterr().out)["source_uri"] == m1
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
    assert result["source_uri"] == f"gs://{gcs_bucket}/runs/1/model"
    assert result["model_uri"] == f"gs://{gcs_bucket}/registry/vlm/versions/000001/model"
    version = open_registry(f"gs://{gcs_bucket}/registry").get("vlm", "champion")
    assert version.lineage["evaluation_uri"] == f"gs://{gcs_bucket}/runs/1/eval"


def test_registry_commands_run_from_the_vlmtune_cli(tmp_path, capsys):
    from pipelines.cli import main

    reg = open_registry(str(tmp_path / "registry"))
    register(reg, "vlm", 1, folder=tmp_path)
    assert main(["registry", "show", "--registry", str(tmp_path / "registry"), "--name", "vlm"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1


# ---- compare-and-set: a stale evaluation never dethrones a champion it was not compared with --------------------
def test_a_stale_evaluation_registers_without_dethroning_the_better_champion(tmp_path, capsys):
    """The issue's case: a model evaluated against an empty registry (0.046) is registered after a better one
    (0.492) became champion. It is registered, not promoted, and the message names both champions."""
    from components.register import cli

    registry = str(tmp_path / "registry")
    weak, strong = make_model(tmp_path / "weak", b"weak"), make_model(tmp_path / "strong", b"strong")
    weak_eval = make_eval(tmp_path / "weak-eval", True, 0.046, registry=registry)  # registry empty then
    strong_eval = make_eval(tmp_path / "strong-eval", True, 0.492, registry=registry)  # empty too
    assert core.run(strong, strong_eval, registry, "vlm")["champion"]

    capsys.readouterr()
    rc = cli.main(["--model", weak, "--evaluation", weak_eval, "--registry", registry, "--name", "vlm"])
    out, err = capsys.readouterr()
    assert rc == core.EXIT_NOT_PROMOTED == 4
    result = json.loads(out)
    assert (result["version"], result["champion"], result["champion_version"], result["evaluated_against"]) == (
        2, False, 1, None)
    assert result["reason"] in err
    first_line = err.splitlines()[0]
    assert first_line.startswith("vlmtune register: registered 'vlm' version 2 without making it champion: its "
                                 f"evaluation ({weak_eval}) compared it with no champion, but the champion is now "
                                 f"version 1 ({copy_of(registry, 'vlm', 1)})")
    assert f"vlmtune registry promote --registry {registry} --name vlm --version 2" in err
    reg = open_registry(registry)
    assert reg.get("vlm", "champion").version == 1 and reg.get("vlm", 2).metrics["vqa"] == 0.046


def test_an_evaluation_against_a_replaced_champion_is_not_promoted_and_a_fresh_one_is(tmp_path):
    registry = str(tmp_path / "registry")
    reg = open_registry(registry)
    v1 = register(reg, "vlm", 1, folder=tmp_path)
    v2 = register(reg, "vlm", 2, folder=tmp_path)  # replaced v1 after the candidate was evaluated against v1
    candidate = make_model(tmp_path / "candidate", b"candidate")
    stale = core.run(candidate, make_eval(tmp_path / "e-stale", True, champion=v1, registry=registry), registry, "vlm")
    assert (stale["version"], stale["champion"], stale["champion_version"], stale["evaluated_against"]) == (3, False, 2, 1)
    assert f"compared it with version 1 ({v1.model_uri}), but the champion is now version 2 ({v2.model_uri})" in stale[
        "reason"]
    # evaluated again, against the champion now in place: the same version (no second copy) becomes champion
    fresh = core.run(candidate, make_eval(tmp_path / "e-fresh", True, champion=v2, registry=registry), registry, "vlm")
    assert (fresh["version"], fresh["champion"], fresh["already_registered"], fresh["reason"]) == (3, True, True, None)
    assert reg.get("vlm", "champion").version == 3


def test_an_evaluation_of_another_registry_or_of_a_replaced_version_number_is_not_trusted(tmp_path):
    registry, other = str(tmp_path / "registry"), str(tmp_path / "other-registry")
    reg = open_registry(registry)
    v1 = register(reg, "vlm", 1, folder=tmp_path)
    # compared with version 1 of another registry: says nothing about this registry's version 1
    elsewhere = make_eval(tmp_path / "e-other", True, champion=v1, registry=other)
    result = core.run(make_model(tmp_path / "a", b"a"), elsewhere, registry, "vlm")
    assert not result["champion"] and "compared it with the champion of 'vlm' in" in result["reason"]
    assert other in result["reason"]
    # compared with a version 1 whose content differs from what version 1 holds here (a registry rebuilt)
    rebuilt = ModelVersion(**{**v1.to_dict(), "content_hash": "f" * 64})
    result = core.run(make_model(tmp_path / "b", b"b"), make_eval(tmp_path / "e-rebuilt", True, champion=rebuilt,
                                                                   registry=registry), registry, "vlm")
    assert not result["champion"] and "holds another model" in result["reason"]
    # the same registry spelt differently (relative path, trailing slash) is the same registry
    relative = Path(registry).relative_to(Path.cwd()) if Path(registry).is_relative_to(Path.cwd()) else registry
    result = core.run(make_model(tmp_path / "c", b"c"), make_eval(tmp_path / "e-same", True, champion=v1,
                                                                   registry=f"{relative}/"), registry, "vlm")
    assert result["champion"] and reg.get("vlm", "champion").version == result["version"]


def test_cli_promote_is_compare_and_set(tmp_path, capsys):
    from components.register import cli

    registry = str(tmp_path / "registry")
    reg = open_registry(registry)
    for n in (1, 2, 3):
        register(reg, "vlm", n, folder=tmp_path, make_champion=(n == 1))
    args = ["promote", "--registry", registry, "--name", "vlm"]
    capsys.readouterr()
    assert cli.registry_main([*args, "--version", "3", "--expect", "2"]) == core.EXIT_NOT_PROMOTED
    err = capsys.readouterr().err
    assert "expected to point at version 2, but points at version 1 now" in err and "--expect 1" in err
    assert reg.get("vlm", "champion").version == 1
    assert cli.registry_main([*args, "--version", "3", "--expect", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == ["champion"]
    assert cli.registry_main([*args, "--version", "2", "--alias", "staging", "--expect", "none"]) == 0
    assert cli.registry_main([*args, "--version", "2", "--expect", "three"]) == 2  # bad input: exit 2
    assert "not a version number or 'none'" in capsys.readouterr().err


# ---- N racing registrations (processes) --------------------------------------------------------------------------
_REGISTER = """
import sys, time
from components.register import cli
go = float(sys.argv[1])
time.sleep(max(0.0, go - time.time()))  # all start together
sys.exit(cli.main(sys.argv[2:]))
"""


def _race_registrations(registry: str, tmp_path: Path) -> None:
    """Champion v1 (0.5). Three candidates were evaluated against v1 and beat it (0.6, 0.7, 0.8); three were
    evaluated earlier against an empty registry, two of them with higher scores (0.9, 0.95, 0.3). All six
    register at once. Exactly one says it holds the alias, it does, and it is one that beat the champion it
    replaced; the rest are registered, not promoted, and name the champion now in place and their own."""
    import os
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[3]
    reg = open_registry(registry)
    v1 = core.run(make_model(tmp_path / "m-v1", b"v1"), make_eval(tmp_path / "e-v1", True, 0.5, registry=registry),
                  registry, "vlm")
    v1 = reg.get("vlm", v1["version"])
    candidates = [("beat-v1", 0.6, v1), ("beat-v1", 0.7, v1), ("beat-v1", 0.8, v1),
                  ("stale", 0.9, None), ("stale", 0.95, None), ("stale", 0.3, None)]
    go = time.time() + 4.0
    procs = []
    for i, (kind, score, against) in enumerate(candidates):
        model = make_model(tmp_path / f"m{i}", f"candidate {i}".encode())
        evaluation = make_eval(tmp_path / f"e{i}", True, score, champion=against, registry=registry)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _REGISTER, str(go), "--model", model, "--evaluation", evaluation,
             "--registry", registry, "--name", "vlm"],
            env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    results = []
    for (kind, score, _), p in zip(candidates, procs):
        out, err = p.communicate(timeout=180)
        assert p.returncode in (0, core.EXIT_NOT_PROMOTED), err[-2000:]
        results.append({"kind": kind, "score": score, "rc": p.returncode, "err": err, **json.loads(out)})

    says_champion = [r for r in results if r["champion"]]
    assert len(says_champion) == 1, [(r["score"], r["champion"], r["reason"]) for r in results]
    winner = says_champion[0]
    assert winner["rc"] == 0 and winner["kind"] == "beat-v1" and winner["evaluated_against"] == v1.version
    assert reg.get("vlm", "champion").version == winner["version"]
    assert sorted(r["version"] for r in results) == [2, 3, 4, 5, 6, 7]  # all registered, each once
    for r in results:
        if r is winner:
            continue
        # A loser of the race names the winner; a stale one names whichever champion was in place when it
        # checked (v1 if it checked before the winner moved in): each is true at the moment it is said.
        if r["kind"] == "stale":
            against, now = "no champion", r["champion_version"]
            assert now in (v1.version, winner["version"])
        else:
            against, now = f"version {v1.version} ({v1.model_uri})", winner["version"]
        assert r["rc"] == core.EXIT_NOT_PROMOTED and r["champion_version"] == now
        assert (f"compared it with {against}, but the champion is now version {now} "
                f"({reg.get('vlm', now).model_uri})") in r["err"]
    # the champion's history: v1, then the winner, each move naming the champion it replaced
    log = sorted(u for u in storage.list_files(storage.join(registry, "vlm", "aliases", "champion")))
    moves = [json.loads(storage.read_text(u)) for u in log]
    assert [(m["version"], m["previous"]) for m in moves] == [(v1.version, None), (winner["version"], v1.version)]


def test_racing_registrations_on_a_folder_leave_one_champion_that_beat_its_predecessor(tmp_path):
    _race_registrations(str(tmp_path / "registry"), tmp_path)


@pytest.mark.gcs
def test_racing_registrations_on_gcs_leave_one_champion_that_beat_its_predecessor(gcs_bucket, tmp_path):
    _race_registrations(f"gs://{gcs_bucket}/registry", tmp_path)
