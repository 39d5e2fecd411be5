"""The model registry: one small interface with three backends, shared by every step that reads or writes models.

    from components.common.registry import open_registry, resolve_reference, current_champion, CHAMPION

- ``types``: ``ModelVersion``, the ``Registry`` protocol, ``RegistryError``, name/alias checks and the
  ``[REGISTRY::]NAME@REF`` reference grammar;
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
    Registry,
    RegistryError,
    check_alias,
    check_name,
    parse_ref,
    parse_reference,
)

__all__ = [
    "ALIAS_RE",
    "CHAMPION",
    "LATEST",
    "NAME_RE",
    "REFERENCE_RE",
    "REGISTRY_ENV",
    "ModelVersion",
    "Registry",
    "RegistryError",
    "check_alias",
    "check_name",
    "current_champion",
    "open_registry",
    "parse_ref",
    "parse_reference",
    "resolve_reference",
]
