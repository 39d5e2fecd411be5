"""Kubeflow Model Registry backend (``kubeflow://HOST:PORT``), via the ``model-registry`` PyPI client.

``pip install model-registry`` (0.3.x, pure Python: aiohttp + pydantic) installs cleanly beside our deps, so this
backend uses its ``ModelRegistry`` client (``register_model``, ``get_model_version``, ``update``...) rather than
hand-written REST calls. It is imported lazily: nothing else needs it.

How the registry's ideas map onto Kubeflow Model Registry:
- a name is a ``RegisteredModel``; each registration is a ``ModelVersion`` named ``"1"``, ``"2"``... with one
  ``ModelArtifact`` whose ``uri`` is the registry's copy of the model: ``<artifact_root>/<name>/<content_hash>/
  model/`` (manifest last, then ``copy.json`` beside it). ``artifact_root`` defaults to ``gs://<the model's
  bucket>/vlmtune-registry``; ``artifact_root="none"`` keeps the model where it is;
- version numbers are chosen as max+1; the server refuses a duplicate version name within a model, so two
  racing registrations cannot both get N: the loser retries with N+1;
- aliases: Kubeflow Model Registry has none, and no conditional update either, so each move of an alias is a
  create-only ``ModelVersion`` of the same model named ``vlmtune-alias-<alias>-<K>`` (custom properties: the
  version it points at and the previous one). The server's refusal of a duplicate version name is the
  compare-and-set: a run reads the newest move K, checks it names the version it expects, and creates K+1; of
  several racing runs that read K exactly one creates K+1 (:meth:`KubeflowRegistry.promote`). The newest move
  is where the alias points. These bookkeeping versions are not vlmtune versions (their names are not
  numbers), so listings skip them. After each move the RegisteredModel's custom property
  ``vlmtune_alias_<alias>`` is set too, for the Kubeflow UI; it is what models registered before the moves
  are read by, and only until their first move;
- the version's custom properties hold ``vlmtune_content_hash`` (idempotency), the metrics as
  ``metric_<name>`` numbers (visible in the Kubeflow UI) and the full record (metrics, lineage, card URI,
  source URI, the copy's digest) as JSON in ``vlmtune_record``.
"""
from __future__ import annotations

import json
import re
import time
import warnings

from components.common import storage
from components.common.registry.types import (
    CHAMPION,
    LATEST,
    ModelVersion,
    Promotion,
    RegistryError,
    artifact_root_option,
    check_alias,
    check_content_hash,
    check_name,
    copy_once,
    parse_ref,
    registry_copy_folder,
)

HASH_PROPERTY = "vlmtune_content_hash"
RECORD_PROPERTY = "vlmtune_record"
ALIAS_PREFIX = "vlmtune_alias_"
MOVE_PREFIX = "vlmtune-alias-"  # + "<alias>-<K>": the K-th move of an alias, a create-only ModelVersion
MOVE_VERSION = "vlmtune_alias_version"
MOVE_PREVIOUS = "vlmtune_alias_previous"


