"""What a scheduled run trains on, and whether it should train at all.

A schedule submits the same parameters every time, so its data source must name "the newest snapshot"
rather than one snapshot. Two spellings, resolved at run time by :func:`resolve_snapshot` (the prepare-data
step calls it on its `source` before reading):

- a date placeholder: ``gs://acme/exports/{date}/train`` (``{date}`` is ``YYYY-MM-DD``) or with a format,
  ``gs://acme/exports/dt={date:%Y%m%d}``: the newest day, counting back from today (UTC), whose folder
  exists (and holds ``ready_marker`` when one is named, e.g. ``_SUCCESS``, so a half-written export is
  skipped);
- a pointer file: ``gs://acme/exports/LATEST`` (a file named ``LATEST``/``latest``, optionally with
  ``.txt``), whose first line is the snapshot's URI, absolute or relative to the pointer's folder; the
  exporter rewrites it after each complete export.

Anything else is returned unchanged.

:func:`should_train` then compares the prepared dataset's fingerprint (its manifest's ``content_hash``) with
the one the champion was trained on (``dataset_hash`` in the registry lineage written by ``register``): when
they are equal there is nothing new to learn and the run can stop before any GPU minute is spent.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any

from components.common import storage

DEFAULT_DATE_FORMAT = "%Y-%m-%d"
POINTER_NAMES = ("LATEST", "latest", "LATEST.txt", "latest.txt")
_DATE_RE = re.compile(r"\{date(?::(?P<fmt>[^{}]+))?\}")


class SnapshotError(ValueError):
    """No snapshot could be resolved; the message says what was looked for and where."""


def has_placeholder(uri: str) -> bool:
    return bool(_DATE_RE.search(uri))


def is_pointer(uri: str) -> bool:
    return uri.rstrip("/").rsplit("/", 1)[-1] in POINTER_NAMES


def render(uri: str, day: dt.date) -> str:
    """``uri`` with every ``{date}`` / ``{date:FMT}`` replaced by ``day`` formatted."""
    return _DATE_RE.sub(lambda m: day.strftime(m.group("fmt") or DEFAULT_DATE_FORMAT), uri)


def _check_day_granular(uri: str) -> None:
    for m in _DATE_RE.finditer(uri):
        fmt = m.group("fmt") or DEFAULT_DATE_FORMAT
        if re.search(r"%[HIMSfpXcz]", fmt):
            raise SnapshotError(f"{uri!r}: {{date:{fmt}}} has a time-of-day field; snapshots are looked up by day, "
                                f"use a date-only format such as %Y%m%d")


def resolve_snapshot(uri: str, *, today: dt.date | None = None, max_age_days: int = 31,
                     ready_marker: str | None = None) -> str:
    """The concrete URI of the newest snapshot that ``uri`` names (see the module doc); ``uri`` itself when it
    names no moving snapshot. Raises :class:`SnapshotError` when none is found."""
    if has_placeholder(uri):
        _check_day_granular(uri)
        today = today or dt.datetime.now(dt.timezone.utc).date()
        looked = []
        for age in range(max_age_days + 1):
            candidate = render(uri, today - dt.timedelta(days=age))
            if candidate in looked:  # e.g. a %Y-%m format: many days render the same URI
                continue
            looked.append(candidate)
            probe = storage.join(candidate, ready_marker) if ready_marker else candidate
            if storage.exists(probe):
                return candidate
        what = f"holding {ready_marker!r}" if ready_marker else "existing"
        raise SnapshotError(f"no snapshot {what} for {uri!r} in the {max_age_days + 1} days up to {today}: looked at "
                            f"{looked[0]} .. {looked[-1]}. Check the export job, or raise max_age_days.")
    if is_pointer(uri):
        try:
            text = storage.read_text(uri)
        except FileNotFoundError as e:
            raise SnapshotError(f"pointer file {uri!r} does not exist; the exporter writes it after each export") from e
        target = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if not target:
            raise SnapshotError(f"pointer file {uri!r} is empty; it should hold the snapshot's URI on its first line")
        if "://" not in target and not target.startswith("/"):
            target = storage.join(uri.rstrip("/").rsplit("/", 1)[0], target)
        if ready_marker and not storage.exists(storage.join(target, ready_marker)):
            raise SnapshotError(f"pointer {uri!r} names {target!r}, which holds no {ready_marker!r}: the export is not complete")
        return target
    return uri


def should_train(dataset_manifest: dict[str, Any] | None, champion_lineage: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether a run should train on the dataset, given the champion's lineage (``ModelVersion.lineage``).

    False only when both fingerprints are known and equal; every doubt trains, since a skipped run that
    should have trained is worse than a redundant one (the eval gate still guards registration).
    """
    fingerprint = (dataset_manifest or {}).get("content_hash")
    if not champion_lineage:
        return True, "no champion yet: train"
    if not fingerprint:
        return True, "the dataset manifest has no content_hash: train (cannot compare)"
    champion_hash = champion_lineage.get("dataset_hash")
    if not champion_hash:
        return True, "the champion's lineage records no dataset_hash: train (cannot compare)"
    if fingerprint == champion_hash:
        where = champion_lineage.get("dataset_uri") or "its dataset"
        return False, f"dataset fingerprint {fingerprint} equals the champion's (trained on {where}): nothing new, skip"
    return True, f"dataset fingerprint {fingerprint} differs from the champion's {champion_hash}: train"


def champion_lineage(registry: str, name: str) -> dict[str, Any] | None:
    """The lineage of ``name@champion`` in ``registry`` (any registry URI ``register`` takes); None if none."""
    from components.common.registry import current_champion

    version = current_champion(registry, name)
    return dict(version.lineage) if version else None
