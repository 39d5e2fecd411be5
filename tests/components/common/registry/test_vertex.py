"""Vertex AI backend: the real ``google-cloud-aiplatform`` client runs; only the GAPIC ``ModelServiceClient``
methods (the last layer before gRPC) are replaced by an in-memory Model Registry that records every request."""
from __future__ import annotations

import hashlib
import re
import types

import pytest

pytest.importorskip("google.cloud.aiplatform")

from google.api_core.exceptions import Aborted, AlreadyExists, NotFound  # noqa: E402
from google.auth.credentials import AnonymousCredentials  # noqa: E402
from google.cloud.aiplatform_v1.services.model_service import ModelServiceClient  # noqa: E402
from google.cloud.aiplatform_v1.types import model as gca_model  # noqa: E402
from google.cloud.aiplatform_v1.types import model_service as gca_ms  # noqa: E402

from components.common.registry.vertex import lineage_labels, sanitize_label  # noqa: E402
from components.common.registry import open_registry, resolve_reference  # noqa: E402

PARENT = "projects/p1/locations/europe-west4"


class FakeModelService:
    """Vertex Model Registry semantics that matter here: server-side version ids, unique aliases (assigning
    one moves it), exactly one ``default`` version, label / display-name filters, and model-level labels
    updated by ``UpdateModel`` under an ``etag`` (a stale etag is refused with ABORTED, as the API documents
    for read-modify-write updates; a model-level read merges model and version labels)."""

    def __init__(self):
        self.models: dict[str, list[gca_model.Model]] = {}
        self.model_labels: dict[str, dict[str, str]] = {}
        self.etags: dict[str, int] = {}
        self.requests: list[tuple[str, object]] = []

    # -- helpers
    @staticmethod
    def _matches(m: gca_model.Model, filter: str) -> bool:
        for key, value in re.findall(r'([\w.]+)="([^"]*)"', filter or ""):
            actual = m.labels.get(key[len("labels."):]) if key.startswith("labels.") else getattr(m, key)
            if actual != value:
                return False
        return True

    def _move_aliases(self, versions, target, aliases):
        for alias in aliases:
            remove = alias.startswith("-")
            alias = alias.lstrip("-")
            for v in versions:
                if alias in v.version_aliases and (v is not target or remove):
                    v.version_aliases.remove(alias)
            if not remove and alias not in target.version_aliases:
                target.version_aliases.append(alias)

    def _resolve(self, name: str) -> gca_model.Model:
        base, _, ref = name.partition("@")
        versions = self.models.get(base)
        if not versions:
            raise NotFound(f"model {base} not found")
        ref = ref or "default"
        for v in versions:
            if v.version_id == ref or ref in v.version_aliases:
                return v
        raise NotFound(f"version {ref} of {base} not found")

    # -- the GAPIC methods aiplatform calls
    def upload_model(self, request=None, **kwargs):
        request = gca_ms.UploadModelRequest(request)
        self.requests.append(("upload_model", request))
        if request.parent_model:
            base = request.parent_model
            versions = self.models[base]
        else:
            base = f"{request.parent}/models/{request.model_id or 1000 + len(self.models)}"
            if base in self.models:
                raise AlreadyExists(f"model {base} already exists")
            versions = self.models.setdefault(base, [])
        new = gca_model.Model(request.model)
        new.name = base
        new.version_id = str(len(versions) + 1)
        new.version_aliases = []
        versions.append(new)
        self._move_aliases(versions, new, list(request.model.version_aliases))
        response = gca_ms.UploadModelResponse(model=base, model_version_id=new.version_id)
        return types.SimpleNamespace(result=lambda timeout=None: response,
                                     operation=types.SimpleNamespace(name=f"{base}/operations/{len(self.requests)}"))

    def _model_level(self, base: str) -> gca_model.Model:
        """A model-level read: the default version with the model labels merged in, and the model's etag."""
        merged = gca_model.Model(self._resolve(base))
        merged.labels.update(self.model_labels.get(base, {}))
        merged.etag = str(self.etags.get(base, 0))
        return merged

    def get_model(self, request=None, *, name=None, **kwargs):
        name = name or gca_ms.GetModelRequest(request).name
        self.requests.append(("get_model", name))
        return self._model_level(name) if "@" not in name else self._resolve(name)

    def update_model(self, request=None, *, model=None, update_mask=None, **kwargs):
        request = gca_ms.UpdateModelRequest(request) if request is not None else gca_ms.UpdateModelRequest(
            model=model, update_mask=update_mask)
        self.requests.append(("update_model", request))
        base = request.model.name
        assert "@" not in base and list(request.update_mask.paths) == ["labels"], request
        self._resolve(base)
        if request.model.etag != str(self.etags.get(base, 0)):
            raise Aborted(f"etag {request.model.etag!r} of {base} is stale")
        self.model_labels[base] = dict(request.model.labels)
        self.etags[base] = self.etags.get(base, 0) + 1
        return self._model_level(base)

    def list_models(self, request=None, **kwargs):
        request = gca_ms.ListModelsRequest(request)
        self.requests.append(("list_models", request))
        defaults = [self._model_level(base) for base in self.models if base.startswith(request.parent)]
        return [m for m in defaults if self._matches(m, request.filter)]

    def list_model_versions(self, request=None, **kwargs):
        request = gca_ms.ListModelVersionsRequest(request)
        self.requests.append(("list_model_versions", request))
        return [m for m in self.models.get(request.name, []) if self._matches(m, request.filter)]

    def merge_version_aliases(self, request=None, *, name=None, version_aliases=None, **kwargs):
        self.requests.append(("merge_version_aliases", (name, list(version_aliases))))
        target = self._resolve(name)
        self._move_aliases(self.models[name.partition("@")[0]], target, list(version_aliases))
        return target

    def sent(self, method: str) -> list:
        return [r for m, r in self.requests if m == method]


