"""The ``prepare-data`` step: a source dataset in, train/eval Parquet shards + ``manifest.json`` out.

``run(config, source, output)`` reads rows in any supported layout (see ``sources.py``), turns each into the
SmolVLM chat form of ``components.common.schema``, fixes and token-aware-resizes its images in a process pool
(see ``images.py``), splits rows by a hash of their id, and streams them into sharded Parquet. Every rejected
row is counted with its reason; ``manifest.json`` is written last, so a crashed run leaves a folder that
``load_split`` refuses.

    vlmtune prepare-data --source DIR_OR_URI --output DIR_OR_URI [--processor MODEL] [--set key=value]
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from components.common import artifacts, schema, storage
from components.common.config import ConfigError, to_dict
from components.prepare_data import images as imagelib
from components.prepare_data.config import PrepareDataConfig
from components.prepare_data.sources import SourceError, iter_rows, open_source

EXAMPLES_PER_REASON = 5
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx"}
EARLY_ROWS = 1000  # if this many rows in a row are all invalid, stop: the column mapping is wrong
# Reasons that are not "invalid input": they do not count towards max_invalid_fraction.
NOT_INVALID = {"duplicate"}


class TooManyInvalidRowsError(RuntimeError):
    """More rows were invalid than ``max_invalid_fraction`` allows. Carries the would-be manifest summary."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class RowRejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------
# Processor settings: what the training step's processor will do to an image.


