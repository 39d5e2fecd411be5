"""Kubeflow Model Registry backend (``kubeflow://HOST:PORT``), via the ``model-registry`` PyPI client.

``pip install model-registry`` (0.3.x, pure Python: aiohttp + pydantic) installs cleanly beside our deps, so this
backend uses its ``ModelRegistry`` client (``register_model``, ``get_model_version``, ``update``...) rather than
hand-written REST calls. It is imported lazily: nothing else needs it.

How the registry's ideas map onto Kubeflow Model Registry:
- a name is a ``RegisteredModel``; each registration is a ``ModelVersion`` named ``"1"``, ``"2"``... with one
  ``ModelArtifact`` whose ``uri`` is the model's URI (the model is not copied);
- version numbers are chosen as max+1; the server refuses a duplicate version name within a model, so two
  racing registrations cannot both get N: the loser retries with N+1;
- Kubeflow Model Registry has no aliases, so aliases are custom properties of the RegisteredModel
  (``vlmtune_alias_champion = "3"``), written only after the version and its artifact exist;
- the version's custom properties hold ``vlmtune_content_hash`` (idempotency), the metrics as
  ``metric_<name>`` numbers (visible in the Kubeflow UI) and the full record (metrics, lineage, card URI)
  as JSON in ``vlmtune_record``.
"""
from __future__ import annotations

import json
import time
import warnings

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

HASH_PROPERTY = "vlmtune_content_hash"
RECORD_PROPERTY = "vlmtune_record"
ALIAS_PREFIX = "vlmtune_alias_"


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
        max_claim_attempts: int = 100,
    ):
        self.host, self.port, self.is_secure = host, port, is_secure
        self.author, self.user_token = author, user_token
        self.model_format_name, self.model_format_version = model_format_name, model_format_version
        self.card_root = card_root
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

    def _aliases(self, rm) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for key, value in ((rm.custom_properties or {}) if rm else {}).items():
            if key.startswith(ALIAS_PREFIX) and str(value).isdigit():
                out.setdefault(int(value), []).append(key[len(ALIAS_PREFIX):])
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
        )

    # ---- Registry interface --------------------------------------------------------------------------------------
    def list_versions(self, name: str) -> list[ModelVersion]:
        rm = self._registered_model(name)
        if rm is None:
            return []
        aliases = self._aliases(rm)
        versions = [self._to_version(name, mv, aliases) for mv in self._raw_versions(name)]
        return sorted((v for v in versions if v is not None), key=lambda v: v.version)

    def get(self, name: str, ref: str | int) -> ModelVersion | None:
        ref = parse_ref(ref)
        rm = self._registered_model(name)
        if rm is None:
            return None
        aliases = self._aliases(rm)
        if ref == LATEST:
            versions = self.list_versions(name)
            return versions[-1] if versions else None
        if isinstance(ref, str):
            target = (rm.custom_properties or {}).get(ALIAS_PREFIX + check_alias(ref))
            if target is None:
                return None
            ref = int(target)
        mv = self.client.get_model_version(name, str(ref))
        return self._to_version(name, mv, aliases) if mv is not None else None

    def set_alias(self, name: str, alias: str, version: int) -> None:
        check_alias(alias)
        rm = self._registered_model(name)
        if rm is None or self.client.get_model_version(name, str(int(version))) is None:
            raise RegistryError(f"{self!r}: cannot point {alias!r} at version {version} of {name!r}: no such version")
        rm.custom_properties = {**(rm.custom_properties or {}), ALIAS_PREFIX + alias: str(int(version))}
        self.client.update(rm)

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
        existing = self._raw_versions(name)
        for mv in existing:
            if (mv.custom_properties or {}).get(HASH_PROPERTY) == content_hash:
                found = self._to_version(name, mv, self._aliases(self._registered_model(name)))
                if found is not None:
                    return found

        card_uri = None
        if self.card_root:
            card_uri = storage.join(self.card_root, name, content_hash[:16], "README.md")
            storage.write_text(card_uri, card)
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record = {"model_uri": model_uri, "metrics": metrics, "lineage": lineage, "card_uri": card_uri,
                  "created_at": created_at}
        metadata = {
            HASH_PROPERTY: content_hash,
            RECORD_PROPERTY: json.dumps(record, sort_keys=True, default=str),
            **{f"metric_{k}": v for k, v in _flatten_numbers(metrics, "").items()},
        }
        number = max((int(mv.name) for mv in existing if str(mv.name).isdigit()), default=0) + 1
        for _ in range(self.max_claim_attempts):
            try:
                self.client.register_model(
                    name, model_uri, version=str(number), model_format_name=self.model_format_name,
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
        return ModelVersion(name=name, version=number, model_uri=model_uri, content_hash=content_hash,
                            metrics=dict(metrics), lineage=dict(lineage), aliases=[CHAMPION] if make_champion else [],
                            card_uri=card_uri, created_at=created_at)