@pytest.fixture
def vertex(monkeypatch):
    fake = FakeModelService()
    for method in ("upload_model", "get_model", "list_models", "list_model_versions", "merge_version_aliases",
                   "update_model"):
        monkeypatch.setattr(ModelServiceClient, method,
                            lambda self, *a, _m=method, **kw: getattr(fake, _m)(*a, **kw))
    return fake


@pytest.fixture
def registry(vertex):
    # artifact_root=none: these tests are about the requests; the copy into the registry's prefix is tested on the
    # GCS emulator below.
    return open_registry("vertex://projects/p1/locations/europe-west4?artifact_root=none",
                         credentials=AnonymousCredentials(),
                         serving_container_image_uri="europe-docker.pkg.dev/p1/serve/vlm:1")


LINEAGE = {"base_model": "HuggingFaceTB/SmolVLM-256M-Instruct", "dataset_hash": "d" * 64,
           "dataset_uri": "gs://acme-ml/runs/7/data", "config_hash": "0123abcd"}


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def register(reg, n: int, *, content_hash=None, make_champion=True):
    return reg.register("Chart-VLM", f"gs://acme-ml/runs/{n}/dpo", content_hash=content_hash or sha(n),
                        metrics={"vqa": n / 10}, lineage=LINEAGE, card="---\n---\n", make_champion=make_champion)


