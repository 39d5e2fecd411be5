"""Open a registry from a target URI, resolve ``[REGISTRY::]NAME@REF`` references, find the current champion.

Registry targets (:func:`open_registry`)::

    /path/to/registry  or  file:///path  or  gs://bucket/prefix   -> local backend (components.common.storage)
    vertex://projects/PROJECT/locations/LOCATION[?OPTIONS]        -> Vertex AI Model Registry
    kubeflow://HOST:PORT[?OPTIONS]                                -> Kubeflow Model Registry (plain HTTP;
                                                                     is_secure=true for TLS)

``OPTIONS`` are the backend's keyword options as a query string, so a pipeline parameter (one string) can carry
them, e.g. ``vertex://projects/p/locations/us-central1?artifact_root=gs://acme-ml/registry-artifacts``.
Options passed to :func:`open_registry` as keywords win over the query. ``true``/``false`` become booleans.

The reference grammar is in :mod:`components.common.registry.types`. This is the only module that imports the
backends; the backends import only ``types``, never this module, so the dispatch has no import circle.
"""
from __future__ import annotations

import inspect
import os
import re
from typing import Callable
from urllib.parse import parse_qsl

from components.common.registry.types import (
    CHAMPION,
    REGISTRY_ENV,
    ModelVersion,
    Registry,
    RegistryError,
    parse_reference,
)


def _local(root: str, **options) -> Registry:
    from components.common.registry.local import LocalRegistry
    return LocalRegistry(root, **options)


def _vertex(project: str, location: str, **options) -> Registry:
    from components.common.registry.vertex import VertexRegistry
    return VertexRegistry(project=project, location=location, **options)


def _kubeflow(host: str, port: int, **options) -> Registry:
    from components.common.registry.kubeflow import KubeflowRegistry
    return KubeflowRegistry(host=host, port=port, **options)


# Imports stay lazy so the local backend never pays for (or needs) aiplatform or model-registry.
BACKENDS: dict[str, Callable[..., Registry]] = {"local": _local, "vertex": _vertex, "kubeflow": _kubeflow}

_VERTEX_RE = re.compile(r"^vertex://projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/?$")
_KUBEFLOW_RE = re.compile(r"^kubeflow://(?P<host>[^:/]+)(?::(?P<port>\d+))?/?$")


def _query_options(target: str, backend: str, options: dict) -> tuple[str, dict]:
    """Split ``URI?k=v&...`` into the URI and the backend options (keywords given in code win)."""
    uri, _, query = target.partition("?")
    parsed: dict = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        parsed[key] = {"true": True, "false": False}.get(value.lower(), value)
    if query and not parsed:
        raise RegistryError(f"{target!r}: cannot read the options after '?'; write them as ?key=value&key=value")
    merged = {**parsed, **options}
    if backend == "vertex":
        from components.common.registry.vertex import VertexRegistry as backend_class
    else:
        from components.common.registry.kubeflow import KubeflowRegistry as backend_class
    accepted = set(inspect.signature(backend_class.__init__).parameters) - {"self", "project", "location", "host", "port"}
    unknown = sorted(set(merged) - accepted)
    if unknown:
        raise RegistryError(f"{target!r}: unknown {backend} registry option(s) {unknown}; known: {sorted(accepted)}")
    return uri, merged


def open_registry(target: str, **options) -> Registry:
    """The registry a target URI names (see the module docstring). ``options`` go to the backend."""
    target = str(target).strip()
    if not target:
        raise RegistryError(f"no registry given: pass a folder, gs:// prefix, vertex:// or kubeflow:// URI, or set {REGISTRY_ENV}")
    if target.startswith("vertex://"):
        uri, options = _query_options(target, "vertex", options)
        m = _VERTEX_RE.match(uri)
        if not m:
            raise RegistryError(f"{target!r} is not a Vertex registry URI; expected vertex://projects/PROJECT/locations/LOCATION")
        return BACKENDS["vertex"](m["project"], m["location"], **options)
    if target.startswith("kubeflow://"):
        uri, options = _query_options(target, "kubeflow", options)
        m = _KUBEFLOW_RE.match(uri)
        if not m:
            raise RegistryError(f"{target!r} is not a Kubeflow registry URI; expected kubeflow://HOST:PORT")
        return BACKENDS["kubeflow"](m["host"], int(m["port"] or 8080), **options)
    if "://" in target and not target.startswith(("gs://", "file://")):
        raise RegistryError(
            f"{target!r}: unknown registry scheme; use a folder, file://, gs://, vertex:// or kubeflow:// URI"
        )
    return BACKENDS["local"](target, **options)


def resolve_reference(ref: str, **options) -> str | None:
    """The ``model_uri`` a registry reference points at, or None when ``ref`` is not a registry reference.

    None lets callers try the string as a folder, ``gs://`` URI or hub id instead. A string that *is* a
    reference but cannot be resolved (no registry known, unknown name or version) raises RegistryError.
    """
    parsed = parse_reference(ref)
    if parsed is None:
        return None
    registry, name, version_ref = parsed
    registry = registry or os.environ.get(REGISTRY_ENV)
    if not registry:
        raise RegistryError(
            f"{ref!r} is a registry reference without a registry: write it as REGISTRY::{name}@{version_ref} "
            f"(e.g. gs://bucket/registry::{name}@{version_ref}) or set {REGISTRY_ENV}."
        )
    version = open_registry(registry, **options).get(name, version_ref)
    if version is None:
        raise RegistryError(f"{ref!r}: registry {registry!r} has no version {version_ref!r} of model {name!r}. "
                            f"List what it has with `vlmtune registry list --registry {registry} --name {name}`.")
    return version.model_uri


def current_champion(registry: str, name: str) -> ModelVersion | None:
    """The version the ``champion`` alias points at, or None (no registry entry yet, or no champion)."""
    return open_registry(registry).get(name, CHAMPION)
