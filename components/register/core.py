"""Register step core: put an evaluated model into a registry, only when its evaluation passed the gate.

    from components.register.core import run
    run(model_uri="gs://b/runs/7/dpo", evaluation_uri="gs://b/runs/7/eval", registry="gs://b/registry",
        name="chart-vlm", dataset_uri="gs://b/runs/7/data")

Reads the model artifact's manifest (``vlmtune.model``) and the evaluation's (``vlmtune.evaluation``), refuses a
failed evaluation, builds the lineage (base model, dataset content hash, config fingerprint, evaluation), writes a
model card and registers: the registry copies the model into its own storage, so the version outlives the
pipeline root it came from. Registering the same artifact again (same content hash) returns the existing
version (copied once), so a retried or re-scheduled pipeline never piles up duplicate versions.

Promotion is compare-and-set. The evaluation records the champion it compared the candidate with (a version,
or none); the candidate becomes champion only if that is still the champion when it is registered, checked
and moved atomically by the registry (:meth:`Registry.promote`). Otherwise the version is registered without
the alias and the result says why (``reason``; the CLI exits with :data:`EXIT_NOT_PROMOTED`): a model
evaluated against an empty registry, or against a champion that has since been replaced, never dethrones a
champion it was not compared with. Of several registrations racing from the same champion exactly one
reports ``"champion": true``.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from components.common import artifacts, storage
from components.common.schema import DATASET_KIND, EVAL_KIND, MODEL_KIND
from components.common.registry import CHAMPION, ModelVersion, Promotion, RegistryError, open_registry, registry_identity
from components.register import model_card

#: The CLI's exit status when the version was registered but not made champion (the champion changed).
EXIT_NOT_PROMOTED = 4


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
    """Register ``model_uri`` as a new version of ``name`` in ``registry`` if its evaluation passed, and make it
    champion if the champion the evaluation compared with still is (``make_champion``).

    Returns ``{"name", "version", "model_uri", "source_uri", "champion", "already_registered",
    "champion_version", "evaluated_against", "reason"}``: ``model_uri`` is the registry's copy, ``champion``
    whether this version holds the champion alias now, ``champion_version`` the version that does,
    ``evaluated_against`` the champion the evaluation compared with (None: none) and ``reason`` why it was not
    promoted (None when it was, or when ``make_champion`` is false).
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
        version, already = existing, True
    else:
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
        # Registered without the alias; the promotion below is the only way the champion moves (compare-and-set).
        # If another run registered the same artifact meanwhile, register() returns that run's version; it is
        # reported as newly registered (both runs asked for the same outcome).
        version = reg.register(name, model_uri, content_hash=content_hash, metrics=metrics, lineage=lineage,
                               card=card, make_champion=False)
        already = False
    if not make_champion:
        holder = reg.get(name, CHAMPION)
        return _result(version, already, champion_version=holder.version if holder else None,
                       evaluated_against=None, reason=None)

    expected, refusal = expected_champion(evaluation, evaluation_uri, reg, registry, name)
    if refusal is not None:
        holder = reg.get(name, CHAMPION)
        current = holder.version if holder else None
        if current == version.version:
            return _result(version, already, champion_version=current, evaluated_against=expected, reason=None)
        return _result(version, already, champion_version=current, evaluated_against=expected,
                       reason=_not_promoted(name, version.version, registry, refusal))
    promotion = reg.promote(name, version.version, expected=expected)
    reason = None if promotion.promoted else _not_promoted(
        name, version.version, registry, _changed(reg, promotion, evaluation_uri))
    return _result(version, already, champion_version=promotion.current, evaluated_against=expected, reason=reason)


def expected_champion(evaluation: dict, evaluation_uri: str, reg, registry: str, name: str) -> tuple[int | None, str | None]:
    """(the champion version the evaluation compared with, None or why that comparison says nothing here).

    The comparison counts only for this registry and name, and only while that version number still holds
    the model that was scored (same content hash)."""
    recorded = evaluation.get("champion")
    where = evaluation.get("champion_registry")
    if isinstance(where, dict) and (registry_identity(str(where.get("registry", ""))) != registry_identity(registry)
                                    or where.get("name") != name):
        holder = reg.get(name, CHAMPION)
        if holder is None:
            return None, None  # nothing to dethrone here
        return None, (f"its evaluation ({evaluation_uri}) compared it with the champion of {where.get('name')!r} in "
                      f"{where.get('registry')!r}, not with this registry's champion (version {holder.version}, "
                      f"{holder.model_uri})")
    if not isinstance(recorded, dict):
        return None, None
    expected = int(recorded["version"])
    scored_hash = recorded.get("content_hash")
    if scored_hash:
        now = reg.get(name, expected)
        if now is None or now.content_hash != scored_hash:
            return expected, (f"its evaluation ({evaluation_uri}) compared it with version {expected} (content hash "
                              f"{str(scored_hash)[:12]}), but version {expected} of this registry "
                              f"{'no longer exists' if now is None else 'holds another model (' + now.content_hash[:12] + ')'}")
    return expected, None


def _describe(reg, name: str, version: int | None) -> str:
    if version is None:
        return "no champion"
    found = reg.get(name, version)
    return f"version {version} ({found.model_uri})" if found else f"version {version}"


def _changed(reg, promotion: Promotion, evaluation_uri: str) -> str:
    return (f"its evaluation ({evaluation_uri}) compared it with {_describe(reg, promotion.name, promotion.expected)}, "
            f"but the champion is now {_describe(reg, promotion.name, promotion.current)}")


def _not_promoted(name: str, version: int, registry: str, why: str) -> str:
    return (f"registered {name!r} version {version} without making it champion: {why}. To promote it, evaluate it "
            f"against the current champion (vlmtune evaluate ... --registry {registry} --registry-name {name}) and "
            f"register again, or promote it by hand: vlmtune registry promote --registry {registry} --name {name} "
            f"--version {version}")


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


def _result(version: ModelVersion, already_registered: bool, *, champion_version: int | None,
            evaluated_against: int | None, reason: str | None) -> dict:
    return {
        "name": version.name,
        "version": version.version,
        "model_uri": version.model_uri,
        "source_uri": version.source_uri,
        "champion": champion_version == version.version,
        "already_registered": already_registered,
        "champion_version": champion_version,
        "evaluated_against": evaluated_against,
        "reason": reason,
    }
