"""Vertex AI Model Registry backend (``vertex://projects/PROJECT/locations/LOCATION``), via ``google-cloud-aiplatform``.

How the registry's ideas map onto Vertex:
- a registered *name* is one Vertex ``Model`` resource (display name = name, label ``vlmtune_name``); each
  registration is a new version uploaded with ``Model.upload(parent_model=<that resource>)``;
- the version number is Vertex's ``version_id`` (Vertex allocates it server-side, so concurrent uploads get
  distinct numbers without any help from us);
- the model is copied first to a registry-owned prefix, ``<artifact_root>/<name>/<content_hash>/model/``
  (manifest last, then ``copy.json`` beside it), and the version's ``artifact_uri`` is that copy, so
  cleaning the pipeline root does not lose it. ``artifact_root`` defaults to ``gs://<the model's bucket>/
  vlmtune-registry``; ``artifact_root="none"`` keeps the artifact where it is (the copy step is skipped);
- aliases: where an alias points is recorded in a model-level label (``vlmtune_alias_champion = "3"``),
  changed only by ``UpdateModel`` carrying the ``etag`` read with it (Vertex's read-modify-write guard: a
  stale etag is refused), so of several racing promotions from the same state exactly one lands: that is
  the compare-and-set of :meth:`VertexRegistry.promote`. The Vertex version alias of the same name (and
  ``default`` for the champion, what serving uses when no version is named) is moved right after, so the
  console and serving agree. Uploads never carry an alias, so no alias moves outside this guard. Where the
  label and the Vertex alias disagree (a crash between the two writes), the label is the truth and the next
  move repairs the alias; a model that has no label yet (registered before labels) is read by its aliases;
- lineage goes into labels (lowercase, ``[a-z0-9_-]``, at most 63 characters, so values are sanitised and
  truncated) for filtering in the console, and in full, with metrics, the card URI, the source and the copy's
  digest, into the version description as JSON, so :meth:`get` returns what was registered;
- the first registration of a name creates the Model with ``model_id`` = the sanitised name, so Vertex itself
  refuses a second model of that name: when two first registrations race, the loser gets ``AlreadyExists`` and
  uploads again as a new version of the winner's model;
- idempotency: the label ``vlmtune_content_hash`` (the hash truncated to 63 characters) is looked up with
  ``list_model_versions(filter=...)`` before uploading (and before copying).

Vertex reads artifacts from Cloud Storage, so the model (and ``artifact_root``) must be ``gs://``. The card is
written to ``card_root`` when given (``<card_root>/<name>/<content_hash[:16]>/README.md``), else beside the
copy; the source folder is never modified, because it is another step's finished artifact.
"""
from __future__ import annotations

import json
import re
from typing import Any

from components.common import storage
from components.common.registry.types import (
    CHAMPION,
    LATEST,
    ModelVersion,
    Promotion,
    RegistryError,
    check_alias,
    check_content_hash,
    check_name,
    artifact_root_option,
    copy_once,
    registry_copy_folder,
    parse_ref,
)

# A Hugging Face PyTorch inference image on Vertex; configurable, because serving is the user's choice.
DEFAULT_SERVING_IMAGE = (
    "us-docker.pkg.dev/deeplearning-platform-release/gcr.io/"
    "huggingface-pytorch-inference-cu121.2-2.transformers.4-44.ubuntu2204.py311"
)
NAME_LABEL = "vlmtune_name"
HASH_LABEL = "vlmtune_content_hash"
ALIAS_LABEL_PREFIX = "vlmtune_alias_"  # model-level labels: where each alias points (the compare-and-set state)
MAX_LABELS = 64
_LABEL_BAD = re.compile(r"[^a-z0-9_-]+")


def sanitize_label(value: Any, *, key: bool = False) -> str:
    """A Vertex/GCP label key or value: lowercase, ``[a-z0-9_-]`` (other runs become ``_``), <= 63 chars.

    Keys must also start with a letter.
    """
    text = _LABEL_BAD.sub("_", str(value).lower()).strip("_")[:63]
    if key and not text[:1].isalpha():
        text = ("k_" + text)[:63]
    return text


