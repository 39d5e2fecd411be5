"""Readers for the source layouts ``prepare-data`` accepts, all streaming (one batch in memory at a time).

- a folder with ``rows.jsonl`` and image files: ``rows.jsonl`` is the one row file read;
- a folder without ``rows.jsonl``: its top-level ``*.jsonl`` / ``*.csv`` / ``*.parquet`` files, and the
  ``*.json`` files whose content is rows (below); with none of those, its ``*.parquet`` files at any depth;
- a single ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file (image paths relative to its folder);
- a ``datasets`` ``save_to_disk`` folder (Dataset or DatasetDict).

A ``.json`` file is rows when its content says so: a JSON array of objects, or JSON lines (its first line is
one whole object). Anything else (a pretty-printed object, an array of strings, a metadata file, or, in a
folder, objects without the image column) is not read: in a folder it is skipped with a note
(``Source.notes``, which the step puts in the manifest's warnings and on stderr); named as the source itself
it is an error. Other top-level files that look like data but are not read (e.g. ``extra.jsonl`` beside
``rows.jsonl``) get a note too, so no file is dropped without a word.

Each reader yields :class:`RawRow`: where the row came from (file, line, row number), the row dict, or for a
malformed row a reason and a human detail (the JSON error). Image columns come back raw (paths, bytes or
``{"bytes", "path"}`` structs), never decoded.
"""
from __future__ import annotations

import codecs
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
JSON_PEEK_BYTES = 1 << 16  # first read when deciding what a .json file holds; doubled while one object needs more

_NOT_ROWS_HINT = "a .json row file holds a JSON array of row objects, or one row object per line (JSON lines)"


class SourceError(ValueError):
    """The source cannot be read at all (wrong layout, unreadable file). The message says what to fix."""


@dataclass(frozen=True)
class RowFile:
    path: Path
    format: str  # "jsonl" | "json_array" | "csv" | "parquet"


@dataclass(frozen=True)
class Where:
    """Where a row came from: a file (or a datasets split), its 1-based row number there, and its line in a
    text file (the line a JSON-lines row or a CSV record or an array element starts on)."""

    file: str
    row: int
    line: int | None = None

    @property
    def label(self) -> str:
        """How a row without an id is named in reject examples: ``rows.jsonl:17`` (file:line), ``x.parquet:3``
        (file:row) or ``train:3`` (split:row)."""
        if not self.file:
            return str(self.row)
        return f"{self.file}:{self.line if self.line is not None else self.row}"


@dataclass(frozen=True)
class RawRow:
    where: Where
    row: dict | None  # None: malformed, see reason/detail
    reason: str | None = None
    detail: str | None = None


@dataclass
class Source:
    root: Path  # image paths are resolved against this folder and may not escape it
    files: list[RowFile]
    kind: str  # "files" | "hf_disk"
    description: str
    total_rows: int | None = None
    notes: list[str] = field(default_factory=list)  # files seen but not read, and why
    # The raw rows a part reads pass through this: a gs:// source downloads the images they name here
    # (``remote_source.py``); a local one hands them on as they are.
    fetch_images: Callable[[Iterator["RawRow"]], Iterator["RawRow"]] = lambda rows: rows


def open_source(path: Path, source_split: str | None = None, image_column: str | None = None) -> Source:
    """Work out the layout of a local source path (a folder or a file).

    ``image_column`` is used only to tell a folder's ``.json`` row files from stray JSON files (metadata,
    configs): a ``.json`` file whose first object lacks that column is not read as rows.
    """
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in ROW_SUFFIXES:
            raise SourceError(
                f"source {str(path)!r} is a {path.suffix or 'suffix-less'} file; expected a .jsonl, .json, .csv or "
                f".parquet file, or a folder holding rows.jsonl + images/ or a datasets save_to_disk folder"
            )
        if suffix == ".json":
            fmt, why = json_format(path)
            if fmt is None:
                raise SourceError(f"source {str(path)!r} is not a row file: it holds {why}; {_NOT_ROWS_HINT}")
        else:
            fmt = suffix[1:]
        files = [RowFile(path, fmt)]
        return Source(path.parent, files, "files", f"{suffix[1:]} file", _count_rows(files))
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _open_hf_disk(path, source_split)
    return _open_folder(path, image_column)


