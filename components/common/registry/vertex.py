"""Vertex AI Model Registry backend (``vertex://projects/PROJECT/locations/LOCATION``), via ``google-cloud-aiplatform``.

How the registry's ideas map onto Vertex:
- a registered *name* is one Vertex ``Model`` resource (display name = name, label ``vlmtune_name``); each
  registration is a new version uploaded with ``Model.upload(parent_model=<that resource>)``;
- the version number is Vertex's ``version_id`` (Vertex allocates it server-side, so concurrent uploads get
  distinct numbers without any help from us);
- ``champion`` is a Vertex version alias. Vertex keeps aliases unique within a model: giving ``champion`` to
  the new version removes it from the old one, in the same upload call, so it moves only if the upload succeeds.
  A champion version is also made the ``default`` version (what serving uses when no version is named);
- lineage goes into labels (lowercase, ``[a-z0-9_-]``, at most 63 characters, so values are sanitised and
  truncated) for filtering in the console, and in full, with metrics and the card URI, into the version
  description as JSON, so :meth:`get` returns what was registered;
- the first registration of a name creates the Model with ``model_id`` = the sanitised name, so Vertex itself
  refuses a second model of that name: when two first registrations race, the loser gets ``AlreadyExists`` and
  uploads again as a new version of the winner's model;
- idempotency: the label ``vlmtune_content_hash`` (the hash truncated to 63 characters) is looked up with
  ``list_model_versions(filter=...)`` before uploading.

The model itself stays at ``model_uri`` (must be ``gs://``: Vertex reads artifacts from Cloud Storage). The card
is written to ``card_root`` when given (``<card_root>/<name>/<content_hash[:16]>/README.md``); the model folder is
never modified, because it is another step's finished artifact.
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
    RegistryError,
    check_alias,
    check_name,
    parse_ref,
)

# A Hugging Face PyTorch inference image on Vertex; configurable, because serving is the user's choice.
DEFAULT_SERVING_IMAGE = (
    "us-docker.pkg.dev/deeplearning-platform-release/gcr.io/"
    "huggingface-pytorch-inference-cu121.2-2.transformers.4-44.ubuntu2204.py311"
)
NAME_LABEL = "vlmtune_name"
HASH_LABEL = "vlmtune_content_hash"
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
        credentials=None,
    ):
        self.project, self.location = project, location
        self.serving_container_image_uri = serving_container_image_uri
        self.card_root = card_root
        self.credentials = credentials

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

    def _to_version(self, name: str, gca_model) -> ModelVersion:
        try:
            extra = json.loads(gca_model.version_description or "{}").get("vlmtune", {})
        except (json.JSONDecodeError, AttributeError):
            extra = {}
        created = gca_model.version_create_time or gca_model.create_time
        return ModelVersion(
            name=name,
            version=int(gca_model.version_id),
            model_uri=gca_model.artifact_uri,
            content_hash=extra.get("content_hash") or gca_model.labels.get(HASH_LABEL, ""),
            metrics=extra.get("metrics", {}),
            lineage=extra.get("lineage", {}),
            aliases=sorted(gca_model.version_aliases),
            card_uri=extra.get("card_uri"),
            created_at=created.isoformat() if created else "",
        )

    # ---- Registry interface --------------------------------------------------------------------------------------
    def list_versions(self, name: str) -> list[ModelVersion]:
        parent = self.find_model(name)
        if parent is None:
            return []
        return sorted((self._to_version(name, m) for m in self._versions(parent.resource_name)), key=lambda v: v.version)

    def get(self, name: str, ref: str | int) -> ModelVersion | None:
        from google.api_core.exceptions import NotFound
        from google.cloud import aiplatform

        ref = parse_ref(ref)
        parent = self.find_model(name)
        if parent is None:
            return None
        if ref == LATEST:
            versions = self.list_versions(name)
            return versions[-1] if versions else None
        try:
            model = aiplatform.Model(parent.resource_name, version=str(ref), **self._common())
        except NotFound:
            return None
        return self._to_version(name, model.gca_resource)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        from google.cloud.aiplatform import models

        check_alias(alias)
        parent = self.find_model(name)
        if parent is None:
            raise RegistryError(f"{self!r} has no model named {name!r}: register it before setting aliases")
        models.ModelRegistry(parent.resource_name, **self._common()).add_version_aliases(
            [alias, "default"] if alias == CHAMPION else [alias], version=str(version)
        )

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
                return min(same, key=lambda v: v.version)

        card_uri = None
        if self.card_root:
            card_uri = storage.join(self.card_root, name, content_hash[:16], "README.md")
            storage.write_text(card_uri, card)
        description = json.dumps(
            {"vlmtune": {"content_hash": content_hash, "metrics": metrics, "lineage": lineage, "card_uri": card_uri}},
            sort_keys=True, default=str,
        )
        def upload(parent_name: str | None):
            return aiplatform.Model.upload(
                display_name=name,
                artifact_uri=model_uri,
                parent_model=parent_name,
                model_id=None if parent_name else model_id_for(name),
                # Vertex needs exactly one default version: the first upload always is, later ones when champion.
                is_default_version=make_champion or parent_name is None,
                version_aliases=[CHAMPION] if make_champion else [],
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
        return self._to_version(name, model.gca_resource)