def test_first_registration_uploads_a_new_model_with_labels_and_champion_alias(registry, vertex):
    v1 = register(registry, 1)
    (upload,) = vertex.sent("upload_model")
    assert upload.parent == PARENT
    assert upload.parent_model == ""  # a new model resource, whose ID Vertex keeps unique
    assert upload.model_id == "chart-vlm"
    assert upload.model.display_name == "Chart-VLM"
    assert upload.model.artifact_uri == "gs://acme-ml/runs/1/dpo"
    # no alias but `default` (a new model needs one default version) travels with an upload; the champion moves
    # after it, under the etag guard: the model-level label first, then Vertex's own alias
    assert list(upload.model.version_aliases) == ["default"]
    (label_update,) = vertex.sent("update_model")
    assert label_update.model.name == f"{PARENT}/models/chart-vlm" and label_update.model.etag == "0"
    assert label_update.model.labels["vlmtune_alias_champion"] == "1"
    assert "vlmtune_content_hash" not in label_update.model.labels  # version labels stay on the version
    assert vertex.sent("merge_version_aliases") == [(f"{PARENT}/models/chart-vlm@1", ["champion", "default"])]
    assert upload.model.container_spec.image_uri == "europe-docker.pkg.dev/p1/serve/vlm:1"
    assert dict(upload.model.labels) == {
        "vlmtune_name": "chart-vlm",
        "vlmtune_content_hash": sha(1)[:63],
        "lineage_base_model": "huggingfacetb_smolvlm-256m-instruct",
        "lineage_config_hash": "0123abcd",
        "lineage_dataset_hash": "d" * 63,
        "lineage_dataset_uri": "gs_acme-ml_runs_7_data",
    }
    for k, v in upload.model.labels.items():
        assert re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", k) and re.fullmatch(r"[a-z0-9_-]{0,63}", v)
    # the model was looked up first (by label, then display name) and not found
    filters = [r["filter"] if isinstance(r, dict) else r.filter for r in vertex.sent("list_models")]
    assert filters[:2] == ['labels.vlmtune_name="chart-vlm"', 'display_name="Chart-VLM"']
    assert (v1.version, v1.model_uri, v1.content_hash) == (1, "gs://acme-ml/runs/1/dpo", sha(1))
    assert v1.metrics == {"vqa": 0.1} and v1.lineage == LINEAGE and "champion" in v1.aliases


def test_next_registration_is_a_version_of_the_same_model_and_takes_the_alias(registry, vertex):
    register(registry, 1)
    v2 = register(registry, 2)
    second = vertex.sent("upload_model")[1]
    assert second.parent_model == f"{PARENT}/models/chart-vlm"
    assert list(second.model.version_aliases) == []
    assert [u.model.labels["vlmtune_alias_champion"] for u in vertex.sent("update_model")] == ["1", "2"]
    assert second.model.artifact_uri == "gs://acme-ml/runs/2/dpo"
    assert v2.version == 2
    assert registry.get("Chart-VLM", "champion").version == 2
    assert registry.get("Chart-VLM", 1).aliases == []  # the alias moved
    assert [v.version for v in registry.list_versions("Chart-VLM")] == [1, 2]
    assert registry.get("Chart-VLM", "latest").model_uri == "gs://acme-ml/runs/2/dpo"
    assert registry.get("Chart-VLM", 7) is None and registry.get("unknown", 1) is None


def test_non_champion_registration_keeps_default_and_champion_where_they_are(registry, vertex):
    register(registry, 1)
    v2 = register(registry, 2, make_champion=False)
    upload = vertex.sent("upload_model")[1]
    assert list(upload.model.version_aliases) == []
    assert v2.aliases == [] and registry.get("Chart-VLM", "champion").version == 1
    registry.set_alias("Chart-VLM", "champion", 2)
    assert vertex.sent("merge_version_aliases")[-1] == (f"{PARENT}/models/chart-vlm@2", ["champion", "default"])
    assert registry.get("Chart-VLM", "champion").version == 2


def test_same_content_hash_returns_existing_version_without_uploading(registry, vertex):
    first = register(registry, 1)
    again = register(registry, 99, content_hash=sha(1))
    assert again.version == first.version == 1 and again.model_uri == "gs://acme-ml/runs/1/dpo"
    assert len(vertex.sent("upload_model")) == 1
    lookup = vertex.sent("list_model_versions")[-1]
    assert lookup.name == f"{PARENT}/models/chart-vlm"
    assert lookup.filter == f'labels.vlmtune_content_hash="{sha(1)[:63]}"'
    # a hash sharing the label's 63-character prefix is a different artifact: a new version
    near = sha(1)[:63] + ("0" if sha(1)[-1] != "0" else "1")
    assert register(registry, 3, content_hash=near).version == 2