def _open_folder(path: Path, image_column: str | None) -> Source:
    top = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in ROW_SUFFIXES)
    notes: list[str] = []
    preferred = path / "rows.jsonl"
    if preferred.is_file():
        files = [RowFile(preferred, "jsonl")]
        ignored = [p.name for p in top if p != preferred]
        if ignored:
            notes.append(f"ignored {', '.join(ignored)} in the source folder: it has rows.jsonl, the only row file "
                         f"read when present (merge them into rows.jsonl, or remove it to read every row file)")
    else:
        files = []
        for p in top:
            suffix = p.suffix.lower()
            if suffix != ".json":
                files.append(RowFile(p, suffix[1:]))
                continue
            fmt, why = json_format(p, image_column)
            if fmt is None:
                notes.append(f"ignored {p.name} in the source folder: it holds {why}, not rows ({_NOT_ROWS_HINT})")
            else:
                files.append(RowFile(p, fmt))
        if not files:
            files = [RowFile(p, "parquet") for p in sorted(path.rglob("*.parquet")) if p.is_file()]
    if not files:
        seen = f" ({'; '.join(notes)})" if notes else ""
        raise SourceError(
            f"source folder {str(path)!r} holds no rows{seen}: expected rows.jsonl (or *.jsonl/*.csv/*.parquet files, "
            f"or .json files of rows) next to the images, or a datasets save_to_disk folder"
        )
    return Source(path, files, "files", f"{len(files)} row file(s)", _count_rows(files), notes)


def json_format(path: Path, image_column: str | None = None) -> tuple[str | None, str]:
    """What a ``.json`` file holds: ``("json_array", "")``, ``("jsonl", "")``, or ``(None, what it holds)``.

    Decided from the start of the file: its first value (an array's first element, or the first line).
    """
    size = JSON_PEEK_BYTES
    while True:
        with open(path, "rb") as fh:
            head = fh.read(size)
            whole = len(head) < size or not fh.read(1)
        try:
            # incremental: a multi-byte character cut by the peek waits for the next read, not an error
            text = codecs.getincrementaldecoder("utf-8")().decode(head, final=whole).removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            return None, f"bytes that are not UTF-8 text (at byte {e.start})"
        verdict = _json_verdict(text, whole, image_column)
        if verdict is not None:
            return verdict
        size *= 2  # the first value is longer than the peek: read more


