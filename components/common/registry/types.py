"""The model-registry contract: what a version is, what every backend offers, and the names and references.

A registry holds named models; each registration of a new artifact becomes a numbered version that points at
the model where it already lies (``model_uri``: nothing is copied) and carries its metrics, lineage and a
model card. Aliases name versions; ``champion`` is the one evaluation compares against and serving uses.
``latest`` is not stored: it always means the highest version number.

This module is shared by the backends (``local``, ``vertex``, ``kubeflow`` beside it), the factory that picks
one (:mod:`components.common.registry.factory`) and every step that reads or writes a registry (register,
evaluate, predict, the pipeline's snapshot check). It imports no backend and no factory, so backends can
import it without an import circle.

Model references (:func:`parse_reference`; resolved by ``factory.resolve_reference``, used by
``vlmtune predict --model`` and evaluation)::

    [REGISTRY::]NAME@REF

    REGISTRY   a registry target (see ``factory.open_registry``); when omitted, the ``VLMTUNE_REGISTRY``
               environment variable
    NAME       the registered name: letters, digits, ``.``, ``_``, ``-`` (no ``/``, so paths and hub ids never
               look like references)
    REF        a version number (``3``), ``latest``, ``champion`` or another alias

    e.g.  gs://acme-ml/registry::chart-vlm@champion   /srv/registry::chart-vlm@3   chart-vlm@latest
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

CHAMPION = "champion"
LATEST = "latest"
REGISTRY_ENV = "VLMTUNE_REGISTRY"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
REFERENCE_RE = re.compile(r"^(?:(?P<registry>.+)::)?(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<ref>[A-Za-z0-9][A-Za-z0-9._-]*)$")


class RegistryError(RuntimeError):
    """A registry operation cannot be done as asked; the message says why and what to do."""


@dataclass
class ModelVersion:
    name: str
    version: int
    model_uri: str
    content_hash: str
    metrics: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    card_uri: str | None = None
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelVersion":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def is_champion(self) -> bool:
        return CHAMPION in self.aliases


class Registry(Protocol):
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
        """Add a version (idempotent on ``content_hash``: a known artifact returns its existing version)."""
        ...

    def get(self, name: str, ref: str | int) -> ModelVersion | None:
        """A version by number, ``"latest"``, ``"champion"`` or another alias; None when there is none."""
        ...

    def list_versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first."""
        ...

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` at ``version`` (moving it from wherever it was)."""
        ...


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(
            f"model name {name!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit (e.g. 'chart-vlm')."
        )
    return name


def check_alias(alias: str) -> str:
    if alias == LATEST or not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise RegistryError(
            f"alias {alias!r} is not valid: use a lowercase letter then up to 62 lowercase letters, digits or '-' "
            f"(e.g. 'champion', 'staging'); 'latest' is reserved (it always means the highest version)."
        )
    return alias


def parse_ref(ref: str | int) -> int | str:
    """``3``/``"3"`` -> 3; ``"latest"``/aliases stay strings."""
    if isinstance(ref, bool):
        raise RegistryError(f"version reference {ref!r} is not valid")
    if isinstance(ref, int):
        return ref
    ref = str(ref).strip()
    if ref.lstrip("v").isdigit():
        return int(ref.lstrip("v"))
    return ref


def parse_reference(ref: str) -> tuple[str | None, str, int | str] | None:
    """``"[REGISTRY::]NAME@REF"`` -> (registry or None, name, version number or alias); None if not that form."""
    m = REFERENCE_RE.match(str(ref).strip())
    if not m:
        return None
    return m["registry"], m["name"], parse_ref(m["ref"])