def load_processor_settings(ref: str, longest_edge: int | None = None) -> dict[str, Any]:
    """Read the image-size settings of an Idefics3/SmolVLM processor (folder, gs:// folder or hub id).

    ``longest_edge`` overrides ``size["longest_edge"]``, snapped down to a multiple of the tile size when the
    processor splits images, so every stored image fills whole tiles.
    """
    from transformers import AutoProcessor

    def _load(path: str):
        try:
            return AutoProcessor.from_pretrained(path, trust_remote_code=False)
        except Exception as e:
            raise ConfigError(
                f"processor: cannot load an image processor from {ref!r} ({type(e).__name__}: {e}). Pass a model "
                f"folder (with preprocessor_config.json), a gs:// copy of one, or a hub id available offline."
            ) from e

    if storage.is_remote(ref):
        # Fetch only the processor's small files, never the model weights next to them.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vlmtune-processor-") as tmp:
            prefix = ref.rstrip("/") + "/"
            for uri in storage.list_files(ref):
                rel = uri[len(prefix):]
                if "/" in rel or Path(rel).suffix in WEIGHT_SUFFIXES:
                    continue
                (Path(tmp) / rel).write_bytes(storage.read_bytes(uri))
            processor = _load(tmp)
    else:
        local = storage.to_local_path(ref)
        processor = _load(str(local) if local.exists() else ref)
    image_processor = getattr(processor, "image_processor", processor)

    def edge(value: Any) -> int | None:
        if value is None:
            return None
        try:
            return int(value["longest_edge"])
        except (KeyError, TypeError):
            return getattr(value, "longest_edge", None)

    size = edge(getattr(image_processor, "size", None))
    tile = edge(getattr(image_processor, "max_image_size", None))
    splitting = bool(getattr(image_processor, "do_image_splitting", False))
    if size is None or tile is None:
        raise ConfigError(
            f"processor: {ref!r} has no size/max_image_size longest_edge settings; it is not an Idefics3/SmolVLM "
            f"processor. Use a SmolVLM/Idefics3 model, or leave `processor` unset."
        )
    if longest_edge is not None:
        size = min(longest_edge, imagelib.PROCESSOR_MAX_EDGE)
        if splitting:
            size = max(tile, (size // tile) * tile)
    tokenizer = getattr(processor, "tokenizer", None)
    extra_newline = 0
    if tokenizer is not None:
        extra_newline = len(tokenizer("\n\n", add_special_tokens=False)["input_ids"]) - 1
    return {
        "processor": ref,
        "size": {"longest_edge": size},
        "max_image_size": {"longest_edge": tile},
        "do_image_splitting": splitting,
        "image_seq_len": getattr(processor, "image_seq_len", None),
        "extra_split_newline_tokens": extra_newline,
    }


def apply_processor_settings(processor: Any, settings: dict[str, Any] | None) -> Any:
    """Make a loaded processor resize images exactly as the dataset was prepared for (manifest's
    ``processor_settings``), so the token counts in the manifest hold at training and evaluation time."""
    if settings:
        image_processor = getattr(processor, "image_processor", processor)
        image_processor.size = dict(settings["size"])
        image_processor.max_image_size = dict(settings["max_image_size"])
        image_processor.do_image_splitting = settings["do_image_splitting"]
    return processor


def tokens_for_size(width: int, height: int, settings: dict[str, Any]) -> int | None:
    """Prompt tokens one stored image of this size becomes under ``settings`` (None without a processor)."""
    if not settings or settings.get("image_seq_len") is None:
        return None
    rows, cols = imagelib.tile_grid(
        width, height, settings["size"]["longest_edge"], settings["max_image_size"]["longest_edge"],
        settings["do_image_splitting"],
    )
    return imagelib.image_tokens(rows, cols, settings["image_seq_len"], settings.get("extra_split_newline_tokens", 0))


# ----------------------------------------------------------------------------------------------------------
# Rows: raw source dicts -> text fields + image refs (or a reject reason).


@dataclasses.dataclass
class PendingRow:
    index: int
    label: str  # source position, for reject examples when the row has no id
    source_id: str | None
    text: dict[str, Any]  # messages/answers (sft) or prompt/chosen/rejected (preference)
    category: str | None
    refs: list  # ("bytes", b) | ("path", str)


def _text(value: Any, empty_reason: str, type_reason: str) -> str:
    if value is None:
        raise RowRejected(empty_reason)
    if not isinstance(value, str):
        raise RowRejected(type_reason)
    if not value.strip():
        raise RowRejected(empty_reason)
    return value


def _answers(value: Any, by_frequency: bool) -> list[str]:
    if isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if isinstance(item, dict):  # VQAv2 style {"answer": ..., "answer_confidence": ...}
                item = item.get("answer", item.get("text"))
            items.append(_text(item, "empty_answer", "non_string_answer"))
        if not items:
            raise RowRejected("empty_answer")
    else:
        items = [_text(value, "empty_answer", "non_string_answer")]
    items = [a.strip() for a in items]
    if by_frequency:
        counts = collections.Counter(items)
        first_seen = {a: i for i, a in reversed(list(enumerate(items)))}
        items = sorted(counts, key=lambda a: (-counts[a], first_seen[a]))
    else:
        items = list(dict.fromkeys(items))  # drop repeats, keep order
    return items


def _image_refs(value: Any, root: Path, root_resolved: Path) -> list:
    if value is None:
        raise RowRejected("missing_image")
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise RowRejected("missing_image")
    refs = []
    for item in items:
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if data:
                refs.append(("bytes", bytes(data)))
                continue
            if data is not None and not path:
                refs.append(("bytes", b""))  # present but empty: a zero-byte image
                continue
            item = path
        if isinstance(item, (bytes, bytearray)):
            refs.append(("bytes", bytes(item)))
        elif isinstance(item, str) and item.strip():
            if "://" in item:
                raise RowRejected("remote_image_path")
            p = Path(item)
            full = (p if p.is_absolute() else root / p).resolve()
            if not full.is_relative_to(root_resolved):
                raise RowRejected("image_path_escapes_root")
            refs.append(("path", str(full)))
        elif hasattr(item, "save"):  # a decoded PIL image (datasets in python format)
            import io

            buf = io.BytesIO()
            item.save(buf, "PNG")
            refs.append(("bytes", buf.getvalue()))
        else:
            raise RowRejected("missing_image" if not item else "bad_image_value")
    return refs


def _parts(content: Any) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RowRejected("malformed_messages")
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif isinstance(part, dict) and part.get("type") == "image":
            parts.append({"type": "image", "text": None})
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise RowRejected("malformed_messages")
    return parts


def _messages_from_column(value: Any, n_images: int, system: str | None) -> tuple[list[dict], list[str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowRejected("malformed_messages") from e
    if not isinstance(value, list) or not value:
        raise RowRejected("malformed_messages")
    messages = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RowRejected("malformed_messages")
        messages.append({"role": m["role"], "content": _parts(m.get("content"))})
    if system and messages[0]["role"] != "system":
        messages.insert(0, schema.system_turn(system))
    n_placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
    if n_placeholders == 0 and n_images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowRejected("malformed_messages")
        first_user["content"] = [{"type": "image", "text": None}] * n_images + first_user["content"]
    elif n_placeholders != n_images:
        raise RowRejected("image_count_mismatch")
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowRejected("empty_answer")
    answer = " ".join(p["text"] for p in last["content"] if p["type"] == "text").strip()
    if not answer:
        raise RowRejected("empty_answer")
    return messages, [answer]


def normalize_row(row: dict, cfg: PrepareDataConfig, root: Path, root_resolved: Path) -> tuple[str | None, dict, str | None, list]:
    """One raw source row -> (source id, text fields, category, image refs). Raises RowRejected."""
    def get(column: str | None):
        return row.get(column) if column else None

    def need(column: str) -> Any:
        # A column absent from the row is a mapping problem, not an empty value: say which column.
        if column not in row:
            raise RowRejected(f"column_not_found:{column}")
        return row[column]

    source_id = get(cfg.id_column)
    source_id = None if source_id is None or source_id == "" else str(source_id)
    category = get(cfg.category_column)
    category = None if category is None else str(category)
    system = get(cfg.system_prompt_column) or cfg.system_prompt
    if system is not None and not isinstance(system, str):
        raise RowRejected("non_string_system_prompt")
    refs = _image_refs(need(cfg.image_column), root, root_resolved)
    head = [schema.system_turn(system)] if system else []
    if cfg.task == "preference":
        question = _text(need(cfg.question_column) if cfg.question_column else cfg.question, "empty_question", "non_string_question")
        chosen = _text(need(cfg.chosen_column), "empty_answer", "non_string_answer").strip()
        rejected = _text(need(cfg.rejected_column), "empty_answer", "non_string_answer").strip()
        if chosen == rejected:
            raise RowRejected("chosen_equals_rejected")
        text = {
            "prompt": head + [schema.user_turn(question, len(refs))],
            "chosen": [schema.assistant_turn(chosen)],
            "rejected": [schema.assistant_turn(rejected)],
        }
    elif cfg.messages_column:
        messages, answers = _messages_from_column(need(cfg.messages_column), len(refs), system)
        text = {"messages": messages, "answers": answers}
    else:
        question = _text(need(cfg.question_column) if cfg.question_column else cfg.question, "empty_question", "non_string_question")
        answers = _answers(need(cfg.answer_column), cfg.answers_by_frequency)
        text = {
            "messages": head + [schema.user_turn(question, len(refs)), schema.assistant_turn(answers[0])],
            "answers": answers,
        }
    return source_id, text, category, refs


def split_of(row_id: str, eval_fraction: float, seed: int = 0) -> str:
    """'train' or 'eval' from a hash of the id alone: stable across re-runs and when rows are appended."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") / 2**64 < eval_fraction else "train"


# ----------------------------------------------------------------------------------------------------------
# Output: streamed Parquet shards.


def dataset_features(task: str):
    """The `datasets` Features of a shard: the schema.py layout with images as ``Image`` (decoded to PIL)."""
    from datasets import Features, Image, List, Value

    message = List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})})
    if task == "sft":
        return Features({"id": Value("string"), "images": List(Image()), "messages": message,
                         "answers": List(Value("string")), "category": Value("string")})
    return Features({"id": Value("string"), "images": List(Image()), "prompt": message, "chosen": message,
                     "rejected": message, "category": Value("string")})


def arrow_schema(task: str) -> pa.Schema:
    """schema.SCHEMAS[task] plus the `datasets` feature metadata, so load_dataset('parquet') yields PIL images."""
    features_schema = dataset_features(task).arrow_schema
    base = schema.SCHEMAS[task]
    assert features_schema.remove_metadata().equals(base), "dataset_features() drifted from components.common.schema"
    return base.with_metadata(features_schema.metadata)


class ShardWriter:
    """Writes one split as ``<split>/part-NNNNN.parquet`` files of at most ``rows_per_shard`` rows."""

    def __init__(self, out_dir: Path, split: str, schema_: pa.Schema, rows_per_shard: int, row_group_rows: int):
        self.dir = out_dir / split
        self.split = split
        self.schema = schema_
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.buffer: list[dict] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_file = 0
        self.rows = 0
        self.files: list[str] = []

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        rel = f"{self.split}/part-{len(self.files):05d}.parquet"
        # No dictionary encoding: it would hash every image blob only to give up; zstd is cheap on JPEG/PNG bytes.
        self.writer = pq.ParquetWriter(self.dir.parent / rel, self.schema, compression="zstd", use_dictionary=False)
        self.files.append(rel)
        self.rows_in_file = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.row_group_rows or self.rows_in_file + len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        while self.buffer:
            if self.writer is None:
                self._open()
            take = min(len(self.buffer), self.rows_per_shard - self.rows_in_file)
            chunk, self.buffer = self.buffer[:take], self.buffer[take:]
            self.writer.write_table(pa.Table.from_pylist(chunk, schema=self.schema), row_group_size=self.row_group_rows)
            self.rows_in_file += take
            self.rows += take
            if self.rows_in_file >= self.rows_per_shard:
                self.writer.close()
                self.writer = None

    def close(self) -> list[str]:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if not self.files:  # an empty split still gets one (empty) file, so readers need no special case
            self._open()
            self.writer.close()
            self.writer = None
        return self.files


# ----------------------------------------------------------------------------------------------------------
# Statistics.


class Stat:
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
    def __init__(self) -> None:
        self.by_reason: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, example: str) -> None:
        entry = self.by_reason.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append(example)

    def count(self, exclude: set[str] = frozenset()) -> int:
        return sum(e["count"] for r, e in self.by_reason.items() if r not in exclude)

    def as_dict(self) -> dict[str, Any]:
        return {r: self.by_reason[r] for r in sorted(self.by_reason)}


# ----------------------------------------------------------------------------------------------------------
# The step.


def available_cpus() -> int:
    """CPUs this process may really use: affinity, capped by a cgroup v2 CPU quota (Kubernetes/Vertex limits),
    so a pod limited to 2 CPUs on a 64-core node starts 2 workers, not 64."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _clear_output(output: str) -> None:
    """Remove a previous run's manifest, then its shards, so nothing stale can pass for this run's output."""
    artifacts.invalidate(output)
    for split in schema.SPLITS:
        if storage.is_remote(output):
            for uri in storage.list_files(storage.join(output, split)):
                storage.delete(uri)
        else:
            shutil.rmtree(storage.to_local_path(output) / split, ignore_errors=True)


def _file_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _too_many_invalid(cfg, source_uri: str, rejects: "Rejects", counts, early: bool) -> TooManyInvalidRowsError:
    rows_in = counts["rows_in"]
    invalid = rejects.count(exclude=NOT_INVALID)
    fraction = invalid / rows_in if rows_in else 0.0
    where = f"after the first {rows_in} rows (stopped early) " if early else ""
    reasons = ", ".join(
        f"{r}={e['count']} (e.g. {', '.join(e['examples'][:3])})" for r, e in rejects.as_dict().items()
    )
    hint = ""
    if any(r.startswith("column_not_found:") for r in rejects.by_reason):
        hint = " Some columns named by the config are not in the source: set the column mapping (--preset NAME or --set question_column=...)."
    return TooManyInvalidRowsError(
        f"{where}{invalid} of {rows_in} rows of {source_uri!r} are invalid ({fraction:.1%}), above "
        f"max_invalid_fraction={cfg.max_invalid_fraction:.1%}. Rejects by reason: {reasons}.{hint} Fix the source, "
        "check the column mapping (--preset / --set image_column=...), or raise --max-invalid-fraction to accept the loss.",
        {"counts": {"rows_in": rows_in, "rows_out": counts["rows_out"], "invalid": invalid}, "rejects": rejects.as_dict()},
    )


def run(config: PrepareDataConfig, source: str, output: str) -> dict[str, Any]:
    """Prepare ``source`` into a dataset artifact at ``output``; returns the manifest that was written.

    Raises ConfigError (bad config/processor), SourceError / FileNotFoundError (unreadable source) and
    TooManyInvalidRowsError (share of invalid rows above ``max_invalid_fraction``); none of them leave a
    manifest behind.
    """
    cfg = config.resolved()
    problems = cfg.validate()
    if problems:
        raise ConfigError("invalid PrepareDataConfig:\n  - " + "\n  - ".join(problems))
    started = time.time()
    processor_settings = load_processor_settings(cfg.processor, cfg.longest_edge) if cfg.processor else None
    target_edge = processor_settings["size"]["longest_edge"] if processor_settings else cfg.longest_edge
    settings = imagelib.ImageSettings(target_edge, cfg.max_image_pixels, cfg.image_format, cfg.jpeg_quality)

    with storage.local_input(source) as src_path:
        src = open_source(Path(src_path), cfg.source_split)
        if not storage.is_remote(output):
            out_path = storage.to_local_path(output).resolve()
            if out_path == src.root.resolve() or out_path in src.root.resolve().parents:
                raise ConfigError(
                    f"output {output!r} is the source folder or holds it; writing there would overwrite the "
                    f"source. Pass a separate --output folder."
                )
        _clear_output(output)
        # local_output stages into a fresh folder and publishes it (manifest last) only if the body succeeds.
        with storage.local_output(output) as out_dir:
            manifest = _process(cfg, src, Path(out_dir), settings, processor_settings, source)
            manifest["seconds"] = round(time.time() - started, 2)
            manifest["source"] = source
            manifest = artifacts.write_manifest(str(out_dir), manifest)  # last act: the folder is now complete
    return manifest


def _process(cfg, src, out_dir: Path, settings, processor_settings, source_uri: str) -> dict[str, Any]:
    from tqdm.auto import tqdm

    root = src.root
    root_resolved = root.resolve()
    out_schema = arrow_schema(cfg.task)
    writers = {s: ShardWriter(out_dir, s, out_schema, cfg.rows_per_shard, cfg.row_group_rows) for s in schema.SPLITS}
    rejects = Rejects()
    # 64-bit keys, not the strings: the only state that grows with the dataset stays ~70 bytes a row.
    seen_content: set[int] = set()
    seen_ids: set[int] = set()
    stats = {k: Stat() for k in ("width", "height", "source_width", "source_height", "tokens_per_image", "tokens_per_sample", "images_per_row")}
    token_hist: collections.Counter = collections.Counter()
    modes: collections.Counter = collections.Counter()
    token_cache: dict[tuple[int, int], int | None] = {}
    counts = collections.Counter()

    workers = available_cpus() if cfg.num_workers is None else cfg.num_workers
    chunk_rows = 8
    pool = None
    if workers > 0:
        # fork: no interpreter start-up per worker and no re-import of __main__ (spawn breaks for `python -`
        # and stdin-fed runners). Workers only run Pillow code, never the parent's threads or torch.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
    max_in_flight = max(2, 4 * workers)

    def fail_early_if_hopeless() -> None:
        # Don't grind through a whole dataset that is bound to fail: when the invalid rows already exceed the
        # limit for the known total, or the first EARLY_ROWS rows all failed (a wrong column mapping).
        invalid = rejects.count(exclude=NOT_INVALID)
        seen = counts["rows_in"]
        hopeless = (src.total_rows and invalid > cfg.max_invalid_fraction * src.total_rows) or (
            seen >= EARLY_ROWS and invalid == seen and cfg.max_invalid_fraction < 1.0
        )
        if hopeless:
            raise _too_many_invalid(cfg, source_uri, rejects, counts, early=True)

    def prepared() -> Iterator[PendingRow]:
        for index, (label, row, error) in enumerate(iter_rows(src)):
            counts["rows_in"] += 1
            if error:
                rejects.add(error, label)
                continue
            try:
                source_id, text, category, refs = normalize_row(row, cfg, root, root_resolved)
            except RowRejected as e:
                example = row.get(cfg.id_column) if cfg.id_column else None
                rejects.add(e.reason, str(example) if example not in (None, "") else label)
                fail_early_if_hopeless()
                continue
            yield PendingRow(index, label, source_id, text, category, refs)

    def finish(pending: PendingRow, results: list) -> None:
        example = pending.source_id or pending.label
        for r in results:
            if isinstance(r, tuple):
                rejects.add(r[0], example)
                return
        content = hashlib.blake2b(digest_size=16)
        content.update(json.dumps(pending.text, sort_keys=True).encode())
        for r in results:
            content.update(r.source_hash.encode())
        content_key = int.from_bytes(content.digest()[:8], "big")
        if cfg.duplicates == "reject":
            if content_key in seen_content:
                rejects.add("duplicate", example)
                return
            seen_content.add(content_key)
        row_id = pending.source_id or content.hexdigest()
        id_key = int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=8).digest(), "big")
        if id_key in seen_ids:
            rejects.add("duplicate_id", example)
            return
        seen_ids.add(id_key)
        sample_tokens = 0
        for r in results:
            stats["width"].add(r.width)
            stats["height"].add(r.height)
            stats["source_width"].add(r.source_width)
            stats["source_height"].add(r.source_height)
            modes[r.source_mode] += 1
            counts["images_reencoded" if r.reencoded else "images_passed_through"] += 1
            key = (r.width, r.height)
            if key not in token_cache:
                token_cache[key] = tokens_for_size(r.width, r.height, processor_settings)
            tokens = token_cache[key]
            if tokens is not None:
                stats["tokens_per_image"].add(tokens)
                token_hist[tokens] += 1
                sample_tokens += tokens
        stats["images_per_row"].add(len(results))
        if processor_settings and processor_settings.get("image_seq_len") is not None:
            stats["tokens_per_sample"].add(sample_tokens)
        split = split_of(row_id, cfg.eval_fraction, cfg.seed)
        writers[split].add(
            {
                "id": row_id,
                "images": [{"bytes": r.data, "path": None} for r in results],
                **pending.text,
                "category": pending.category,
            }
        )
        counts["rows_out"] += 1

    bar = tqdm(total=src.total_rows, unit="row", desc="prepare-data", disable=not cfg.progress, mininterval=1.0)
    try:
        in_flight: collections.deque = collections.deque()

        def drain_one() -> None:
            chunk, future = in_flight.popleft()
            results = future.result() if pool else future
            for pending, (_, res) in zip(chunk, results):
                finish(pending, res)
            bar.update(len(chunk))
            if rejects.by_reason:
                bar.set_postfix_str(f"rejected={rejects.count()}", refresh=False)
            fail_early_if_hopeless()


        for chunk in _chunks(prepared(), chunk_rows):
            tasks = [(p.index, p.refs) for p in chunk]
            if pool:
                in_flight.append((chunk, pool.submit(imagelib.process_chunk, tasks, settings)))
                while len(in_flight) > max_in_flight:
                    drain_one()
            else:
                in_flight.append((chunk, imagelib.process_chunk(tasks, settings)))
                drain_one()
            for p in chunk:  # the refs (possibly image bytes) are no longer needed here
                p.refs = []
        while in_flight:
            drain_one()
    finally:
        bar.close()
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)

    split_files = {s: writers[s].close() for s in schema.SPLITS}
    rows_in = counts["rows_in"]
    invalid = rejects.count(exclude=NOT_INVALID)
    invalid_fraction = invalid / rows_in if rows_in else 0.0
    summary = {
        "rows_in": rows_in,
        "rows_out": counts["rows_out"],
        "rejected": rejects.count(),
        "invalid": invalid,
        "invalid_fraction": round(invalid_fraction, 6),
        "images_reencoded": counts["images_reencoded"],
        "images_passed_through": counts["images_passed_through"],
    }
    if rows_in == 0:
        raise TooManyInvalidRowsError(f"source {source_uri!r} has no rows; nothing to prepare", {"counts": summary, "rejects": {}})
    if invalid_fraction > cfg.max_invalid_fraction or counts["rows_out"] == 0:
        raise _too_many_invalid(cfg, source_uri, rejects, counts, early=False)
    all_files = [out_dir / f for s in schema.SPLITS for f in split_files[s]]
    return {
        "kind": schema.DATASET_KIND,
        "schema_version": 1,
        "task": cfg.task,
        "splits": {s: {"rows": writers[s].rows, "files": split_files[s]} for s in schema.SPLITS},
        "content_hash": _file_hash(all_files),
        "counts": summary,
        "rejects": rejects.as_dict(),
        "processor_settings": processor_settings,
        "images": {
            "count": stats["width"].n,
            "width": stats["width"].summary(),
            "height": stats["height"].summary(),
            "source_width": stats["source_width"].summary(),
            "source_height": stats["source_height"].summary(),
            "source_modes": dict(sorted(modes.items())),
            "per_row": stats["images_per_row"].summary(),
            "stored_longest_edge_cap": settings.longest_edge,
        },
        "tokens_per_image": (
            {**stats["tokens_per_image"].summary(), "histogram": {str(k): v for k, v in sorted(token_hist.items())}}
            if stats["tokens_per_image"].n else None
        ),
        "tokens_per_sample": stats["tokens_per_sample"].summary(),
        "schema": {name: str(out_schema.field(name).type) for name in out_schema.names},
        "config": to_dict(cfg),
        "warnings": (
            [f"{invalid} of {rows_in} rows invalid ({invalid_fraction:.1%}), within max_invalid_fraction="
             f"{cfg.max_invalid_fraction:.1%}; see rejects"] if invalid else []
        ),
    }


# ----------------------------------------------------------------------------------------------------------
# Reading a prepared dataset back (used by the sft, dpo and evaluate steps).


def load_split(dataset_uri: str, split: str, *, cache_dir: str | None = None):
    """One split of a prepared dataset as a ``datasets.Dataset`` (images decode to PIL).

    Reads the manifest first: a folder without one (crashed or running writer) is refused with
    ``artifacts.IncompleteArtifactError``.
    """
    import datasets

    manifest = artifacts.read_manifest(dataset_uri, kind=schema.DATASET_KIND)
    if split not in manifest["splits"]:
        raise ValueError(f"{dataset_uri!r} has splits {sorted(manifest['splits'])}, not {split!r}")
    files = [storage.join(dataset_uri, f) for f in manifest["splits"][split]["files"]]
    features = dataset_features(manifest["task"])

    def load(local_files: list[str]):
        return datasets.load_dataset("parquet", data_files={split: local_files}, split=split, features=features,
                                     cache_dir=cache_dir)

    if storage.is_remote(dataset_uri):
        import tempfile

        # load_dataset copies the rows into its own Arrow cache, so the downloaded shards can go right after.
        with tempfile.TemporaryDirectory(prefix="vlmtune-dataset-") as tmp:
            local_files = []
            for i, uri in enumerate(files):
                target = Path(tmp) / f"{i:05d}.parquet"
                target.write_bytes(storage.read_bytes(uri))
                local_files.append(str(target))
            return load(local_files)
    files = [str(storage.to_local_path(f)) for f in files]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise artifacts.IncompleteArtifactError(
            f"{dataset_uri!r}: its manifest lists {missing[0]!r}, which is missing. The folder was modified "
            f"after prepare-data finished; re-run prepare-data."
        )
    return load(files)