def test_reference_through_vertex_and_local_model_is_refused(registry, vertex):
    register(registry, 1)
    assert resolve_reference("vertex://projects/p1/locations/europe-west4::Chart-VLM@champion",
                             credentials=AnonymousCredentials()) == "gs://acme-ml/runs/1/dpo"
    with pytest.raises(Exception, match="Vertex AI reads models from Cloud Storage"):
        registry.register("Chart-VLM", "/tmp/model", content_hash="e" * 64, metrics={}, lineage={}, card="")


def test_label_sanitising():
    assert sanitize_label("HuggingFaceTB/SmolVLM-256M-Instruct") == "huggingfacetb_smolvlm-256m-instruct"
    assert len(sanitize_label("x" * 100)) == 63
    assert sanitize_label("9lives", key=True) == "k_9lives"
    labels = lineage_labels("m", "h", {"nested": {"a": 1}, "none": None, "Epochs": 3})
    assert labels == {"vlmtune_name": "m", "vlmtune_content_hash": "h", "lineage_epochs": "3"}


def test_racing_first_registrations_end_up_as_versions_of_one_model(registry, vertex, monkeypatch):
    register(registry, 1)
    # the second run looked before the first one's model existed
    monkeypatch.setattr(registry, "find_model", lambda name: None)
    v2 = register(registry, 2)
    uploads = vertex.sent("upload_model")
    assert [u.model_id for u in uploads] == ["chart-vlm", "chart-vlm", ""]
    assert uploads[-1].parent_model == f"{PARENT}/models/chart-vlm"
    assert v2.version == 2 and list(vertex.models) == [f"{PARENT}/models/chart-vlm"]


# ---- compare-and-set promotion: the model-level label under Vertex's etag ----------------------------------------
def test_promote_moves_the_champion_only_from_the_expected_version(registry, vertex):
    for n in (1, 2, 3):
        register(registry, n, make_champion=(n == 1))
    stale = registry.promote("Chart-VLM", 3, expected=None)  # evaluated when there was no champion
    assert (stale.promoted, stale.current) == (False, 1)
    assert [u.model.labels["vlmtune_alias_champion"] for u in vertex.sent("update_model")] == ["1"]  # nothing sent
    assert registry.promote("Chart-VLM", 2, expected=1).promoted
    update = vertex.sent("update_model")[-1]
    assert (update.model.labels["vlmtune_alias_champion"], update.model.etag, list(update.update_mask.paths)) == (
        "2", "1", ["labels"])
    assert vertex.sent("merge_version_aliases")[-1] == (f"{PARENT}/models/chart-vlm@2", ["champion", "default"])
    assert registry.get("Chart-VLM", "champion").version == 2 and registry.get("Chart-VLM", 1).aliases == []


def test_of_two_racing_promotions_the_stale_etag_loses_and_says_who_won(registry, vertex, monkeypatch):
    for n in (1, 2, 3):
        register(registry, n, make_champion=(n == 1))
    other = open_registry("vertex://projects/p1/locations/europe-west4?artifact_root=none",
                          credentials=AnonymousCredentials())
    real_update = vertex.update_model
    raced = []

    def another_run_lands_first(request=None, **kwargs):
        if not raced:  # between our read (etag 1) and our write, another run promotes version 3
            raced.append(None)
            raced[0] = other.promote("Chart-VLM", 3, expected=1)
        return real_update(request, **kwargs)

    monkeypatch.setattr(vertex, "update_model", another_run_lands_first)
    ours = registry.promote("Chart-VLM", 2, expected=1)
    assert raced[0].promoted and (ours.promoted, ours.expected, ours.current) == (False, 1, 3)
    etags = [u.model.etag for u in vertex.sent("update_model")]
    assert etags == ["0", "1", "1"]  # the first registration, the other run's write, our refused write
    assert registry.get("Chart-VLM", "champion").version == 3


