"""Local registry: a folder or ``gs://`` prefix, written only through :mod:`components.common.storage`.

Layout::

    <root>/<name>/versions/000001/.claim         create-only marker: version number 1 is taken
    <root>/<name>/versions/000001/model/         the registry's copy of the model (manifest.json copied last)
    <root>/<name>/versions/000001/README.md      model card
    <root>/<name>/versions/000001/version.json   the version record, written last (a version exists once this does)
    <root>/<name>/by_hash/<content_hash>.json    {"version": N}: which version holds an artifact (create-only)
    <root>/<name>/aliases/champion/000001.json   {"version": N, "previous": M}: the alias's moves, one create-only
                                                 entry each; the highest-numbered entry is where the alias points

Why this order:
- Numbers are claimed with ``storage.write_if_absent`` (GCS ``if_generation_match=0``; ``O_EXCL``-style link
  locally), so two runs racing for N cannot both win: the loser tries N+1. A crashed run leaves a claimed
  number without a record: a gap, never a reused number (its partial copy stays in the gap's folder).
- The model is copied before the record, so a version never exists without its copy: deleting the folder a
  pipeline wrote does not lose a registered model. ``model_uri`` is the copy, ``source_uri`` the original.
- ``version.json`` is written after the card, so a reader never sees a version without its card.
- ``by_hash`` is claimed create-only after the record: if two runs registered the same artifact at the same
  moment, the one that loses the claim retracts its record and copy and returns the winner's version, so one
  artifact ends up with one version. A run that crashed before claiming it is repaired by the next
  registration, which finds the record by scanning.
- An alias moves by creating entry K+1 of its log create-only, after reading entry K: of several runs that
  read the same K exactly one creates K+1. :meth:`LocalRegistry.promote` creates it only if entry K names the
  version the caller expected (compare-and-set); a run that loses re-reads and reports who holds the alias.
  No lock is ever held, so a killed run leaves nothing to clean: its move happened (the entry exists) or not.
  Registries written before the log keep ``aliases/<alias>.json``; it counts until the first logged move.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from components.common import storage
from components.common.registry.types import (
    CHAMPION,
    LATEST,
    ModelVersion,
    Promotion,
    RegistryError,
    check_alias,
    check_content_hash,
    check_name,
    copy_artifact,
    parse_ref,
)

VERSION_FILE = "version.json"
CLAIM_FILE = ".claim"
CARD_FILE = "README.md"
MODEL_FOLDER = "model"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _dumps(data: dict) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8")


def _writer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class LocalRegistry:
    def __init__(self, root: str, *, max_claim_attempts: int = 1000):
        self.root = str(root).rstrip("/") if storage.is_remote(str(root)) else str(root)
        self.max_claim_attempts = max_claim_attempts

    def __repr__(self) -> str:
        return f"LocalRegistry({self.root!r})"

    # ---- paths -------------------------------------------------------------------------------------------------
    def _model_uri(self, name: str) -> str:
        return storage.join(self.root, check_name(name))

    def _version_uri(self, name: str, version: int) -> str:
        return storage.join(self._model_uri(name), "versions", f"{int(version):06d}")

    def _alias_log_uri(self, name: str, alias: str) -> str:
        return storage.join(self._model_uri(name), "aliases", alias)

    def _legacy_alias_uri(self, name: str, alias: str) -> str:
        return storage.join(self._model_uri(name), "aliases", f"{alias}.json")

    def _hash_uri(self, name: str, content_hash: str) -> str:
        return storage.join(self._model_uri(name), "by_hash", f"{check_content_hash(content_hash)}.json")

    # ---- reading -----------------------------------------------------------------------------------------------
    def _numbers(self, name: str) -> tuple[set[int], set[int]]:
        """(claimed numbers, numbers with a committed version record)."""
        prefix = storage.join(self._model_uri(name), "versions")
        claimed, committed = set(), set()
        for uri in storage.list_files(prefix):
            rel = uri[len(prefix):].replace("\\", "/").lstrip("/")
            folder, _, filename = rel.partition("/")
            if not folder.isdigit():
                continue
            claimed.add(int(folder))
            if filename == VERSION_FILE:
                committed.add(int(folder))
        return claimed, committed

    def _alias_heads(self, name: str) -> dict[str, tuple[int, int | None]]:
        """alias -> (number of its newest log entry, version it points at); legacy files count as entry 0."""
        prefix = storage.join(self._model_uri(name), "aliases")
        newest: dict[str, int] = {}
        legacy: dict[str, str] = {}
        for uri in storage.list_files(prefix):
            rel = uri[len(prefix):].replace("\\", "/").lstrip("/")
            folder, _, filename = rel.partition("/")
            if not filename and folder.endswith(".json") and not folder.startswith("."):
                legacy[folder[: -len(".json")]] = uri
            elif filename.endswith(".json") and filename[: -len(".json")].isdigit() and "/" not in filename:
                newest[folder] = max(newest.get(folder, 0), int(filename[: -len(".json")]))
        heads: dict[str, tuple[int, int | None]] = {}
        for alias, seq in newest.items():
            heads[alias] = (seq, self._read_entry(self._entry_uri(name, alias, seq)))
        for alias, uri in legacy.items():
            if alias not in heads:
                try:
                    heads[alias] = (0, self._read_entry(uri))
                except FileNotFoundError:
                    continue
        return heads

    def _entry_uri(self, name: str, alias: str, seq: int) -> str:
        return storage.join(self._alias_log_uri(name, alias), f"{int(seq):06d}.json")

    @staticmethod
    def _read_entry(uri: str) -> int | None:
        version = json.loads(storage.read_text(uri)).get("version")
        return None if version is None else int(version)

    def _alias_head(self, name: str, alias: str) -> tuple[int, int | None]:
        """(number of the alias's newest log entry, the version it points at); (0, None) for an unset alias."""
        entries = [uri.replace("\\", "/").rsplit("/", 1)[-1] for uri in storage.list_files(self._alias_log_uri(name, alias))]
        numbers = [int(f[: -len(".json")]) for f in entries if f.endswith(".json") and f[: -len(".json")].isdigit()]
        if numbers:
            seq = max(numbers)
            return seq, self._read_entry(self._entry_uri(name, alias, seq))
        try:
            return 0, self._read_entry(self._legacy_alias_uri(name, alias))
        except FileNotFoundError:
            return 0, None

    def _aliases(self, name: str) -> dict[int, list[str]]:
        by_version: dict[int, list[str]] = {}
        for alias, (_, version) in self._alias_heads(name).items():
            if version is not None:
                by_version.setdefault(version, []).append(alias)
        return {v: sorted(a) for v, a in by_version.items()}

    def _read_version(self, name: str, version: int, aliases: dict[int, list[str]] | None = None) -> ModelVersion | None:
        try:
            record = json.loads(storage.read_text(storage.join(self._version_uri(name, version), VERSION_FILE)))
        except FileNotFoundError:
            return None
        mv = ModelVersion.from_dict(record)
        mv.aliases = (self._aliases(name) if aliases is None else aliases).get(mv.version, [])
        return mv

    def list_versions(self, name: str) -> list[ModelVersion]:
        _, committed = self._numbers(name)
        aliases = self._aliases(name)
        versions = [self._read_version(name, n, aliases) for n in sorted(committed)]
        return [v for v in versions if v is not None]

    def get(self, name: str, ref: str | int) -> ModelVersion | None:
        ref = parse_ref(ref)
        if isinstance(ref, int):
            return self._read_version(name, ref)
        if ref == LATEST:
            _, committed = self._numbers(name)
            return self._read_version(name, max(committed)) if committed else None
        _, version = self._alias_head(name, check_alias(ref))
        return None if version is None else self._read_version(name, version)

    def find_by_hash(self, name: str, content_hash: str) -> ModelVersion | None:
        try:
            index = json.loads(storage.read_text(self._hash_uri(name, content_hash)))
            found = self._read_version(name, int(index["version"]))
            if found is not None:
                return found
        except FileNotFoundError:
            pass
        # A run that crashed between its record and the index: find the record and repair the index.
        for mv in self.list_versions(name):
            if mv.content_hash == content_hash:
                storage.write_if_absent(self._hash_uri(name, content_hash), _dumps({"version": mv.version}))
                return mv
        return None

    # ---- aliases -----------------------------------------------------------------------------------------------
    def _check_version(self, name: str, alias: str, version: int) -> None:
        check_alias(alias)
        if self._read_version(name, int(version)) is None:
            raise RegistryError(
                f"cannot point alias {alias!r} at version {version} of {name!r} in {self.root}: no such version. "
                f"Existing versions: {[v.version for v in self.list_versions(name)] or 'none'}."
            )

    def _move(self, name: str, alias: str, version: int, expected: int | None, *, conditional: bool) -> Promotion:
        """Create the alias's next log entry, if the current one names ``expected`` (or unconditionally)."""
        for _ in range(self.max_claim_attempts):
            seq, current = self._alias_head(name, alias)
            if current == int(version) or (conditional and current != expected):
                return Promotion(name, alias, int(version), expected, current)
            entry = {"version": int(version), "previous": current, "updated_at": _now(), "by": _writer()}
            if storage.write_if_absent(self._entry_uri(name, alias, seq + 1), _dumps(entry)):
                return Promotion(name, alias, int(version), expected, int(version))
            # Another run moved the alias between our read and our write: read again and decide again.
        raise RegistryError(
            f"could not move alias {alias!r} of {name!r} in {self.root} after {self.max_claim_attempts} tries: "
            f"something moves it in a loop."
        )

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._check_version(name, alias, version)
        self._move(name, alias, version, None, conditional=False)

    def promote(self, name: str, version: int, *, expected: int | None, alias: str = CHAMPION) -> Promotion:
        self._check_version(name, alias, version)
        return self._move(name, alias, version, None if expected is None else int(expected), conditional=True)

    # ---- registering -------------------------------------------------------------------------------------------
    def _claim_number(self, name: str, content_hash: str) -> int:
        claimed, _ = self._numbers(name)
        number = max(claimed, default=0) + 1
        owner = {"content_hash": content_hash, "claimed_at": _now(), "by": _writer()}
        for _ in range(self.max_claim_attempts):
            if storage.write_if_absent(storage.join(self._version_uri(name, number), CLAIM_FILE), _dumps(owner)):
                return number
            number += 1  # someone else holds N: try the next one
        raise RegistryError(
            f"could not claim a version number for {name!r} in {self.root} after {self.max_claim_attempts} tries; "
            f"is something registering in a loop?"
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
        check_name(name)
        check_content_hash(content_hash)
        existing = self.find_by_hash(name, content_hash)
        if existing is not None:
            return existing

        number = self._claim_number(name, content_hash)
        folder = self._version_uri(name, number)
        copy_uri = storage.join(folder, MODEL_FOLDER)
        artifact = copy_artifact(model_uri, copy_uri)
        card_uri = storage.join(folder, CARD_FILE)
        storage.write_text(card_uri, card)
        record = ModelVersion(
            name=name, version=number, model_uri=copy_uri, content_hash=content_hash, metrics=dict(metrics),
            lineage=dict(lineage), aliases=[], card_uri=card_uri, created_at=_now(), source_uri=str(model_uri),
            artifact=artifact,
        )
        record_dict = record.to_dict()
        record_dict.pop("aliases")  # aliases live in aliases/, so moving one never rewrites a record
        storage.write_bytes(storage.join(folder, VERSION_FILE), _dumps(record_dict))

        hash_uri = self._hash_uri(name, content_hash)
        if not storage.write_if_absent(hash_uri, _dumps({"version": number})):
            winner_number = int(json.loads(storage.read_text(hash_uri))["version"])
            winner = self._read_version(name, winner_number)
            if winner is not None:
                # Lost a race with a registration of the same artifact: retract ours (the number stays a gap).
                storage.delete(storage.join(folder, VERSION_FILE))
                storage.delete(card_uri)
                storage.delete(copy_uri)
                return winner
            # The index names a version whose record was deleted by hand: ours replaces it.
            storage.write_bytes(hash_uri, _dumps({"version": number}))

        if make_champion:
            self.set_alias(name, CHAMPION, number)
            record.aliases = [CHAMPION]
        return record