def _flatten_numbers(d: dict, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class KubeflowRegistry:
    def __init__(
        self,
        host: str,
        port: int = 8080,
        *,
        author: str = "vlmtune",
        is_secure: bool = False,
        user_token: str | None = None,
        model_format_name: str = "idefics3",
        model_format_version: str = "1",
        card_root: str | None = None,
        artifact_root: str | None = "auto",
        max_claim_attempts: int = 100,
    ):
        self.host, self.port, self.is_secure = host, port, is_secure
        self.author, self.user_token = author, user_token
        self.model_format_name, self.model_format_version = model_format_name, model_format_version
        self.card_root = card_root
        self.artifact_root = artifact_root_option(artifact_root)
        self.max_claim_attempts = max_claim_attempts
        self._client = None

    def __repr__(self) -> str:
        return f"KubeflowRegistry({self.host}:{self.port})"

    @property
    def client(self):
        """The ``model_registry.ModelRegistry`` client (connects, and checks the server, on first use)."""
        if self._client is None:
            try:
                from model_registry import ModelRegistry
            except ImportError as e:
                raise RegistryError(
                    "the kubeflow registry backend needs the Kubeflow Model Registry client: "
                    "`pip install model-registry`"
                ) from e
            scheme = "https" if self.is_secure else "http"
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="User access token is missing")
                try:
                    self._client = ModelRegistry(f"{scheme}://{self.host}", self.port, author=self.author,
                                                 is_secure=self.is_secure, user_token=self.user_token)
                except Exception as e:
                    raise RegistryError(
                        f"cannot reach the Kubeflow Model Registry at {scheme}://{self.host}:{self.port}: {e}. "
                        f"Check the host/port (kubectl port-forward svc/model-registry-service 8080:8080) and TLS."
                    ) from e
        return self._client

    # ---- helpers -----------------------------------------------------------------------------------------------
    def _registered_model(self, name: str):
        return self.client.get_registered_model(check_name(name))

    def _raw_versions(self, name: str) -> list:
        from model_registry.exceptions import StoreError

        try:
            return list(self.client.get_model_versions(name))
        except StoreError:  # the model does not exist
            return []

    def _alias_heads(self, name: str, rm=None, raw: list | None = None) -> dict[str, tuple[int, int | None]]:
        """alias -> (number of its newest move, version it points at); legacy properties count as move 0."""
        raw = self._raw_versions(name) if raw is None else raw
        pattern = re.compile(rf"^{re.escape(MOVE_PREFIX)}(?P<alias>[a-z][a-z0-9-]*)-(?P<k>\d+)$")
        heads: dict[str, tuple[int, int | None]] = {}
        for mv in raw:
            m = pattern.match(str(mv.name))
            if not m or (m["alias"] in heads and heads[m["alias"]][0] > int(m["k"])):
                continue
            target = str((mv.custom_properties or {}).get(MOVE_VERSION, ""))
            heads[m["alias"]] = (int(m["k"]), int(target) if target.isdigit() else None)
        for key, value in ((rm.custom_properties or {}) if rm else {}).items():
            alias = key[len(ALIAS_PREFIX):]
            if key.startswith(ALIAS_PREFIX) and str(value).isdigit() and alias not in heads:
                heads[alias] = (0, int(value))
        return heads

    def _aliases(self, name: str, rm=None, raw: list | None = None) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for alias, (_, version) in self._alias_heads(name, rm, raw).items():
            if version is not None:
                out.setdefault(version, []).append(alias)
        return {k: sorted(v) for k, v in out.items()}
    def _to_version(self, name: str, mv, aliases: dict[int, list[str]]) -> ModelVersion | None:
        if not str(mv.name).isdigit():
            return None  # a version not named by vlmtune
        props = mv.custom_properties or {}
        try:
            record = json.loads(props.get(RECORD_PROPERTY) or "{}")
        except json.JSONDecodeError:
            record = {}
        model_uri = record.get("model_uri")
        if not model_uri:
            artifact = self.client.get_model_artifact(name, mv.name)
            model_uri = artifact.uri if artifact else ""
        created = mv.create_time_since_epoch
        return ModelVersion(
            name=name,
            version=int(mv.name),
            model_uri=model_uri,
            content_hash=str(props.get(HASH_PROPERTY, "")),
            metrics=record.get("metrics", {}),
            lineage=record.get("lineage", {}),
            aliases=aliases.get(int(mv.name), []),
            card_uri=record.get("card_uri"),
            created_at=record.get("created_at")
            or (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(created) / 1000)) if created else ""),
            source_uri=record.get("source_uri"),
            artifact=record.get("artifact") or {},
        )

    # ---- Registry interface --------------------------------------------------------------------------------------
    def list_versions(self, name: str) -> list[ModelVersion]:
        rm = self._registered_model(name)
        if rm is None:
            return []
        raw = self._raw_versions(name)
        aliases = self._aliases(name, rm, raw)
        versions = [self._to_version(name, mv, aliases) for mv in raw]
        return sorted((v for v in versions if v is not None), key=lambda v: v.version)

    def get(self, name: str, ref: str | int) -> ModelVersion | None:
        ref = parse_ref(ref)
        rm = self._registered_model(name)
        if rm is None:
            return None
        if ref == LATEST:
            versions = self.list_versions(name)
            return versions[-1] if versions else None
        raw = self._raw_versions(name)
        if isinstance(ref, str):
            _, target = self._alias_heads(name, rm, raw).get(check_alias(ref), (0, None))
            if target is None:
                return None
            ref = target
        mv = next((v for v in raw if str(v.name) == str(int(ref))), None)
        return self._to_version(name, mv, self._aliases(name, rm, raw)) if mv is not None else None

    def _move(self, name: str, alias: str, version: int, expected: int | None, *, conditional: bool) -> Promotion:
        from model_registry.exceptions import StoreError
        from mr_openapi.exceptions import ApiException

        check_alias(alias)
        rm = self._registered_model(name)
        if rm is None or self.client.get_model_version(name, str(int(version))) is None:
            raise RegistryError(f"{self!r}: cannot point {alias!r} at version {version} of {name!r}: no such version")
        target = self.client.get_model_artifact(name, str(int(version)))
        for _ in range(self.max_claim_attempts):
            rm = self._registered_model(name)
            seq, current = self._alias_heads(name, rm).get(alias, (0, None))
            if current == int(version) or (conditional and current != expected):
                return Promotion(name, alias, int(version), expected, current)
            try:
                # Create-only: the server refuses a second version of this name, so one run wins move seq+1.
                self.client.register_model(
                    name, target.uri if target else "", version=f"{MOVE_PREFIX}{alias}-{seq + 1}",
                    model_format_name=self.model_format_name, model_format_version=self.model_format_version,
                    author=self.author, version_description=f"vlmtune: alias {alias!r} -> version {int(version)}",
                    metadata={MOVE_VERSION: str(int(version)), MOVE_PREVIOUS: "" if current is None else str(current)},
                )
            except StoreError as e:
                if "already exists" not in str(e):
                    raise
                continue  # another run made move seq+1 first: read again, decide again
            except ApiException as e:
                if e.status not in (400, 409):  # the server's answer to a duplicate version name
                    raise
                continue
            # The Kubeflow UI shows the RegisteredModel's properties: mirror the move there (moves decide).
            rm = self._registered_model(name)
            rm.custom_properties = {**(rm.custom_properties or {}), ALIAS_PREFIX + alias: str(int(version))}
            self.client.update(rm)
            return Promotion(name, alias, int(version), expected, int(version))
        raise RegistryError(f"{self!r}: could not move {alias!r} of {name!r} after {self.max_claim_attempts} tries")

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
        from model_registry.exceptions import StoreError
        from mr_openapi.exceptions import ApiException

        check_name(name)
        check_content_hash(content_hash)
        existing = self._raw_versions(name)
        for mv in existing:
            if (mv.custom_properties or {}).get(HASH_PROPERTY) == content_hash:
                found = self._to_version(name, mv, self._aliases(name, self._registered_model(name), existing))
                if found is not None:
                    return found

        folder = registry_copy_folder(self.artifact_root, model_uri, name, content_hash)
        artifact_uri, digest = copy_once(model_uri, folder) if folder else (model_uri, {})
        card_uri = None
        if self.card_root or folder:
            card_uri = (storage.join(self.card_root, name, content_hash[:16], "README.md") if self.card_root
                        else storage.join(folder, "README.md"))
            storage.write_text(card_uri, card)
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {"model_uri": artifact_uri, "metrics": metrics, "lineage": lineage, "card_uri": card_uri,
                  "created_at": created_at, "source_uri": model_uri, "artifact": digest}
        metadata = {
            HASH_PROPERTY: content_hash,
            RECORD_PROPERTY: json.dumps(record, sort_keys=True, default=str),
            **{f"metric_{k}": v for k, v in _flatten_numbers(metrics, "").items()},
        }
        number = max((int(mv.name) for mv in existing if str(mv.name).isdigit()), default=0) + 1
        for _ in range(self.max_claim_attempts):
            try:
                self.client.register_model(
                    name, artifact_uri, version=str(number), model_format_name=self.model_format_name,
                    model_format_version=self.model_format_version, author=self.author,
                    version_description=f"vlmtune fine-tune of {lineage.get('base_model') or 'a SmolVLM model'}",
                    metadata=metadata,
                )
                break
            except StoreError as e:
                if "already exists" not in str(e):
                    raise
            except ApiException as e:
                if e.status not in (400, 409):  # the server's answer to a duplicate version name
                    raise
            number += 1  # another registration took this number first
        else:
            raise RegistryError(f"{self!r}: no free version number for {name!r} after {self.max_claim_attempts} tries")

        if make_champion:
            self.set_alias(name, CHAMPION, number)
        return ModelVersion(name=name, version=number, model_uri=artifact_uri, content_hash=content_hash,
                            metrics=dict(metrics), lineage=dict(lineage), aliases=[CHAMPION] if make_champion else [],
                            card_uri=card_uri, created_at=created_at, source_uri=model_uri, artifact=digest)