def test_the_label_decides_when_a_crash_left_the_vertex_alias_behind(registry, vertex, monkeypatch):
    register(registry, 1)
    register(registry, 2, make_champion=False)
    real_merge = vertex.merge_version_aliases

    def crash(*args, **kwargs):
        raise RuntimeError("connection lost")

    monkeypatch.setattr(vertex, "merge_version_aliases", crash)
    with pytest.raises(RuntimeError):
        registry.promote("Chart-VLM", 2, expected=1)
    monkeypatch.setattr(vertex, "merge_version_aliases", real_merge)
    assert registry.get("Chart-VLM", "champion").version == 2  # the label moved: version 2 holds the alias
    assert registry.promote("Chart-VLM", 2, expected=2).promoted  # ...and the next move repairs Vertex's alias
    assert vertex.sent("merge_version_aliases")[-1] == (f"{PARENT}/models/chart-vlm@2", ["champion", "default"])
    assert "champion" in vertex._resolve(f"{PARENT}/models/chart-vlm@2").version_aliases


# ---- the registry-owned copy (fake-gcs-server) ---------------------------------------------------------------------
@pytest.mark.gcs
def test_register_copies_the_model_to_the_registry_prefix_and_uploads_the_copy(vertex, gcs_bucket, tmp_path):
    from components.common import storage

    source = tmp_path / "dpo"
    source.mkdir()
    (source / "adapter_model.safetensors").write_bytes(b"w" * 1000)
    (source / "manifest.json").write_text('{"kind": "vlmtune.model"}')
    storage.upload_dir(source, f"gs://{gcs_bucket}/root/run-1/dpo")
    reg = open_registry("vertex://projects/p1/locations/europe-west4", credentials=AnonymousCredentials())
    v1 = reg.register("Chart-VLM", f"gs://{gcs_bucket}/root/run-1/dpo", content_hash=sha(1), metrics={},
                      lineage=LINEAGE, card="# card")
    folder = f"gs://{gcs_bucket}/vlmtune-registry/Chart-VLM/{sha(1)}"
    (upload,) = vertex.sent("upload_model")
    assert upload.model.artifact_uri == v1.model_uri == f"{folder}/model"
    assert v1.source_uri == f"gs://{gcs_bucket}/root/run-1/dpo" and v1.artifact["files"] == 2
    assert storage.read_text(v1.card_uri) == "# card" and v1.card_uri == f"{folder}/README.md"
    storage.delete(f"gs://{gcs_bucket}/root")  # the pipeline root is cleaned
    assert storage.read_bytes(f"{v1.model_uri}/adapter_model.safetensors") == b"w" * 1000
    assert storage.exists(f"{folder}/copy.json")
    # the same content again: the same version, nothing uploaded or copied again (the source is gone)
    again = reg.register("Chart-VLM", f"gs://{gcs_bucket}/root/run-1/dpo", content_hash=sha(1), metrics={},
                         lineage=LINEAGE, card="# card")
    assert again.version == 1 and len(vertex.sent("upload_model")) == 1


def test_a_local_model_without_an_artifact_root_is_refused_before_any_upload(vertex, tmp_path):
    reg = open_registry("vertex://projects/p1/locations/europe-west4", credentials=AnonymousCredentials())
    with pytest.raises(Exception, match="Vertex AI reads models from Cloud Storage"):
        reg.register("Chart-VLM", str(tmp_path), content_hash="e" * 64, metrics={}, lineage={}, card="")
    assert vertex.sent("upload_model") == []
