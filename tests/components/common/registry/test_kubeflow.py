"""Kubeflow backend: the real ``model-registry`` client talks HTTP to an in-process fake of the Model Registry
REST API (``/api/model_registry/v1``) on loopback; the test asserts the requests it sent."""
from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

pytest.importorskip("model_registry")

from components.common.registry import RegistryError, open_registry, resolve_reference  # noqa: E402

API = "/api/model_registry/v1"


def _value(v):
    if isinstance(v, bool):
        return {"metadataType": "MetadataBoolValue", "bool_value": v}
    if isinstance(v, int):
        return {"metadataType": "MetadataIntValue", "int_value": str(v)}
    if isinstance(v, float):
        return {"metadataType": "MetadataDoubleValue", "double_value": v}
    return {"metadataType": "MetadataStringValue", "string_value": str(v)}


class FakeModelRegistry:
    """The slice of the Model Registry REST API the client uses, with its uniqueness rules."""

    def __init__(self):
        self.ids = itertools.count(1)
        self.models: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self.artifacts: dict[str, list[dict]] = {}
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        self.lock = threading.Lock()

    def _stamp(self, obj: dict) -> dict:
        obj.setdefault("id", str(next(self.ids)))
        obj.setdefault("createTimeSinceEpoch", "1767000000000")
        obj["lastUpdateTimeSinceEpoch"] = "1767000000000"
        obj.setdefault("customProperties", {})
        return obj

    def handle(self, method: str, path: str, query: dict, body: dict | None):
        with self.lock:
            self.requests.append((method, path, query, body))
            rel = path[len(API):]
            q = {k: v[0] for k, v in query.items()}
            if method == "GET" and rel == "/registered_models":
                items = list(self.models.values())
                return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
            if method == "GET" and rel == "/registered_model":
                found = [m for m in self.models.values() if m["name"] == q.get("name")]
                return (200, found[0]) if found else (404, {"code": "404", "message": "not found"})
            if method == "POST" and rel == "/registered_models":
                if any(m["name"] == body["name"] for m in self.models.values()):
                    return 409, {"code": "409", "message": "registered model already exists"}
                rm = self._stamp({**body, "state": "LIVE"})
                self.models[rm["id"]] = rm
                return 201, rm
            if method == "PATCH" and rel.startswith("/registered_models/"):
                rm = self.models[rel.rsplit("/", 1)[1]]
                rm.update(body)
                return 200, self._stamp(rm)
            if method == "GET" and rel == "/model_version":
                found = [v for v in self.versions.values()
                         if v["name"] == q.get("name") and v["registeredModelId"] == q.get("parentResourceId")]
                return (200, found[0]) if found else (404, {"code": "404", "message": "not found"})
            if method == "POST" and rel == "/model_versions":
                if any(v["name"] == body["name"] and v["registeredModelId"] == body["registeredModelId"]
                       for v in self.versions.values()):
                    return 409, {"code": "409", "message": "model version already exists"}
                mv = self._stamp({**body, "state": "LIVE"})
                self.versions[mv["id"]] = mv
                return 201, mv
            if method == "GET" and rel.startswith("/registered_models/") and rel.endswith("/versions"):
                rm_id = rel.split("/")[2]
                items = [v for v in self.versions.values() if v["registeredModelId"] == rm_id]
                return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
            if method == "POST" and rel.startswith("/model_versions/") and rel.endswith("/artifacts"):
                mv_id = rel.split("/")[2]
                art = self._stamp(dict(body))
                self.artifacts.setdefault(mv_id, []).append(art)
                return 200, art
            if method == "GET" and rel == "/model_artifact":
                arts = self.artifacts.get(q.get("parentResourceId", ""), [])
                return (200, arts[0]) if arts else (404, {"code": "404", "message": "not found"})
            return 404, {"code": "404", "message": f"unhandled {method} {path}"}

    def sent(self, method: str, suffix: str) -> list[dict]:
        return [b for m, p, _, b in self.requests if m == method and p.endswith(suffix)]


@pytest.fixture
def fake_server():
    fake = FakeModelRegistry()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.port = server.server_address[1]
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _one_tls_context(monkeypatch):
    """The client builds a TLS context (loading the system CA bundle, ~0.15 s) for every call, even over plain
    HTTP where it is never used; share one so these tests stay fast. Nothing on the wire changes."""
    import ssl
    import types

    from mr_openapi import rest

    shared = ssl.create_default_context()
    monkeypatch.setattr(rest, "ssl", types.SimpleNamespace(
        create_default_context=lambda *a, **k: shared, CERT_NONE=ssl.CERT_NONE))


