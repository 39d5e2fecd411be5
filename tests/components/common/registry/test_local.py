"""The local registry backend (a folder, and gs:// on fake-gcs-server): versions, the registry's own copy of each
model, aliases and compare-and-set promotion, references, races (threads and processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from components.common import storage
from components.common.registry import (
    ModelVersion,
    RegistryError,
    open_registry,
    parse_reference,
    resolve_reference,
)
from components.common.registry.local import LocalRegistry

REPO = Path(__file__).resolve().parents[4]
SOURCES: list[Path] = []  # where model_folder() writes: a session temp folder (set by the fixture below)


@pytest.fixture(scope="module", autouse=True)
def _sources(tmp_path_factory):
    SOURCES[:] = [tmp_path_factory.mktemp("sources")]


def model_folder(n: int) -> str:
    """A small model artifact (weights, config, manifest) for run ``n``: distinct bytes per run."""
    folder = SOURCES[0] / f"run-{n}"
    if not (folder / "manifest.json").exists():
        (folder / "adapter").mkdir(parents=True, exist_ok=True)
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(f"weights {n}".encode() * 100)
        (folder / "adapter" / "adapter_config.json").write_text('{"r": 16}')
        (folder / "manifest.json").write_text(json.dumps({"kind": "vlmtune.model", "run": n}))
    return str(folder)


def register(reg, name: str, n: int, *, content_hash: str | None = None, make_champion: bool = True) -> ModelVersion:
    return reg.register(name, model_folder(n), content_hash=content_hash or f"{n:064x}", metrics={"vqa": n / 10},
                        lineage={"run": n}, card=f"card {n}", make_champion=make_champion)


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
    # references resolve to the registry's copies (changed on purpose: they used to be the registered folders)
    copy1, copy2 = (str(tmp_path / "registry" / "vlm" / "versions" / f"00000{n}" / "model") for n in (1, 2))
    assert resolve_reference(f"{registry}::vlm@champion") == copy1
    assert resolve_reference(f"{registry}::vlm@2") == copy2
    assert resolve_reference(f"{registry}::vlm@latest") == copy2
    # not references: folders, gs:// URIs, hub ids
    for plain in ("/data/models/run-1", "gs://bucket/models/run-1", "HuggingFaceTB/SmolVLM-256M-Instruct", "./m"):
        assert resolve_reference(plain) is None
    monkeypatch.delenv("VLMTUNE_REGISTRY", raising=False)
    with pytest.raises(RegistryError, match="without a registry"):
        resolve_reference("vlm@1")
    monkeypatch.setenv("VLMTUNE_REGISTRY", registry)
    assert resolve_reference("vlm@1") == copy1
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
root, name, n, content_hash, source = sys.argv[1:6]
reg = open_registry(root)
v = reg.register(name, source, content_hash=content_hash, metrics={}, lineage={}, card="c")
print(json.dumps({"n": int(n), "version": v.version}))
"""


def _race_processes(root: str, hashes: list[str]) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, root, "vlm", str(i), h, model_folder(i)], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, h in enumerate(hashes)]
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


def test_processes_racing_on_a_local_folder_get_distinct_versions(tmp_path):
    root = str(tmp_path / "registry")
    versions = _race_processes(root, [f"{i + 200:064x}" for i in range(3)])
    assert sorted(versions) == [1, 2, 3]


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




# ---- the registry's own copy of each model --------------------------------------------------------------------------
def _tree(root: str) -> dict[str, bytes]:
    prefix = storage.join(root, "")
    return {u[len(prefix):].replace("\\", "/").lstrip("/"): storage.read_bytes(u) for u in storage.list_files(root)}


