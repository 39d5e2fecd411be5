"""The model-registry contract: what a version is, what every backend offers, and the names and references.

A registry holds named models; each registration of a new artifact becomes a numbered version. The registry
keeps its own copy of the model (``model_uri`` points at that copy, ``source_uri`` at where it was registered
from; :func:`copy_artifact`), so cleaning a pipeline root never loses a registered model, and each version
carries its content hash, metrics, lineage and a model card. Aliases name versions; ``champion`` is the one
evaluation compares against and serving uses. ``latest`` is not stored: it always means the highest version.

Promotion is compare-and-set (:meth:`Registry.promote`): an alias moves to a version only if it still points
at the version the caller expected (for the register step: the champion its evaluation compared with), under
the backend's own atomic primitive (a create-only object locally and on ``gs://``, an etag-guarded update on
Vertex, a create-only version name on Kubeflow). Of several racing promotions from the same state exactly
one succeeds; the others get a :class:`Promotion` that names the version now holding the alias.

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
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from components.common import storage

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
    model_uri: str  # the registry's own copy (what serving and predict load)
    content_hash: str
    metrics: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    card_uri: str | None = None
    created_at: str = ""
    source_uri: str | None = None  # where the model was registered from (None: records older than copies)
    artifact: dict = field(default_factory=dict)  # the copy: {"files", "bytes", "sha256"} (see copy_artifact)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelVersion":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def is_champion(self) -> bool:
        return CHAMPION in self.aliases


@dataclass(frozen=True)
class Promotion:
    """What a compare-and-set promotion found and did.

    ``promoted`` is true when ``alias`` points at ``version`` after the call (moved by it, or already there);
    otherwise ``current`` is the version that holds the alias (None: no version), which differs from
    ``expected``, the one the caller required it to hold.
    """

    name: str
    alias: str
    version: int
    expected: int | None
    current: int | None

    @property
    def promoted(self) -> bool:
        return self.current == self.version


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
        """Add a version holding a copy of the folder at ``model_uri`` (idempotent on ``content_hash``: a known
        artifact returns its existing version, copied once).

        ``make_champion`` moves the champion alias unconditionally (:meth:`set_alias`); the register step
        registers with ``make_champion=False`` and then calls :meth:`promote`, which is compare-and-set."""
        ...

    def get(self, name: str, ref: str | int) -> ModelVersion | None:
        """A version by number, ``"latest"``, ``"champion"`` or another alias; None when there is none."""
        ...

    def list_versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first."""
        ...

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` at ``version`` (moving it from wherever it was), whatever it pointed at before."""
        ...

    def promote(self, name: str, version: int, *, expected: int | None, alias: str = CHAMPION) -> Promotion:
        """Point ``alias`` at ``version`` only if it points at ``expected`` now (None: at no version).

        Atomic under racing callers: of several that expect the same current version, exactly one moves the
        alias; the rest get ``promoted == False`` and the version that holds it. Raises RegistryError when
        ``version`` does not exist."""
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


def registry_identity(target: str) -> str:
    """One spelling per registry, to tell whether two targets name the same one: local paths absolute,
    ``/gcs/BUCKET/...`` (Vertex's Cloud Storage FUSE mount) as ``gs://BUCKET/...``, options (``?...``) and
    trailing slashes dropped."""
    target = str(target).strip()
    if target.startswith("/gcs/"):
        target = "gs://" + target[len("/gcs/"):]
    if target.startswith(("vertex://", "kubeflow://")):
        return target.partition("?")[0].rstrip("/")
    if storage.is_remote(target):
        return target.rstrip("/")
    return str(storage.to_local_path(target).resolve())


def parse_reference(ref: str) -> tuple[str | None, str, int | str] | None:
    """``"[REGISTRY::]NAME@REF"`` -> (registry or None, name, version number or alias); None if not that form."""
    m = REFERENCE_RE.match(str(ref).strip())
    if not m:
        return None
    return m["registry"], m["name"], parse_ref(m["ref"])


# ---- the registry's copy of a model --------------------------------------------------------------------------
COPY_LAST = "manifest.json"  # an artifact's completion marker: copied last, so a half copy is never trusted


def check_content_hash(content_hash: str) -> str:
    """A content hash usable in a path (hex digest, or letters/digits/'-'/'_'), else RegistryError."""
    if not isinstance(content_hash, str) or not content_hash or len(content_hash) > 128 or not all(
            c.isalnum() or c in "-_" for c in content_hash):
        raise RegistryError(f"content_hash {content_hash!r} is not valid: expected a hex digest (e.g. sha256)")
    return content_hash


def tree_digest(folder: Path) -> dict[str, Any]:
    """``{"files", "bytes", "sha256"}`` of a local folder: sha256 over each file's relative path and bytes."""
    digest, files, size = hashlib.sha256(), 0, 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = path.read_bytes()
        rel = path.relative_to(folder).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "big") + rel + len(data).to_bytes(8, "big") + data)
        files, size = files + 1, size + len(data)
    return {"files": files, "bytes": size, "sha256": digest.hexdigest()}


def copy_artifact(source_uri: str, dest_uri: str) -> dict[str, Any]:
    """Copy the model folder at ``source_uri`` (local or gs://) to ``dest_uri``, its ``manifest.json`` last.

    Returns :func:`tree_digest` of what was copied. Through ``storage.local_input`` (a download when the source
    is remote) and ``storage.upload_dir`` (a plain copy locally, parallel checked uploads on gs://), so a copy
    is verified per file the way every other transfer is. Raises RegistryError when the source is missing,
    is not a folder or holds no files.
    """
    try:
        with storage.local_input(source_uri) as local:
            local = Path(local)
            if not local.is_dir():
                raise RegistryError(f"cannot register {source_uri!r}: it is a file, not a model folder. "
                                    f"Pass the folder a training step wrote (it holds manifest.json).")
            digest = tree_digest(local)
            if not digest["files"]:
                raise RegistryError(f"cannot register {source_uri!r}: the folder is empty. "
                                    f"Pass the folder a training step wrote (it holds manifest.json).")
            storage.upload_dir(local, dest_uri, exclude=(COPY_LAST,))
            if (local / COPY_LAST).is_file():
                storage.write_bytes(storage.join(dest_uri, COPY_LAST), (local / COPY_LAST).read_bytes())
    except FileNotFoundError as e:
        raise RegistryError(
            f"cannot register {source_uri!r}: it does not exist. The registry copies the model when it "
            f"registers it: pass the model folder of a finished training step."
        ) from e
    return digest


# ---- copies for backends whose versions are numbered by a server (Vertex, Kubeflow) ---------------------------
#: ``artifact_root`` default: ``gs://<bucket of the registered model>/`` + this (a prefix owned by the registry).
AUTO_ARTIFACT_FOLDER = "vlmtune-registry"
COPY_RECORD = "copy.json"  # beside <content_hash>/model/: written after the copy, so its presence means complete


def artifact_root_option(value: str | None) -> str | None:
    """``"auto"`` (derive from the model's bucket), a ``gs://``/local prefix, or None/"none"/"" (no copy)."""
    if value is None or str(value).strip().lower() in ("", "none", "false"):
        return None
    return str(value).strip().rstrip("/") if storage.is_remote(str(value)) else str(value).strip()


def registry_copy_folder(artifact_root: str | None, model_uri: str, name: str, content_hash: str) -> str | None:
    """``<artifact_root>/<name>/<content_hash>`` (the auto root is ``gs://<model bucket>/vlmtune-registry``);
    None when copies are off. Content-addressed: versions are numbered by the server, after the copy."""
    if artifact_root is None:
        return None
    if artifact_root == "auto":
        if not storage.is_remote(model_uri):
            raise RegistryError(
                f"cannot choose where to copy {model_uri!r}: it is not on gs://, so there is no bucket to put the "
                f"registry's copy in. Set the registry's artifact_root option (e.g. ?artifact_root=gs://BUCKET/"
                f"registry-artifacts in the registry URI), or artifact_root=none to keep the model where it is."
            )
        bucket = model_uri[len("gs://"):].split("/", 1)[0]
        artifact_root = f"gs://{bucket}/{AUTO_ARTIFACT_FOLDER}"
    return storage.join(artifact_root, check_name(name), check_content_hash(content_hash))


def copy_once(model_uri: str, folder: str) -> tuple[str, dict]:
    """Copy the model into ``<folder>/model`` unless a complete copy (``copy.json``) is there. (uri, digest)."""
    copy_uri, record_uri = storage.join(folder, "model"), storage.join(folder, COPY_RECORD)
    try:
        done = json.loads(storage.read_text(record_uri))
        if done.get("source_uri") and done.get("digest"):
            return copy_uri, done["digest"]
    except FileNotFoundError:
        pass
    digest = copy_artifact(model_uri, copy_uri)
    storage.write_text(record_uri, json.dumps({"source_uri": model_uri, "digest": digest}, sort_keys=True))
    return copy_uri, digest
