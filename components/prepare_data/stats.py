"""What ``prepare-data`` counts while it streams rows: rejects by reason (with examples), and the sizes and
token costs of the stored images. Both end up in the dataset manifest (every rejected row also in
``rejects.jsonl`` beside it), so no row is lost without a trace."""
from __future__ import annotations

import collections
import json
from typing import IO, TYPE_CHECKING, Any

from components.common.processor_settings import image_sizing_of, need_longest_edge, tokens_for_size

if TYPE_CHECKING:
    from components.prepare_data.sources import Where

EXAMPLES_PER_REASON = 5
FIRST_RECORDS = 5  # rejected rows described in full in a failure message (no manifest then)
# Reasons that are not "invalid input": they do not count towards max_invalid_fraction.
NOT_INVALID = {"duplicate"}


class Stat:
    """min / max / mean / count of an integer series, kept in constant memory."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    def add(self, v: int) -> None:
        self.n += 1
        self.total += v
        self.min = v if self.min is None else min(self.min, v)
        self.max = v if self.max is None else max(self.max, v)

    def summary(self) -> dict[str, Any] | None:
        if not self.n:
            return None
        return {"min": self.min, "max": self.max, "mean": round(self.total / self.n, 2), "count": self.n}


class Rejects:
    """Rejected rows by reason: a count and the first few row ids (or source positions) as examples, for the
    manifest; and, when given a ``log``, one JSON line per rejected row (``rejects.jsonl``): its id, source
    file, line and row number, reason and a human detail. The first few invalid ones are also kept
    (``first``), for a failure message when no manifest is written."""

    def __init__(self, log: IO[str] | None = None) -> None:
        self.by_reason: dict[str, dict[str, Any]] = {}
        self.log = log
        self.first: list[dict[str, Any]] = []

    def add(self, reason: str, example: str, *, detail: str | None = None, row_id: str | None = None,
            where: "Where | None" = None) -> None:
        entry = self.by_reason.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append(example)
        keep = reason not in NOT_INVALID and len(self.first) < FIRST_RECORDS
        if self.log is not None or keep:
            record = {
                "id": row_id,
                "file": where.file if where else None,
                "line": where.line if where else None,
                "row": where.row if where else None,
                "reason": reason,
                "detail": detail or None,
            }
            if keep:
                self.first.append(record)
            if self.log is not None:
                self.log.write(json.dumps(record, ensure_ascii=False) + "\n")

    def count(self, exclude: set[str] = frozenset()) -> int:
        return sum(e["count"] for r, e in self.by_reason.items() if r not in exclude)

    def invalid(self) -> int:
        """Rows rejected for bad input (what ``max_invalid_fraction`` limits)."""
        return self.count(exclude=NOT_INVALID)

    def as_dict(self) -> dict[str, Any]:
        return {r: self.by_reason[r] for r in sorted(self.by_reason)}


def describe_reject(record: dict[str, Any]) -> str:
    """One rejects.jsonl record as a line for a person: ``rows.jsonl line 3 (id r2): missing_image: ...``."""
    where = record.get("file") or "row"
    if record.get("line") is not None:
        where += f" line {record['line']}"
    elif record.get("row") is not None:
        where += f" row {record['row']}"
    if record.get("id") is not None:
        where += f" (id {record['id']})"
    detail = f": {record['detail']}" if record.get("detail") else ""
    return f"{where}: {record['reason']}{detail}"


class ImageStats:
    """Sizes, source modes and prompt-token costs of the stored images (token costs need processor settings)."""

    SERIES = ("width", "height", "source_width", "source_height", "tokens_per_image", "tokens_per_sample", "images_per_row",
              "fixed_tokens_per_image", "fixed_tokens_per_sample", "need_tokens_per_image", "need_tokens_per_sample")

    def __init__(self, processor_settings: dict[str, Any] | None):
        self.processor_settings = processor_settings
        self.image_sizing = image_sizing_of(processor_settings)
        self.series = {k: Stat() for k in self.SERIES}
        self.token_histogram: collections.Counter = collections.Counter()
        # What each image sizing costs for the same stored images ("before"/"after"), and which images each
        # enlarges: the fixed size every image below the cap; need only by rounding up to whole tiles.
        self.sizing_histogram = {"fixed": collections.Counter(), "need": collections.Counter()}
        self.upscaled = {"fixed": 0, "need": 0}
        self.source_modes: collections.Counter = collections.Counter()
        self.reencoded = 0
        self.passed_through = 0
        self.rescaled: collections.Counter = collections.Counter()  # source mode -> images mapped by their range
        self._tokens_by_size: dict[tuple[int, int], dict[str, int] | None] = {}  # few distinct sizes: compute each once

    def add_row(self, images: list) -> None:
        """Record the processed images (``images.ProcessedImage``) of one accepted row."""
        sample_tokens = 0
        sizing_sample_tokens = {"fixed": 0, "need": 0}
        for image in images:
            self.series["width"].add(image.width)
            self.series["height"].add(image.height)
            self.series["source_width"].add(image.source_width)
            self.series["source_height"].add(image.source_height)
            self.source_modes[image.source_mode] += 1
            if image.rescaled:
                self.rescaled[image.source_mode] += 1
            if image.reencoded:
                self.reencoded += 1
            else:
                self.passed_through += 1
            by_sizing = self._tokens(image.width, image.height)
            if by_sizing is not None:
                tokens = by_sizing[self.image_sizing]
                self.series["tokens_per_image"].add(tokens)
                self.token_histogram[tokens] += 1
                sample_tokens += tokens
                for sizing in ("fixed", "need"):
                    self.series[f"{sizing}_tokens_per_image"].add(by_sizing[sizing])
                    self.sizing_histogram[sizing][by_sizing[sizing]] += 1
                    sizing_sample_tokens[sizing] += by_sizing[sizing]
            if self.processor_settings:
                longest, cap = max(image.width, image.height), self.processor_settings["size"]["longest_edge"]
                self.upscaled["fixed"] += longest < cap
                if self.processor_settings["do_image_splitting"]:
                    tile = self.processor_settings["max_image_size"]["longest_edge"]
                    self.upscaled["need"] += longest < need_longest_edge(image.width, image.height, cap, tile)
        self.series["images_per_row"].add(len(images))
        if self.processor_settings and self.processor_settings.get("image_seq_len") is not None:
            self.series["tokens_per_sample"].add(sample_tokens)
            for sizing in ("fixed", "need"):
                self.series[f"{sizing}_tokens_per_sample"].add(sizing_sample_tokens[sizing])

    def _tokens(self, width: int, height: int) -> dict[str, int] | None:
        """Tokens of a stored image of this size under each image sizing (None without processor settings)."""
        key = (width, height)
        if key not in self._tokens_by_size:
            fixed = tokens_for_size(width, height, self.processor_settings, "fixed")
            self._tokens_by_size[key] = None if fixed is None else {
                "fixed": fixed, "need": tokens_for_size(width, height, self.processor_settings, "need")}
        return self._tokens_by_size[key]

    def images_summary(self, stored_longest_edge_cap: int | None) -> dict[str, Any]:
        s = self.series
        return {
            "count": s["width"].n,
            "width": s["width"].summary(),
            "height": s["height"].summary(),
            "source_width": s["source_width"].summary(),
            "source_height": s["source_height"].summary(),
            "source_modes": dict(sorted(self.source_modes.items())),
            "per_row": s["images_per_row"].summary(),
            "stored_longest_edge_cap": stored_longest_edge_cap,
            "rescaled_to_8bit": sum(self.rescaled.values()),
            # Images the processor enlarges: the fixed size, every one below the cap (also when it is not the
            # sizing used here: what it would have done); need-based sizing, only by rounding up to whole tiles.
            "upscaled_by_fixed_size": self.upscaled["fixed"] if self.processor_settings else None,
            "rounded_up_to_whole_tiles": self.upscaled["need"] if self.processor_settings else None,
        }

    def warnings(self) -> list[str]:
        """Lossy conversions and avoidable costs a user should know about (they go into the manifest's warnings)."""
        out = []
        if self.rescaled:
            modes = ", ".join(f"{mode} x{n}" for mode, n in sorted(self.rescaled.items()))
            out.append(f"{sum(self.rescaled.values())} image(s) had more than 8 bits per sample ({modes}; 'RGB'/'RGBA': "
                       f"16-bit colour PNG): each was mapped to 8 bits by its own min..max range (a constant one by "
                       f"the full scale), so brightness is relative within each image (images.rescaled_to_8bit)")
        fixed, need = self.series["fixed_tokens_per_image"], self.series["need_tokens_per_image"]
        if self.image_sizing == "fixed" and self.upscaled["fixed"] and fixed.total > need.total:
            cap = self.processor_settings["size"]["longest_edge"]
            out.append(f"image_sizing=fixed: {self.upscaled['fixed']} of {fixed.n} image(s) are smaller than the processor's "
                       f"{cap} px and are upscaled to it: {fixed.total / fixed.n:.0f} tokens per image on average, "
                       f"{need.total / need.n:.0f} with image_sizing=need (tokens_per_image.need_based); "
                       f"`--set image_sizing=need` spends only what each image needs")
        return out

    def _sizing_summary(self, sizing: str) -> dict[str, Any]:
        return {**self.series[f"{sizing}_tokens_per_image"].summary(),
                "histogram": {str(k): v for k, v in sorted(self.sizing_histogram[sizing].items())}}

    def tokens_per_image(self) -> dict[str, Any] | None:
        """Tokens per stored image under the dataset's image sizing (exact: what the processor produces), with
        what each sizing costs for the same images side by side (``fixed_size``: "before", ``need_based``)."""
        stat = self.series["tokens_per_image"]
        if not stat.n:
            return None
        fixed, need = self.series["fixed_tokens_per_image"], self.series["need_tokens_per_image"]
        return {
            **stat.summary(),
            "histogram": {str(k): v for k, v in sorted(self.token_histogram.items())},
            "image_sizing": self.image_sizing,
            "fixed_size": self._sizing_summary("fixed"),
            "need_based": self._sizing_summary("need"),
            "need_vs_fixed": round(need.total / fixed.total, 4),
        }

    def tokens_per_sample(self) -> dict[str, Any] | None:
        summary = self.series["tokens_per_sample"].summary()
        if summary is None:
            return None
        return {**summary, "fixed_size": self.series["fixed_tokens_per_sample"].summary(),
                "need_based": self.series["need_tokens_per_sample"].summary()}
