"""Register step core: put an evaluated model into a registry, only when its evaluation passed the gate.

    from components.register.core import run
    run(model_uri="gs://b/runs/7/dpo", evaluation_uri="gs://b/runs/7/eval", registry="gs://b/registry",
        name="chart-vlm", dataset_uri="gs://b/runs/7/data")

Reads the model artifact's manifest (``vlmtune.model``) and the evaluation's (``vlmtune.evaluation``), refuses a
failed evaluation, builds the lineage (base model, dataset content hash, config fingerprint, evaluation), writes a
model card and registers. Registering the same artifact again (same content hash) is a no-op that returns the
existing version, so a retried or re-scheduled pipeline never piles up duplicate versions.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from components.common import artifacts, storage
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND
from components.common.registry import CHAMPION, ModelVersion, RegistryError, open_registry
from components.register import model_card


class EvaluationFailedError(RegistryError):
    """The candidate did not pass the evaluation gate, so it must not be registered."""


def model_content_hash(model_uri: str, manifest: dict[str, Any]) -> str:
    """The artifact's content hash: the manifest's own, else sha256 over its files (manifest excluded)."""
    if manifest.get("content_hash"):
        return str(manifest["content_hash"])
    prefix = storage.join(model_uri, "")
    files = [u for u in storage.list_files(model_uri)
             if u[len(prefix):].replace("\\", "/").lstrip("/") != artifacts.MANIFEST]
    if not files:
        raise RegistryError(f"model artifact {model_uri!r} holds no files besides its manifest: nothing to register")
    return artifacts.hash_files(sorted(files))


def _absolute(uri: str) -> str:
    """The portable spelling of an artifact URI, for records that outlive the run.

    KFP on Vertex hands components ``/gcs/BUCKET/path`` (a Cloud Storage FUSE mount) for ``gs://BUCKET/path``:
    the registry stores the ``gs://`` form, which Vertex serving and every other machine can read. Other local
    paths become absolute, since a registry outlives the working directory of the run that wrote it.
    """
    uri = str(uri)
    if uri.startswith("/gcs/"):
        return "gs://" + uri[len("/gcs/"):].rstrip("/")
    return uri if storage.is_remote(uri) else str(storage.to_local_path(uri).resolve())


def build_lineage(
    model_uri: str, model_manifest: dict, evaluation_uri: str, dataset_uri: str | None, dataset_manifest: dict | None
) -> dict[str, Any]:
    config = model_manifest.get("config") or {}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    lineage: dict[str, Any] = {
        "base_model": model_manifest.get("base_model"),
        "model_uri": model_uri,
        "evaluation_uri": evaluation_uri,
        "config_hash": config_hash,
    }
    if dataset_uri:
        lineage["dataset_uri"] = dataset_uri
        lineage["dataset_hash"] = (dataset_manifest or {}).get("content_hash")
    for key in ("pipeline_run", "stage", "parent_uri"):
        if model_manifest.get(key):
            lineage[key] = model_manifest[key]
    return lineage


def run(
    model_uri: str,
    evaluation_uri: str,
    registry: str,
    name: str,
    dataset_uri: str | None = None,
    make_champion: bool = True,
) -> dict:
    """Register ``model_uri`` as a new version of ``name`` in ``registry`` if its evaluation passed.

    Returns ``{"name", "version", "model_uri", "champion", "already_registered"}``.
    Raises :class:`EvaluationFailedError` when the evaluation did not pass.
    """
    model_uri, evaluation_uri = _absolute(model_uri), _absolute(evaluation_uri)
    evaluation = artifacts.read_manifest(evaluation_uri, kind=EVAL_KIND)
    if evaluation.get("passed") is not True:
        gate = evaluation.get("gate") if isinstance(evaluation.get("gate"), dict) else {}
        reasons = evaluation.get("reasons") or gate.get("reasons")
        reasons = [reasons] if isinstance(reasons, str) else reasons
        raise EvaluationFailedError(
            f"refusing to register {model_uri!r} as {name!r}: its evaluation {evaluation_uri!r} did not pass the gate "
            f"(passed={evaluation.get('passed')!r}, primary metric {evaluation.get('primary_metric')!r}"
            f"{'; reasons: ' + '; '.join(map(str, reasons)) if reasons else ''}). "
            f"Only a candidate that beats the base model and the current champion is registered; see the evaluation "
            f"report, improve the model or relax the gate's min_delta, and re-run."
        )
    model_manifest = artifacts.read_manifest(model_uri, kind=MODEL_KIND)
    dataset_manifest = None
    if dataset_uri:
        dataset_uri = _absolute(dataset_uri)
        dataset_manifest = artifacts.read_manifest(dataset_uri, kind=DATASET_KIND)
    content_hash = model_content_hash(model_uri, model_manifest)
    _check_evaluated_candidate(evaluation, evaluation_uri, model_uri, content_hash)
    lineage = build_lineage(model_uri, model_manifest, evaluation_uri, dataset_uri, dataset_manifest)
    metrics = dict(evaluation.get("metrics") or {})

    reg = open_registry(registry)
    existing = _find_existing(reg, name, content_hash)
    if existing is not None:
        return _result(existing, already_registered=True)

    card = model_card.render(
        name=name,
        model_uri=model_uri,
        content_hash=content_hash,
        base_model=model_manifest.get("base_model"),
        datasets=[dataset_uri] if dataset_uri else [],
        metrics=metrics,
        primary_metric=evaluation.get("primary_metric"),
        config=model_manifest.get("config") or {},
        lineage=lineage,
    )
    version = reg.register(
        name, model_uri, content_hash=content_hash, metrics=metrics, lineage=lineage, card=card,
        make_champion=make_champion,
    )
    # If another run registered the same artifact between the check above and register(), register() returns
    # that run's version; it is reported as newly registered (both runs asked for the same outcome).
    return _result(version, already_registered=False)


def _location(uri: str) -> str:
    return _absolute(str(uri).rstrip("/")).rstrip("/")


def _check_evaluated_candidate(evaluation: dict, evaluation_uri: str, model_uri: str, content_hash: str) -> None:
    """Refuse to register a model other than the one the evaluation judged (a miswired pipeline or CLI call)."""
    candidate_uri = evaluation.get("candidate_uri")
    if not candidate_uri or _location(candidate_uri) == _location(model_uri):
        return
    try:  # a copy of the same artifact elsewhere is still the evaluated model
        candidate_hash = model_content_hash(candidate_uri, artifacts.read_manifest(candidate_uri, kind=MODEL_KIND))
    except (FileNotFoundError, artifacts.IncompleteArtifactError, RegistryError):
        candidate_hash = None
    if candidate_hash != content_hash:
        raise RegistryError(
            f"evaluation {evaluation_uri!r} judged the model at {candidate_uri!r}, not {model_uri!r} (and their "
            f"contents differ): pass the evaluation of this model, or the model that evaluation judged."
        )


def _find_existing(reg, name: str, content_hash: str) -> ModelVersion | None:
    finder = getattr(reg, "find_by_hash", None)
    if finder is not None:
        return finder(name, content_hash)
    return next((v for v in reg.list_versions(name) if v.content_hash == content_hash), None)


def _result(version: ModelVersion, *, already_registered: bool) -> dict:
    return {
        "name": version.name,
        "version": version.version,
        "model_uri": version.model_uri,
        "champion": CHAMPION in version.aliases,
        "already_registered": already_registered,
    }
