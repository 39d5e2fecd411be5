"""Readers for the source layouts ``prepare-data`` accepts, all streaming (one batch in memory at a time).

- a folder with ``rows.jsonl`` (or other ``*.jsonl`` / ``*.csv`` / ``*.parquet`` files) and image files;
- a single ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file (image paths relative to its folder);
- a ``datasets`` ``save_to_disk`` folder (Dataset or DatasetDict).

Each reader yields ``(row_label, row_dict_or_None, error)``: ``row_label`` names the row in reject examples
when it has no id (``rows.jsonl:17``), and a malformed row comes back as ``(label, None, reason)``.
Image columns come back raw (paths, bytes or ``{"bytes", "path"}`` structs), never decoded.
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class SourceError(ValueError):
    """The source cannot be read at all (wrong layout, unreadable file). The message says what to fix."""


@dataclass
class Source:
    root: Path  # image paths are resolved against this folder and may not escape it
    files: list[Path]
    kind: str  # "files" | "hf_disk"
    description: str
    total_rows: int | None = None


def open_source(path: Path, source_split: str | None = None) -> Source:
    """Work out the layout of a local source path (a folder or a file)."""
    if path.is_file():
        if path.suffix.lower() not in ROW_SUFFIXES:
            raise SourceError(
                f"source {str(path)!r} is a {path.suffix or 'suffix-less'} file; expected a .jsonl, .json, .csv or "
                f".parquet file, or a folder holding rows.jsonl + images/ or a datasets save_to_disk folder"
            )
        return Source(path.parent, [path], "files", f"{path.suffix[1:]} file", _count_rows([path]))
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _open_hf_disk(path, source_split)
    preferred = path / "rows.jsonl"
    if preferred.exists():
        files = [preferred]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in ROW_SUFFIXES)
        if not files:
            files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise SourceError(
            f"source folder {str(path)!r} holds no rows: expected rows.jsonl (or *.jsonl/*.csv/*.parquet files) "
            f"next to the images, or a datasets save_to_disk folder"
        )
    return Source(path, files, "files", f"{len(files)} row file(s)", _count_rows(files))


def _count_rows(files: list[Path]) -> int | None:
    """Row count for the progress bar and the early give-up rule. Never an undercount: text files count every
    line (blank lines and multi-line CSV cells only make it larger), so "bound to fail" is never guessed."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        suffix = f.suffix.lower()
        try:
            if suffix == ".parquet":
                total += pq.ParquetFile(f).metadata.num_rows
            elif suffix in (".jsonl", ".csv") or (suffix == ".json" and not _starts_with_bracket(f)):
                lines, last = 0, b"\n"
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        lines += block.count(b"\n")
                        last = block[-1:]
                lines += last != b"\n"
                total += lines - (suffix == ".csv")
            else:
                return None
        except Exception:  # noqa: BLE001 - counting is only an aid
            return None
    return total


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(64).lstrip()[:1] == b"["


def _open_hf_disk(path: Path, source_split: str | None) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise SourceError(f"source {str(path)!r} looks like a datasets save_to_disk folder but cannot be loaded: {e}") from e
    if isinstance(loaded, datasets.DatasetDict):
        names = [source_split] if source_split else list(loaded)
        missing = [n for n in names if n not in loaded]
        if missing:
            raise SourceError(f"source {str(path)!r} has splits {list(loaded)}, not {missing}; fix source_split")
        total = sum(len(loaded[n]) for n in names)
        desc = f"datasets DatasetDict (splits {', '.join(names)})"
    else:
        names = [None]
        total = len(loaded)
        desc = "datasets Dataset"
    src = Source(path, [], "hf_disk", desc, total)
    src._loaded = loaded  # type: ignore[attr-defined]
    src._splits = names  # type: ignore[attr-defined]
    return src


def iter_rows(source: Source, batch_size: int = 256) -> Iterator[tuple[str, dict | None, str | None]]:
    if source.kind == "hf_disk":
        yield from _iter_hf(source, batch_size)
        return
    for f in source.files:
        suffix = f.suffix.lower()
        if suffix in (".jsonl", ".json"):
            yield from _iter_json(f)
        elif suffix == ".csv":
            yield from _iter_csv(f)
        else:
            yield from _iter_parquet(f, batch_size)


def _iter_json(path: Path):
    with open(path, encoding="utf-8") as fh:
        first = fh.read(1)
        fh.seek(0)
        if path.suffix.lower() == ".json" and first == "[":
            # A JSON array file: no streaming possible, but such files are small in practice.
            for i, row in enumerate(json.load(fh), start=1):
                yield (f"{path.name}:{i}", row, None) if isinstance(row, dict) else (f"{path.name}:{i}", None, "malformed_row")
            return
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            label = f"{path.name}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield label, None, "malformed_row"
                continue
            yield (label, row, None) if isinstance(row, dict) else (label, None, "malformed_row")


def _iter_csv(path: Path):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):  # line 1 is the header
            # CSV cells are strings: JSON lists ('["a", "b"]') become lists, empty cells become None.
            parsed = {}
            for k, v in row.items():
                if k is None:
                    continue
                if v == "":
                    v = None
                elif isinstance(v, str) and v[:1] in "[{":
                    try:
                        v = json.loads(v)
                    except json.JSONDecodeError:
                        pass
                parsed[k] = v
            yield f"{path.name}:{i}", parsed, None


def _iter_parquet(path: Path, batch_size: int):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(f"{str(path)!r} is not a readable Parquet file: {e}") from e
    i = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            i += 1
            yield f"{path.name}:{i}", row, None


def _iter_hf(source: Source, batch_size: int):
    loaded = source._loaded  # type: ignore[attr-defined]
    for name in source._splits:  # type: ignore[attr-defined]
        ds = loaded if name is None else loaded[name]
        # Arrow format hands image columns over as raw {"bytes", "path"} structs: nothing is decoded here.
        ds = ds.with_format("arrow")
        prefix = f"{name}:" if name else ""
        i = 0
        for start in range(0, len(ds), batch_size):
            for row in ds[start : start + batch_size].to_pylist():
                i += 1
                yield f"{prefix}{i}", row, None