def _copy_outlives_its_source(root: str, tmp_path: Path) -> None:
    import shutil

    from components.common.registry.types import tree_digest

    source = tmp_path / "pipeline-root" / "run-7" / "sft"
    shutil.copytree(model_folder(7), source)
    expected = _tree(str(source))
    reg = open_registry(root)
    v = reg.register("vlm", str(source), content_hash="7" * 64, metrics={}, lineage={}, card="c")
    assert v.model_uri == storage.join(root, "vlm", "versions", "000001", "model")
    assert v.source_uri == str(source)
    assert v.artifact == tree_digest(source) and v.artifact["files"] == 3
    shutil.rmtree(tmp_path / "pipeline-root")  # cleaning the pipeline root...
    got = reg.get("vlm", "champion")
    assert got.model_uri == v.model_uri and _tree(got.model_uri) == expected  # ...loses nothing
    # the same content again (from anywhere): same version, no second copy
    again = reg.register("vlm", model_folder(7), content_hash="7" * 64, metrics={}, lineage={}, card="c")
    assert again.version == 1
    copies = {f.split("/model/")[0] for f in _tree(storage.join(root, "vlm")) if "/model/" in f}
    assert copies == {"versions/000001"}


def test_registering_copies_the_model_so_deleting_its_source_loses_nothing(tmp_path):
    _copy_outlives_its_source(str(tmp_path / "registry"), tmp_path)


@pytest.mark.gcs
def test_registering_into_gcs_copies_the_model_so_deleting_its_source_loses_nothing(gcs_bucket, tmp_path):
    _copy_outlives_its_source(f"gs://{gcs_bucket}/registry", tmp_path)


@pytest.mark.gcs
def test_a_gcs_model_is_copied_into_a_local_registry(gcs_bucket, tmp_path):
    source = f"gs://{gcs_bucket}/runs/1/sft"
    storage.upload_dir(model_folder(8), source)
    v = open_registry(str(tmp_path / "registry")).register("vlm", source, content_hash="8" * 64, metrics={},
                                                           lineage={}, card="c")
    storage.delete(f"gs://{gcs_bucket}/runs")
    assert v.source_uri == source
    assert _tree(v.model_uri) == _tree(model_folder(8))


def test_a_missing_or_empty_source_is_refused_and_registers_nothing(tmp_path):
    reg = open_registry(str(tmp_path / "registry"))
    with pytest.raises(RegistryError, match="does not exist.*registry copies the model"):
        reg.register("vlm", str(tmp_path / "nope"), content_hash="a" * 64, metrics={}, lineage={}, card="c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="the folder is empty"):
        reg.register("vlm", str(tmp_path / "empty"), content_hash="a" * 64, metrics={}, lineage={}, card="c")
    assert reg.list_versions("vlm") == [] and reg.get("vlm", "champion") is None


def test_a_crash_while_copying_leaves_no_version_and_no_trusted_copy(tmp_path, monkeypatch):
    reg = open_registry(str(tmp_path / "registry"))
    real_write = storage.write_bytes

    def crash_on_copied_manifest(uri, data):
        if uri.endswith("model/manifest.json"):
            raise OSError("disk full")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_copied_manifest)
    with pytest.raises(OSError, match="disk full"):
        register(reg, "vlm", 1)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    assert reg.list_versions("vlm") == []
    gap = tmp_path / "registry" / "vlm" / "versions" / "000001"
    assert (gap / "model" / "adapter" / "adapter_model.safetensors").exists()
    assert not (gap / "model" / "manifest.json").exists() and not (gap / "version.json").exists()
    assert register(reg, "vlm", 1).version == 2  # the gap is skipped, the artifact registered whole


# ---- compare-and-set promotion --------------------------------------------------------------------------------------
def test_promote_moves_the_alias_only_from_the_expected_version(tmp_path):
    reg = open_registry(str(tmp_path / "registry"))
    for n in (1, 2, 3):
        register(reg, "vlm", n, make_champion=False)
    assert reg.promote("vlm", 1, expected=2).promoted is False  # expected v2, but there is no champion yet
    first = reg.promote("vlm", 1, expected=None)
    assert (first.promoted, first.current) == (True, 1)
    stale = reg.promote("vlm", 3, expected=None)  # evaluated when the registry had no champion
    assert (stale.promoted, stale.expected, stale.current) == (False, None, 1)
    assert reg.get("vlm", "champion").version == 1
    assert reg.promote("vlm", 2, expected=1).promoted and reg.get("vlm", "champion").version == 2
    assert reg.promote("vlm", 2, expected=1).promoted  # already there: nothing to move, and it says so truthfully
    with pytest.raises(RegistryError, match="no such version"):
        reg.promote("vlm", 9, expected=2)
    log = sorted((tmp_path / "registry" / "vlm" / "aliases" / "champion").iterdir())
    entries = [json.loads(p.read_text()) for p in log]
    assert [p.name for p in log] == ["000001.json", "000002.json"]
    assert [(e["version"], e["previous"]) for e in entries] == [(1, None), (2, 1)]
    assert [v.aliases for v in reg.list_versions("vlm")] == [[], ["champion"], []]


