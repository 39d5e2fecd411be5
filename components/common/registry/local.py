"""Local registry: a folder or ``gs://`` prefix, written only through :mod:`components.common.storage`.

Layout::

    <root>/<name>/versions/000001/.claim         create-only marker: version number 1 is taken
    <root>/<name>/versions/000001/README.md      model card
    <root>/<name>/versions/000001/version.json   the version record, written last (a version exists once this does)
    <root>/<name>/by_hash/<content_hash>.json    {"version": N}: which version holds an artifact (create-only)
    <root>/<name>/aliases/champion.json          {"version": N}; any alias likewise

Why this order:
- Numbers are claimed with ``storage.write_if_absent`` (GCS ``if_generation_match=0``; ``O_EXCL``-style link
  locally), so two runs racing for N cannot both win: the loser tries N+1. A crashed run leaves a claimed
  number without a record: a gap, never a reused number.
- ``version.json`` is written after the card, so a reader never sees a version without its card.
- ``by_hash`` is claimed create-only after the record: if two runs registered the same artifact at the same
  moment, the one that loses the claim retracts its record and returns the winner's version, so one artifact
  ends up with one version. A run that crashed before claiming it is repaired by the next registration, which
  finds the record by scanning.
- The champion alias moves last, only after all of the above succeeded. With two runs promoting at once the
  last writer wins (each passed its gate against the champion it saw).
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
    RegistryError,
    check_alias,
    check_name,
    parse_ref,
)

VERSION_FILE = "version.json"
CLAIM_FILE = ".claim"
CARD_FILE = "README.md"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _dumps(data: dict) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode("utf-8")


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

    def _alias_uri(self, name: str, alias: str) -> str:
        return storage.join(self._model_uri(name), "aliases", f"{alias}.json")

    def _hash_uri(self, name: str, content_hash: str) -> str:
        if not content_hash or not all(c.isalnum() or c in "-_" for c in content_hash):
            raise RegistryError(f"content_hash {content_hash!r} is not valid: expected a hex digest")
        return storage.join(self._model_uri(name), "by_hash", f"{content_hash}.json")

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

    def _aliases(self, name: str) -> dict[int, list[str]]:
        prefix = storage.join(self._model_uri(name), "aliases")
        by_version: dict[int, list[str]] = {}
        for uri in storage.list_files(prefix):
            filename = uri.replace("\\", "/").rsplit("/", 1)[-1]
            if not filename.endswith(".json") or filename.startswith("."):
                continue
            try:
                version = int(json.loads(storage.read_text(uri))["version"])
            except FileNotFoundError:
                continue
            by_version.setdefault(version, []).append(filename[: -len(".json")])
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
        try:
            target = json.loads(storage.read_text(self._alias_uri(name, check_alias(ref))))
        except FileNotFoundError:
            return None
        return self._read_version(name, int(target["version"]))

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

    # ---- writing -----------------------------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int) -> None:
        check_alias(alias)
        if self._read_version(name, int(version)) is None:
            raise RegistryError(
                f"cannot point alias {alias!r} at version {version} of {name!r} in {self.root}: no such version. "
                f"Existing versions: {[v.version for v in self.list_versions(name)] or 'none'}."
            )
        storage.write_bytes(self._alias_uri(name, alias), _dumps({"version": int(version), "updated_at": _now()}))

    def _claim_number(self, name: str, content_hash: str) -> int:
        claimed, _ = self._numbers(name)
        number = max(claimed, default=0) + 1
        owner = {"content_hash": content_hash, "claimed_at": _now(),
                 "by": f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"}
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
        existing = self.find_by_hash(name, content_hash)
        if existing is not None:
            return existing

        number = self._claim_number(name, content_hash)
        folder = self._version_uri(name, number)
        card_uri = storage.join(folder, CARD_FILE)
        storage.write_text(card_uri, card)
        record = ModelVersion(
            name=name, version=number, model_uri=model_uri, content_hash=content_hash, metrics=dict(metrics),
            lineage=dict(lineage), aliases=[], card_uri=card_uri, created_at=_now(),
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
                return winner
            # The index names a version whose record was deleted by hand: ours replaces it.
            storage.write_bytes(hash_uri, _dumps({"version": number}))

        if make_champion:
            self.set_alias(name, CHAMPION, number)
            record.aliases = [CHAMPION]
        return record
