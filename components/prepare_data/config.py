"""Typed config of the ``prepare-data`` step (see ``core.run``).

Load it with ``components.common.config.load_config(PrepareDataConfig, path, overrides)``; every problem is
reported at once by :meth:`PrepareDataConfig.validate`. A ``preset`` fills in the column mapping of a common
dataset layout; any field you set yourself wins over the preset (a field still at its default takes the
preset's value).

``PRESETS`` below is the one place a preset's values are written. ``--preset NAME`` and ``preset: NAME`` in a
YAML both name it; the shipped ``pipelines/configs/prepare_data/*.yaml`` name theirs and add only
dataset-specific settings (tests/pipelines/test_configs.py refuses a shipped file that repeats a preset's value). They stay
in code rather than in YAML files because the step resolves them inside its own container, where it may read
only its own package and ``components.common``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from components.common.processor_settings import IMAGE_SIZINGS

TASKS = ("sft", "preference")
IMAGE_FORMATS = ("auto", "png", "jpeg")
DUPLICATE_RULES = ("reject", "keep")

# Column layouts of common public datasets. Values are defaults for PrepareDataConfig fields.
PRESETS: dict[str, dict[str, Any]] = {
    # The built-in demo generator and any "image/question/answer" folder.
    "default": {},
    # VQAv2 (HF layout): question + a list of 10 annotator answers ({"answer": ...} dicts or strings);
    # the most frequent answer becomes the training target, all of them stay references.
    "vqav2": {
        "question_column": "question",
        "answer_column": "answers",
        "id_column": "question_id",
        "category_column": "answer_type",
        "answers_by_frequency": True,
    },
    # ChartQA: "query" + "label" (a list with one or more answers).
    "chartqa": {"question_column": "query", "answer_column": "label", "category_column": "human_or_machine"},
    # Captioning sets (COCO-style): no question column; one caption or a list of captions.
    "captioning": {"question_column": None, "answer_column": "caption", "question": "Describe this image."},
    # Multi-turn chats: a "messages" column in role/content form plus an "images" column.
    "messages": {"messages_column": "messages", "image_column": "images", "question_column": None, "answer_column": None},
    # RLAIF-V style preference rows: question/chosen/rejected + image.
    "rlaif_v": {"task": "preference", "id_column": "idx", "category_column": "ds_name"},
}


def _help(text: str, choices: tuple[str, ...] | None = None) -> dict[str, object]:
    """Field metadata: the help text of its --flag and, if given, the only values the flag accepts."""
    return {"help": text, "choices": choices} if choices else {"help": text}


@dataclass
class PrepareDataConfig:
    task: str = field(default="sft", metadata=_help("'sft' (question/answer rows) or 'preference' (chosen/rejected rows).", TASKS))
    preset: str | None = field(
        default=None, metadata=_help(f"Column layout preset: {', '.join(PRESETS)}. Fields you set yourself win.", tuple(sorted(PRESETS)))
    )
    # Column mapping.
    image_column: str = field(default="image", metadata=_help("Column with the image: a path relative to the source, bytes, a {bytes,path} struct, or a list of these."))
    question_column: str | None = field(default="question", metadata=_help("Column with the user question (None: use `question`)."))
    answer_column: str | None = field(default="answer", metadata=_help("Column with the answer: a string or a list of reference answers (first = training target)."))
    chosen_column: str = field(default="chosen", metadata=_help("Preference task: column with the preferred answer."))
    rejected_column: str = field(default="rejected", metadata=_help("Preference task: column with the dispreferred answer."))
    system_prompt_column: str | None = field(default=None, metadata=_help("Column with a per-row system prompt (optional)."))
    category_column: str | None = field(default="category", metadata=_help("Column with a category for per-category metrics (optional; missing -> null)."))
    id_column: str | None = field(default="id", metadata=_help("Column with a stable row id (missing -> content hash). The id decides the train/eval split."))
    messages_column: str | None = field(default=None, metadata=_help("Column with multi-turn chats (list of {role, content}); replaces question/answer columns."))
    question: str | None = field(default=None, metadata=_help("Fixed question for rows without a question column (e.g. captioning)."))
    system_prompt: str | None = field(default=None, metadata=_help("System prompt added to every row (a per-row column wins)."))
    answers_by_frequency: bool = field(default=False, metadata=_help("Order a row's reference answers by frequency (most common = training target)."))
    source_split: str | None = field(default=None, metadata=_help("For a `datasets` DatasetDict source: the split to read (default: all splits)."))
    # Splitting.
    eval_fraction: float = field(default=0.2, metadata=_help("Share of rows in the eval split, decided by a hash of the row id (stable when data is appended)."))
    duplicates: str = field(default="reject", metadata=_help("Rows with identical content (text + image bytes): 'reject' (keep the first, count the rest) or 'keep'.", DUPLICATE_RULES))
    # Images.
    processor: str | None = field(
        default=None,
        metadata=_help("Model folder / hub id / gs:// folder whose image processor settings drive token-aware resizing (loaded with trust_remote_code=False)."),
    )
    longest_edge: int | None = field(
        default=None,
        metadata=_help("Longest image edge for training (default: the processor's size['longest_edge']). Snapped down to a multiple of the processor's tile size; saved in the manifest so training uses the same."),
    )
    image_sizing: str = field(
        default="need",
        metadata=_help("'need': each image costs the smallest grid of whole tiles that holds its own resolution, capped by "
                       "the processor's (or your `longest_edge`) size, never upscaled; 'fixed': the processor's own "
                       "behaviour, every image resized to that size first (small ones upscaled into many tiles). "
                       "Recorded in the manifest; SFT, DPO, evaluate and the saved processor follow it. Takes effect with "
                       "`processor` (without one no settings are recorded and later steps use the model's processor as it is).", IMAGE_SIZINGS),
    )
    max_image_pixels: int = field(default=64_000_000, metadata=_help("Decompression-bomb guard: images with more pixels are rejected before decoding."))
    image_format: str = field(default="auto", metadata=_help("Encoding of stored images: 'png', 'jpeg', or 'auto' (JPEG sources stay JPEG, others PNG).", IMAGE_FORMATS))
    jpeg_quality: int = field(default=95, metadata=_help("JPEG quality (1-100) when images are re-encoded as JPEG."))
    # Robustness and speed.
    max_invalid_fraction: float = field(default=0.05, metadata=_help("Fail when more than this share of input rows is invalid (duplicates not counted)."))
    rows_per_shard: int = field(default=2000, metadata=_help("Rows per Parquet file."))
    row_group_rows: int = field(default=64, metadata=_help("Rows per Parquet row group (small groups stream with little memory)."))
    num_workers: int | None = field(default=None, metadata=_help("Image worker processes (None: all cores; 0: in-process)."))
    seed: int = field(default=0, metadata=_help("Salt of the split hash: change it to draw a different train/eval split."))
    progress: bool = field(default=True, metadata=_help("Show a progress bar with rows/s."))

    def resolved(self) -> "PrepareDataConfig":
        """The config with the preset's values filled into fields still at their defaults."""
        if not self.preset:
            return self
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changes = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) == defaults[k]}
        return dataclasses.replace(self, **changes)

    def validate(self) -> list[str]:
        problems = []
        if self.preset is not None and self.preset not in PRESETS:
            problems.append(f"preset: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
            return problems
        cfg = self.resolved()
        if cfg.task not in TASKS:
            problems.append(f"task: must be one of {TASKS}, got {cfg.task!r}")
        if not 0.0 <= cfg.eval_fraction < 1.0:
            problems.append(f"eval_fraction: must be in [0, 1), got {cfg.eval_fraction}")
        if not 0.0 <= cfg.max_invalid_fraction <= 1.0:
            problems.append(f"max_invalid_fraction: must be in [0, 1], got {cfg.max_invalid_fraction}")
        if cfg.image_format not in IMAGE_FORMATS:
            problems.append(f"image_format: must be one of {IMAGE_FORMATS}, got {cfg.image_format!r}")
        if not 1 <= cfg.jpeg_quality <= 100:
            problems.append(f"jpeg_quality: must be in 1..100, got {cfg.jpeg_quality}")
        if cfg.image_sizing not in IMAGE_SIZINGS:
            problems.append(f"image_sizing: must be one of {IMAGE_SIZINGS}, got {cfg.image_sizing!r}")
        if cfg.max_image_pixels < 1:
            problems.append(f"max_image_pixels: must be positive, got {cfg.max_image_pixels}")
        if cfg.longest_edge is not None and cfg.longest_edge < 1:
            problems.append(f"longest_edge: must be positive, got {cfg.longest_edge}")
        if cfg.rows_per_shard < 1:
            problems.append(f"rows_per_shard: must be >= 1, got {cfg.rows_per_shard}")
        if cfg.row_group_rows < 1:
            problems.append(f"row_group_rows: must be >= 1, got {cfg.row_group_rows}")
        if cfg.num_workers is not None and cfg.num_workers < 0:
            problems.append(f"num_workers: must be >= 0 (0 = in-process), got {cfg.num_workers}")
        if cfg.duplicates not in DUPLICATE_RULES:
            problems.append(f"duplicates: must be one of {DUPLICATE_RULES}, got {cfg.duplicates!r}")
        if not cfg.image_column:
            problems.append("image_column: must name the column with the images")
        if cfg.task == "sft" and not cfg.messages_column:
            if not cfg.answer_column:
                problems.append("answer_column: SFT rows need an answer column (or set messages_column)")
            if not cfg.question_column and cfg.question is None:
                problems.append("question_column: set a question column, or a fixed `question` for every row")
        if cfg.task == "preference" and cfg.messages_column:
            problems.append("messages_column: multi-turn messages are for task 'sft'; preference rows use question/chosen/rejected")
        return problems