def model_id_for(name: str) -> str:
    """Vertex model ID for a registered name: ``[a-z0-9_-]``, <= 63 chars, starting with a letter."""
    return sanitize_label(name, key=True).replace("_", "-")


def lineage_labels(name: str, content_hash: str, lineage: dict) -> dict[str, str]:
    labels = {NAME_LABEL: sanitize_label(name), HASH_LABEL: sanitize_label(content_hash)}
    for k, v in sorted(lineage.items()):
        if v is None or isinstance(v, (dict, list)) or len(labels) >= MAX_LABELS:
            continue
        labels[sanitize_label(f"lineage_{k}", key=True)] = sanitize_label(v)
    return labels


class VertexRegistry:
    def __init__(
        self,
        project: str,
        location: str,
        *,
        serving_container_image_uri: str = DEFAULT_SERVING_IMAGE,
        card_root: str | None = None,
        artifact_root: str | None = "auto",
        credentials=None,
        max_promote_attempts: int = 20,
    ):
        self.project, self.location = project, location
        self.serving_container_image_uri = serving_container_image_uri
        self.card_root = card_root
        self.artifact_root = artifact_root_option(artifact_root)
        self.credentials = credentials
        self.max_promote_attempts = max_promote_attempts

    def __repr__(self) -> str:
        return f"VertexRegistry(projects/{self.project}/locations/{self.location})"

    # ---- Vertex access -----------------------------------------------------------------------------------------
    def _common(self) -> dict:
        from google.cloud import aiplatform

        # Model.upload builds its result object from aiplatform's global config (not from the arguments), so
        # the global config must name this registry's project, location and credentials too.
        aiplatform.init(project=self.project, location=self.location, credentials=self.credentials)
        return {"project": self.project, "location": self.location, "credentials": self.credentials}

    def find_model(self, name: str):
        """The Vertex Model resource for ``name`` (by label, then by display name), or None."""
        from google.cloud import aiplatform

        check_name(name)
        found = aiplatform.Model.list(filter=f'labels.{NAME_LABEL}="{sanitize_label(name)}"', **self._common())
        if not found:
            found = aiplatform.Model.list(filter=f'display_name="{name}"', **self._common())
        return found[0] if found else None

    def _versions(self, parent_resource_name: str, filter: str | None = None) -> list:
        """gca ``Model`` protos of every version (with labels and description), via ListModelVersions."""
        from google.cloud.aiplatform import models
        from google.cloud.aiplatform.compat.types import model_service as gca_model_service

        registry = models.ModelRegistry(parent_resource_name, **self._common())
        request = gca_model_service.ListModelVersionsRequest(name=parent_resource_name, filter=filter)
        return list(registry.client.list_model_versions(request=request))

    def _to_version(self, name: str, gca_model, labelled: dict[str, int] | None = None) -> ModelVersion:
        """A ModelVersion from a gca ``Model``; ``labelled`` (alias -> version, from the model-level labels)
        decides where those aliases point, whatever Vertex's own aliases say."""
        try:
            extra = json.loads(gca_model.version_description or "{}").get("vlmtune", {})
        except (json.JSONDecodeError, AttributeError):
            extra = {}
        created = gca_model.version_create_time or gca_model.create_time
        version = int(gca_model.version_id)
        labelled = labelled or {}
        aliases = {a for a in gca_model.version_aliases if a not in labelled}
        aliases |= {a for a, v in labelled.items() if v == version}
        if labelled.get(CHAMPION) == version:
            aliases.add("default")  # moved with the champion
        return ModelVersion(
            name=name,
            version=version,
            model_uri=gca_model.artifact_uri,
            content_hash=extra.get("content_hash") or gca_model.labels.get(HASH_LABEL, ""),
            metrics=extra.get("metrics", {}),
            lineage=extra.get("lineage", {}),
            aliases=sorted(aliases),
            card_uri=extra.get("card_uri"),
            created_at=created.isoformat() if created else "",
            source_uri=extra.get("source_uri"),
            artifact=extra.get("artifact") or {},
        )

    # ---- aliases: model-level labels under an etag -----------------------------------------------------------------
    @staticmethod
    def _alias_label(alias: str) -> str:
        key = ALIAS_LABEL_PREFIX + check_alias(alias)  # aliases are [a-z0-9-]: valid label keys as they are
        if len(key) > 63:
            raise RegistryError(f"alias {alias!r} is too long for Vertex (labels hold at most 63 characters): use at "
                                f"most {63 - len(ALIAS_LABEL_PREFIX)} characters")
        return key

    def _model_state(self, parent_name: str):
        """The model-level read that a label update is guarded by: (gca Model with labels and etag, labelled)."""
        model = self._client(parent_name).get_model(name=parent_name)
        labelled = {key[len(ALIAS_LABEL_PREFIX):]: int(value)
                    for key, value in model.labels.items() if key.startswith(ALIAS_LABEL_PREFIX) and value.isdigit()}
        return model, labelled

    def _client(self, parent_name: str):
        from google.cloud.aiplatform import models

        return models.ModelRegistry(parent_name, **self._common()).client

    def _vertex_alias_target(self, parent_name: str, alias: str) -> int | None:
        """Where Vertex's own alias points (models registered before the labels); None if nowhere."""
        from google.api_core.exceptions import NotFound

        try:
            return int(self._client(parent_name).get_model(name=f"{parent_name}@{alias}").version_id)
        except NotFound:
            return None

    def _move(self, name: str, alias: str, version: int, expected: int | None, *, conditional: bool,
              parent_name: str | None = None) -> Promotion:
        from google.api_core.exceptions import Aborted, FailedPrecondition
        from google.cloud.aiplatform.compat.types import model as gca_model_compat
        from google.protobuf import field_mask_pb2

        key = self._alias_label(alias)
        if parent_name is None:
            parent = self.find_model(name)
            parent_name = parent.resource_name if parent is not None else None
        if parent_name is None or self._get_in(parent_name, name, int(version)) is None:
            raise RegistryError(f"{self!r}: cannot point {alias!r} at version {version} of {name!r}: no such version")
        client = self._client(parent_name)
        for _ in range(self.max_promote_attempts):
            model, labelled = self._model_state(parent_name)
            current = labelled[alias] if alias in labelled else self._vertex_alias_target(parent_name, alias)
            if conditional and current != expected:
                return Promotion(name, alias, int(version), expected, current)
            if current != int(version) or alias not in labelled:
                # Model-level labels only: version labels (hash, lineage) come merged into this read.
                labels = {k: v for k, v in model.labels.items() if k != HASH_LABEL and not k.startswith("lineage_")}
                labels[key] = str(int(version))
                try:
                    client.update_model(
                        model=gca_model_compat.Model(name=parent_name, labels=labels, etag=model.etag),
                        update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
                    )
                except (Aborted, FailedPrecondition):
                    continue  # the etag is stale: another run changed the model meanwhile; read again, decide again
            # The label is the truth; Vertex's alias (and `default` for the champion) follows it.
            client.merge_version_aliases(name=f"{parent_name}@{int(version)}",
                                         version_aliases=[alias, "default"] if alias == CHAMPION else [alias])
            return Promotion(name, alias, int(version), expected, int(version))
        raise RegistryError(f"{self!r}: could not move {alias!r} of {name!r} after {self.max_promote_attempts} tries: "
                            f"the model keeps changing under us (etag mismatches); try again")

    # ---- Registry interface --------------------------------------------------------------------------------------
    def list_versions(self, name: str) -> list[ModelVersion]:
        parent = self.find_model(name)
        if parent is None:
            return []
        _, labelled = self._model_state(parent.resource_name)
        return sorted((self._to_version(name, m, labelled) for m in self._versions(parent.resource_name)),
                      key=lambda v: v.version)

    def get(self, name: str, ref: str | int) -> ModelVersion | None:
        ref = parse_ref(ref)
        parent = self.find_model(name)
        if parent is None:
            return None
        if ref == LATEST:
            versions = self.list_versions(name)
            return versions[-1] if versions else None
        return self._get_in(parent.resource_name, name, ref)

    def _get_in(self, parent_name: str, name: str, ref: int | str) -> ModelVersion | None:
        from google.api_core.exceptions import NotFound
        from google.cloud import aiplatform

        _, labelled = self._model_state(parent_name)
        if isinstance(ref, str):
            ref = labelled.get(check_alias(ref), ref)  # a labelled alias: the label says where it points
        try:
            model = aiplatform.Model(parent_name, version=str(ref), **self._common())
        except NotFound:
            return None
        return self._to_version(name, model.gca_resource, labelled)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._move(name, alias, version, None, conditional=False)

    def promote(self, name: str, version: int, *, expected: int | None, alias: str = CHAMPION) -> Promotion:
        return self._move(name, alias, version, None if expected is None else int(expected), conditional=True)

    def register(
        self,
        name: str,
        model_uri: str,
        *,
        content_hash: str,
        metrics: dict,
        lineage: dict,
        card: str,
        make_champion: bool = True,
    ) -> ModelVersion:
        from google.api_core.exceptions import AlreadyExists
        from google.cloud import aiplatform

        check_name(name)
        check_content_hash(content_hash)
        if not storage.is_remote(model_uri):
            raise RegistryError(
                f"Vertex AI reads models from Cloud Storage, but {model_uri!r} is local: write the model to a gs:// "
                f"URI (run the pipeline with a gs:// pipeline root) or register into a local registry instead."
            )
        parent = self.find_model(name)
        if parent is not None:
            # The label holds a truncated hash, so it only narrows the search; the full hash decides.
            candidates = self._versions(
                parent.resource_name, filter=f'labels.{HASH_LABEL}="{sanitize_label(content_hash)}"'
            )
            same = [v for v in (self._to_version(name, m) for m in candidates) if v.content_hash == content_hash]
            if same:
                return self._get_in(parent.resource_name, name, min(v.version for v in same))

        folder = registry_copy_folder(self.artifact_root, model_uri, name, content_hash)
        artifact_uri, digest = copy_once(model_uri, folder) if folder else (model_uri, {})
        if folder and not storage.is_remote(artifact_uri):
            raise RegistryError(f"Vertex AI reads models from Cloud Storage, but artifact_root {self.artifact_root!r} "
                                f"is local: set artifact_root to a gs:// prefix (or none)")
        card_uri = None
        if self.card_root or folder:
            card_uri = (storage.join(self.card_root, name, content_hash[:16], "README.md") if self.card_root
                        else storage.join(folder, "README.md"))
            storage.write_text(card_uri, card)
        description = json.dumps(
            {"vlmtune": {"content_hash": content_hash, "metrics": metrics, "lineage": lineage, "card_uri": card_uri,
                         "source_uri": model_uri, "artifact": digest}},
            sort_keys=True, default=str,
        )
        def upload(parent_name: str | None):
            return aiplatform.Model.upload(
                display_name=name,
                artifact_uri=artifact_uri,
                parent_model=parent_name,
                model_id=None if parent_name else model_id_for(name),
                # Vertex needs exactly one default version: the first upload is; later ones only via promotion.
                is_default_version=parent_name is None,
                # No alias here: aliases move only under the etag guard (_move), so none moves unchecked.
                version_aliases=[],
                version_description=description,
                description=f"vlmtune fine-tune of {lineage.get('base_model') or 'a SmolVLM model'}",
                labels=lineage_labels(name, content_hash, lineage),
                serving_container_image_uri=self.serving_container_image_uri,
                sync=True,
                **self._common(),
            )

        try:
            model = upload(parent.resource_name if parent is not None else None)
        except AlreadyExists:
            # Another run created the model between our lookup and our upload: become a version of it.
            model = upload(f"projects/{self.project}/locations/{self.location}/models/{model_id_for(name)}")
        version, parent_name = int(model.gca_resource.version_id), model.resource_name
        if make_champion:
            self._move(name, CHAMPION, version, None, conditional=False, parent_name=parent_name)
        return self._get_in(parent_name, name, version)
