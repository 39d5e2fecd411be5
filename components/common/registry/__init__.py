"""The model registry: one small interface with three backends, shared by every step that reads or writes models.

    from components.common.registry import open_registry, resolve_reference, current_champion, CHAMPION

- ``types``: ``ModelVersion``, ``Promotion`` (what a compare-and-set promotion did), the ``Registry`` protocol,
  ``RegistryError``, name/alias checks, the ``[REGISTRY::]NAME@REF`` reference grammar and the copy of a model
  into the registry's own storage (``copy_artifact``);
- ``factory``: ``open_registry(target)``, ``resolve_reference(ref)``, ``current_champion(registry, name)``;
- ``local`` (folder or ``gs://`` prefix), ``vertex`` (Vertex AI Model Registry), ``kubeflow`` (Kubeflow Model
  Registry): the backends, imported by the factory only when a target names them, so the local backend never
  pays for (or needs) aiplatform or model-registry.

It lives in ``common`` rather than in the register step because register writes it, evaluate reads the
champion, predict resolves references and the pipeline's snapshot check reads the champion's lineage.
"""
from components.common.registry.factory import current_champion, open_registry, resolve_reference
from components.common.registry.types import (
    ALIAS_RE,
    CHAMPION,
    LATEST,
    NAME_RE,
    REFERENCE_RE,
    REGISTRY_ENV,
    ModelVersion,
    Promotion,
    Registry,
    RegistryError,
    check_alias,
    check_name,
    parse_ref,
    parse_reference,
    registry_identity,
)

__all__ = [
    "ALIAS_RE",
    "CHAMPION",
    "LATEST",
    "NAME_RE",
    "REFERENCE_RE",
    "REGISTRY_ENV",
    "ModelVersion",
    "Promotion",
    "Registry",
    "RegistryError",
    "check_alias",
    "check_name",
    "current_champion",
    "open_registry",
    "parse_ref",
    "parse_reference",
    "registry_identity",
    "resolve_reference",
]