def test_a_registry_written_before_the_alias_log_keeps_its_champion(tmp_path):
    reg = open_registry(str(tmp_path / "registry"))
    register(reg, "vlm", 1, make_champion=False)
    register(reg, "vlm", 2, make_champion=False)
    legacy = tmp_path / "registry" / "vlm" / "aliases" / "champion.json"
    legacy.parent.mkdir()
    legacy.write_text(json.dumps({"version": 1}))
    assert reg.get("vlm", "champion").version == 1 and reg.get("vlm", 1).aliases == ["champion"]
    assert reg.promote("vlm", 2, expected=None).promoted is False  # the legacy champion counts
    assert reg.promote("vlm", 2, expected=1).promoted
    assert reg.get("vlm", "champion").version == 2 and reg.get("vlm", 1).aliases == []


_PROMOTER = """
import json, sys, time
from components.common.registry import open_registry
root, version, go = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
reg = open_registry(root)
time.sleep(max(0.0, go - time.time()))  # all start together
p = reg.promote("vlm", version, expected=1)
print(json.dumps({"version": version, "promoted": p.promoted, "current": p.current}))
"""


def _race_promotions(root: str, versions: list[int]) -> list[dict]:
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    go = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", _PROMOTER, root, str(v), str(go)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in versions]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _exactly_one_promotion_wins(reg, root: str) -> None:
    for n in range(1, 6):
        register(reg, "vlm", n, make_champion=(n == 1))
    results = _race_promotions(root, [2, 3, 4, 5])
    winners = [r for r in results if r["promoted"]]
    assert len(winners) == 1, results
    champion = reg.get("vlm", "champion").version
    assert winners[0]["version"] == champion
    assert all(r["current"] == champion for r in results)  # every loser names the winner


def test_processes_promoting_from_the_same_champion_on_a_folder_one_wins(tmp_path):
    root = str(tmp_path / "registry")
    _exactly_one_promotion_wins(open_registry(root), root)


@pytest.mark.gcs
def test_processes_promoting_from_the_same_champion_on_gcs_one_wins(gcs_bucket):
    root = f"gs://{gcs_bucket}/registry"
    _exactly_one_promotion_wins(open_registry(root), root)


def test_registry_targets_take_options_as_a_query(tmp_path):
    from components.common.registry.kubeflow import KubeflowRegistry
    from components.common.registry.vertex import VertexRegistry

    vertex = open_registry("vertex://projects/p/locations/l?artifact_root=gs://b/copies&card_root=gs://b/cards")
    assert isinstance(vertex, VertexRegistry)
    assert (vertex.artifact_root, vertex.card_root) == ("gs://b/copies", "gs://b/cards")
    assert open_registry("vertex://projects/p/locations/l").artifact_root == "auto"
    assert open_registry("vertex://projects/p/locations/l?artifact_root=none").artifact_root is None
    kubeflow = open_registry("kubeflow://mr:9090?is_secure=true&artifact_root=gs://b/c")
    assert isinstance(kubeflow, KubeflowRegistry) and kubeflow.is_secure is True and kubeflow.port == 9090
    with pytest.raises(RegistryError, match=r"unknown vertex registry option\(s\) \['artifact_rot'\]"):
        open_registry("vertex://projects/p/locations/l?artifact_rot=gs://b")