@pytest.fixture
def registry(fake_server):
    # artifact_root=none: these tests are about the requests; the copy into the registry's prefix is tested on the
    # GCS emulator below.
    return open_registry(f"kubeflow://127.0.0.1:{fake_server.port}?artifact_root=none", author="ci")


def register(reg, n: int, *, content_hash=None, make_champion=True):
    return reg.register("chart-vlm", f"gs://acme-ml/runs/{n}/dpo", content_hash=content_hash or f"{n:064x}",
                        metrics={"vqa": n / 10, "per_category": {"count": 0.5}},
                        lineage={"base_model": "HuggingFaceTB/SmolVLM-256M-Instruct", "dataset_hash": "d" * 64},
                        card="---\n---\n", make_champion=make_champion)


def test_register_sends_model_version_artifact_and_champion_alias(registry, fake_server):
    v1 = register(registry, 1)
    (rm_body,) = fake_server.sent("POST", "/registered_models")
    assert rm_body["name"] == "chart-vlm" and rm_body["owner"] == "ci"
    # the version, then the champion's first move: a create-only version named after the alias and the move number
    mv_body, move_body = fake_server.sent("POST", "/model_versions")
    assert mv_body["name"] == "1" and mv_body["registeredModelId"] == "1" and mv_body["author"] == "ci"
    assert move_body["name"] == "vlmtune-alias-champion-1" and move_body["registeredModelId"] == "1"
    assert move_body["customProperties"]["vlmtune_alias_version"]["string_value"] == "1"
    assert move_body["customProperties"]["vlmtune_alias_previous"]["string_value"] == ""
    props = mv_body["customProperties"]
    assert props["vlmtune_content_hash"] == {"metadataType": "MetadataStringValue", "string_value": f"{1:064x}"}
    assert props["metric_vqa"]["double_value"] == 0.1
    assert props["metric_per_category.count"]["double_value"] == 0.5
    record = json.loads(props["vlmtune_record"]["string_value"])
    assert record["lineage"]["base_model"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    artifact, move_artifact = fake_server.sent("POST", "/artifacts")
    assert move_artifact["uri"] == artifact["uri"]
    assert artifact["artifactType"] == "model-artifact"
    assert artifact["uri"] == "gs://acme-ml/runs/1/dpo"
    assert artifact["modelFormatName"] == "idefics3"
    (alias_patch,) = fake_server.sent("PATCH", "/registered_models/1")
    assert alias_patch["customProperties"]["vlmtune_alias_champion"]["string_value"] == "1"
    assert (v1.version, v1.aliases) == (1, ["champion"])


def test_versions_number_up_champion_moves_and_reads_back(registry, fake_server):
    register(registry, 1)
    register(registry, 2)
    register(registry, 3, make_champion=False)
    assert [v.version for v in registry.list_versions("chart-vlm")] == [1, 2, 3]
    champion = registry.get("chart-vlm", "champion")
    assert champion.version == 2 and champion.model_uri == "gs://acme-ml/runs/2/dpo"
    assert champion.metrics["vqa"] == 0.2 and champion.content_hash == f"{2:064x}"
    assert registry.get("chart-vlm", "latest").version == 3
    assert registry.get("chart-vlm", 1).aliases == []
    assert registry.get("chart-vlm", "staging") is None and registry.get("other", 1) is None
    registry.set_alias("chart-vlm", "champion", 3)
    assert resolve_reference(f"kubeflow://127.0.0.1:{fake_server.port}::chart-vlm@champion",
                             author="ci") == "gs://acme-ml/runs/3/dpo"
    with pytest.raises(RegistryError, match="no such version"):
        registry.set_alias("chart-vlm", "champion", 9)


def test_same_content_hash_is_idempotent(registry, fake_server):
    register(registry, 1)
    again = register(registry, 5, content_hash=f"{1:064x}")
    assert again.version == 1 and again.model_uri == "gs://acme-ml/runs/1/dpo"
    assert [b["name"] for b in fake_server.sent("POST", "/model_versions")] == ["1", "vlmtune-alias-champion-1"]


def test_a_version_number_taken_meanwhile_is_skipped(registry, fake_server):
    register(registry, 1)
    # another writer takes "2" between our listing and our create: the server refuses, we retry with 3
    real = registry._raw_versions
    registry._raw_versions = lambda name: [v for v in real(name) if v.name != "2"]
    other = open_registry(f"kubeflow://127.0.0.1:{fake_server.port}?artifact_root=none", author="other")
    register(other, 2)
    v = register(registry, 3)
    assert v.version == 3


# ---- compare-and-set promotion: create-only move versions --------------------------------------------------------
def test_promote_moves_the_champion_only_from_the_expected_version(registry, fake_server):
    for n in (1, 2, 3):
        register(registry, n, make_champion=(n == 1))
    stale = registry.promote("chart-vlm", 3, expected=None)
    assert (stale.promoted, stale.current) == (False, 1)
    assert registry.promote("chart-vlm", 2, expected=1).promoted
    moves = [b for b in fake_server.sent("POST", "/model_versions") if b["name"].startswith("vlmtune-alias-")]
    assert [(b["name"], b["customProperties"]["vlmtune_alias_version"]["string_value"],
             b["customProperties"]["vlmtune_alias_previous"]["string_value"]) for b in moves] == [
        ("vlmtune-alias-champion-1", "1", ""), ("vlmtune-alias-champion-2", "2", "1")]
    assert registry.get("chart-vlm", "champion").version == 2
    # the move versions are bookkeeping, not vlmtune versions
    assert [v.version for v in registry.list_versions("chart-vlm")] == [1, 2, 3]
    assert registry.get("chart-vlm", "latest").version == 3


@pytest.mark.parametrize("refused_by", ["client", "server"])
def test_of_two_racing_promotions_the_second_move_is_refused(registry, fake_server, monkeypatch, refused_by):
    for n in (1, 2, 3):
        register(registry, n, make_champion=(n == 1))
    if refused_by == "server":  # the client's own existence check misses it (a race): the server's 409 decides
        real_lookup = registry.client._api.get_model_version_by_params

        async def moves_never_found(rm_id, name, *args, **kwargs):
            if str(name).startswith("vlmtune-alias-"):
                return None
            return await real_lookup(rm_id, name, *args, **kwargs)

        monkeypatch.setattr(registry.client._api, "get_model_version_by_params", moves_never_found)
    other = open_registry(f"kubeflow://127.0.0.1:{fake_server.port}?artifact_root=none", author="other")
    real_heads = registry._alias_heads
    raced = []

    def another_run_lands_first(name, rm=None, raw=None):
        heads = real_heads(name, rm, raw)  # we read move 1 (champion = 1)...
        if not raced:
            raced.append(None)
            raced[0] = other.promote("chart-vlm", 3, expected=1)  # ...and another run makes move 2 first
        return heads

    monkeypatch.setattr(registry, "_alias_heads", another_run_lands_first)
    ours = registry.promote("chart-vlm", 2, expected=1)
    assert raced[0].promoted and (ours.promoted, ours.current) == (False, 3)
    refused = [b for m, p, _, b in fake_server.requests if m == "POST" and p.endswith("/model_versions")
               and b["name"] == "vlmtune-alias-champion-2"]
    assert len(refused) == (1 if refused_by == "client" else 2)  # the other run's, and ours if the client sent it
    assert registry.get("chart-vlm", "champion").version == 3


@pytest.mark.gcs
def test_register_copies_the_model_to_the_registry_prefix(fake_server, gcs_bucket, tmp_path):
    from components.common import storage

    source = tmp_path / "dpo"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(b"k" * 500)
    (source / "manifest.json").write_text('{"kind": "vlmtune.model"}')
    storage.upload_dir(source, f"gs://{gcs_bucket}/root/dpo")
    reg = open_registry(f"kubeflow://127.0.0.1:{fake_server.port}?artifact_root=gs://{gcs_bucket}/mr-artifacts",
                        author="ci")
    v1 = reg.register("chart-vlm", f"gs://{gcs_bucket}/root/dpo", content_hash="c" * 64, metrics={}, lineage={},
                      card="# card")
    assert v1.model_uri == f"gs://{gcs_bucket}/mr-artifacts/chart-vlm/{'c' * 64}/model"
    artifact = fake_server.sent("POST", "/artifacts")[0]
    assert artifact["uri"] == v1.model_uri
    storage.delete(f"gs://{gcs_bucket}/root")
    assert storage.read_bytes(f"{v1.model_uri}/adapter_model.safetensors") == b"k" * 500
    got = reg.get("chart-vlm", "champion")
    assert (got.model_uri, got.source_uri, got.artifact["files"]) == (v1.model_uri, f"gs://{gcs_bucket}/root/dpo", 2)


def test_a_local_model_needs_an_artifact_root(fake_server, tmp_path):
    reg = open_registry(f"kubeflow://127.0.0.1:{fake_server.port}", author="ci")
    with pytest.raises(RegistryError, match="Set the registry's artifact_root option"):
        reg.register("chart-vlm", str(tmp_path), content_hash="d" * 64, metrics={}, lineage={}, card="")
    assert fake_server.sent("POST", "/model_versions") == []
