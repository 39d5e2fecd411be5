"""The local registry backend (a folder, and gs:// on fake-gcs-server): versions, aliases, references, races."""
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


def register(reg, name: str, n: int, *, content_hash: str | None = None, make_champion: bool = True) -> ModelVersion:
    return reg.register(name, f"gs://models/run-{n}", content_hash=content_hash or f"{n:064x}", metrics={"vqa": n / 10},
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