def _json_verdict(text: str, whole: bool, image_column: str | None) -> tuple[str | None, str] | None:
    """What the start of a .json file says it holds; None when ``text`` is not all of the file and too short
    to decide (then the caller reads more, so an error is only ever reported on the whole file)."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if not stripped:  # an empty file is zero rows, like an empty .jsonl
        return ("jsonl", "") if whole else None
    if stripped[0] == "[":
        rest = stripped[1:].lstrip()
        if rest[:1] == "]":
            return "json_array", ""
        try:
            first, _ = decoder.raw_decode(rest)
        except json.JSONDecodeError as e:
            if not whole:
                return None
            return None, f"an array that is not valid JSON ({e.msg} in its first element)"
        if not isinstance(first, dict):
            return None, f"a JSON array of {_kind(first)}s, not of row objects"
        return _rows_verdict("json_array", first, image_column)
    lines = stripped.split("\n")
    complete = lines if whole else lines[:-1]  # the last piece of a peek may be cut
    complete = [line for line in complete if line.strip()]
    if not complete:
        return None
    try:
        first = json.loads(complete[0])
    except json.JSONDecodeError as e:
        # JSON lines with a bad first line: the second line is a whole object (it never is in a pretty-printed
        # object), so the file is rows and the bad line one malformed row.
        if len(complete) < 2 and not whole:
            return None
        second = _loads_or_none(complete[1]) if len(complete) > 1 else None
        if isinstance(second, dict):
            return _rows_verdict("jsonl", second, image_column)
        if stripped[0] == "{":
            return None, "one JSON object spread over several lines (pretty-printed), not one object per line"
        return None, f"text that is not JSON ({e.msg} at column {e.colno} of its first line)"
    if not isinstance(first, dict):
        return None, f"a JSON {_kind(first)} on its first line, not a row object"
    return _rows_verdict("jsonl", first, image_column)


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _rows_verdict(fmt: str, first: dict, image_column: str | None) -> tuple[str | None, str]:
    if image_column and image_column not in first:
        shown = ", ".join(list(first)[:8]) + (", ..." if len(first) > 8 else "")
        return None, (f"objects without the image column {image_column!r} (its first has: {shown or 'no keys'}; "
                      f"set image_column if one of these holds the images)")
    return fmt, ""


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _count_rows(files: list[RowFile]) -> int | None:
    """Row count for the progress bar and the early give-up rule. Never an undercount: text files count every
    line (blank lines and multi-line CSV cells only make it larger), so "bound to fail" is never guessed.
    None (unknown) when a file is a JSON array: counting it would mean parsing it twice."""
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        try:
            if f.format == "parquet":
                total += pq.ParquetFile(f.path).metadata.num_rows
            elif f.format in ("jsonl", "csv"):
                lines, last = 0, b"\n"
                with open(f.path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        lines += block.count(b"\n")
                        last = block[-1:]
                lines += last != b"\n"
                total += lines - (f.format == "csv")
            else:
                return None
        except Exception:  # noqa: BLE001 - counting is only an aid
            return None
    return total


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


def iter_rows(source: Source, batch_size: int = 256) -> Iterator[RawRow]:
    if source.kind == "hf_disk":
        yield from _iter_hf(source, batch_size)
        return
    for f in source.files:
        name = f.path.relative_to(source.root).as_posix() if f.path.is_relative_to(source.root) else f.path.name
        if f.format == "jsonl":
            yield from _iter_json_lines(f.path, name)
        elif f.format == "json_array":
            yield from _iter_json_array(f.path, name)
        elif f.format == "csv":
            yield from _iter_csv(f.path, name)
        else:
            yield from _iter_parquet(f.path, name, batch_size)


def _iter_json_lines(path: Path, name: str) -> Iterator[RawRow]:
    row = 0
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            row += 1
            where = Where(name, row, i)
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(where, None, "malformed_row", f"not UTF-8 text (byte {e.start + 1} of the line)")
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield RawRow(where, None, "malformed_row", f"not JSON: {e.msg} at column {e.pos + 1}")
                continue
            if isinstance(value, dict):
                yield RawRow(where, value)
            else:
                yield RawRow(where, None, "malformed_row", f"a JSON {_kind(value)}, not a row object")


def _iter_json_array(path: Path, name: str) -> Iterator[RawRow]:
    """The elements of a JSON array file, each with the line it starts on. The file is read whole (arrays
    cannot be streamed with the standard library); a syntax error stops the run, naming line and column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{str(path)!r} is not UTF-8 text (at byte {e.start}); a .json source must be UTF-8 JSON") from e
    decoder = json.JSONDecoder()

    def fail(pos: int, what: str) -> SourceError:
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return SourceError(f"{str(path)!r} is not a valid JSON array: {what} at line {line} column {column}. "
                           f"Fix the file, or write it as JSON lines (one row object per line), where a bad line "
                           f"rejects only that row")

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip(0)
    if text[pos:pos + 1] != "[":
        raise fail(pos, "expected '['")
    pos, line, counted, row = skip(pos + 1), 1, 0, 0
    if text[pos:pos + 1] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from e
            line += text.count("\n", counted, pos)
            counted = pos
            row += 1
            where = Where(name, row, line)
            if isinstance(value, dict):
                yield RawRow(where, value)
            else:
                yield RawRow(where, None, "malformed_row", f"element {row} of the array is a JSON {_kind(value)}, not a row object")
            pos = skip(end)
            if text[pos:pos + 1] == ",":
                pos = skip(pos + 1)
            elif text[pos:pos + 1] == "]":
                pos += 1
                break
            else:
                raise fail(pos, "expected ',' or ']' after an element")
    if skip(pos) != len(text):
        raise fail(skip(pos), "extra data after the array")


def _iter_csv(path: Path, name: str) -> Iterator[RawRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        for i, row in enumerate(reader, start=1):
            # CSV cells are strings: JSON lists ('["a", "b"]') become lists, empty cells become None.
            parsed = {}
            newlines = 0
            for k, v in row.items():
                if k is None:
                    continue
                if isinstance(v, str):
                    newlines += v.count("\n")
                if v == "":
                    v = None
                elif isinstance(v, str) and v[:1] in "[{":
                    try:
                        v = json.loads(v)
                    except json.JSONDecodeError:
                        pass
                parsed[k] = v
            # reader.line_num is the record's last line; a quoted cell may span lines.
            yield RawRow(Where(name, i, reader.line_num - newlines), parsed)


def _iter_parquet(path: Path, name: str, batch_size: int) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(f"{str(path)!r} is not a readable Parquet file: {e}") from e
    i = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            i += 1
            yield RawRow(Where(name, i), row)


def _iter_hf(source: Source, batch_size: int) -> Iterator[RawRow]:
    loaded = source._loaded  # type: ignore[attr-defined]
    for name in source._splits:  # type: ignore[attr-defined]
        ds = loaded if name is None else loaded[name]
        # Arrow format hands image columns over as raw {"bytes", "path"} structs: nothing is decoded here.
        ds = ds.with_format("arrow")
        i = 0
        for start in range(0, len(ds), batch_size):
            for row in ds[start : start + batch_size].to_pylist():
                i += 1
                yield RawRow(Where(name or "", i), row)
