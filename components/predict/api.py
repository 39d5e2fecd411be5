"""Ask a trained (or any SmolVLM/Idefics3) model about images, batches of images and videos.

    from components.predict import Predictor

    predictor = Predictor.from_ref("/srv/registry::chart-vlm@champion")   # or a folder, gs://, hub id, name@3
    predictor.ask("What colour is the shape?", ["shape.png"])
    predictor.ask("Which image shows more shapes?", ["a.png", "b.png"])           # several images, one prompt
    predictor.ask_batch([{"id": "q1", "question": "...", "image": "a.png"}, ...], batch_size=16)
    predictor.ask_video("What happens?", "clip.mp4", frames=8)

Every path goes through :func:`components.common.generation.generate_answers`, the batched, left-padded
generation the evaluate step uses, so an answer here is the answer evaluation scored. A vlmtune model artifact
(adapter on its base) is loaded on its base in full precision and merged by
:func:`components.common.modeling.load_for_inference`.

Video frames are passed as that many images in one prompt, in temporal order, which every Idefics3 model
accepts (SmolVLM's processor has its own video path, SmolVLM2's template alone knows what to do with it).
Frames are not split into tiles (``do_image_splitting=False``): one tile per frame, as SmolVLM's own video
processing does, instead of up to 17 tiles x 81 tokens per frame at SmolVLM-Instruct's 1536 px.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from components.common.generation import GenerationOptions, generate_answers

DEFAULT_FRAMES = 8
# Rows whose images are loaded at once while answering a batch: bounds memory on big batch files
# while keeping every generate call full.
ROWS_IN_MEMORY_PER_BATCH = 8


class BatchFileError(ValueError):
    """A batch file has lines that cannot be used; the message lists every one, by line number."""


def resolve_model(ref: str, registry: str | None = None) -> str:
    """The folder, ``gs://`` URI or hub id that ``ref`` names.

    An existing local path is taken as it is. ``NAME@REF`` is looked up in ``registry`` (or in the registry
    named in the reference, ``REGISTRY::NAME@REF``, or in ``$VLMTUNE_REGISTRY``); anything else is a
    folder, ``gs://`` URI or hub id.
    """
    from components.common.registry import parse_reference, resolve_reference

    ref = str(ref).strip()
    if Path(ref).exists():
        return ref
    parsed = parse_reference(ref)
    if parsed is not None and parsed[0] is None and registry:
        ref = f"{registry}::{ref}"
    return resolve_reference(ref) or ref


def check_options(options: GenerationOptions) -> list[str]:
    """Every problem with ``options`` (empty when they can be used)."""
    problems = []
    if options.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be at least 1, not {options.max_new_tokens}")
    if options.num_beams < 1:
        problems.append(f"num_beams must be at least 1, not {options.num_beams}")
    if options.do_sample and options.temperature <= 0:
        problems.append(f"temperature must be above 0 when sampling, not {options.temperature} (use greedy decoding instead)")
    if not 0 < options.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], not {options.top_p}")
    if options.repetition_penalty <= 0:
        problems.append(f"repetition_penalty must be above 0, not {options.repetition_penalty}")
    return problems


def load_image(source: Image.Image | str | Path, where: str = "") -> Image.Image:
    """An RGB image, upright by its EXIF orientation. ``where`` (e.g. "line 3") goes into error messages."""
    if isinstance(source, Image.Image):
        return source.convert("RGB") if source.mode != "RGB" else source
    path = Path(source)
    context = f" ({where})" if where else ""
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r}{context} does not exist")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"image file {str(path)!r}{context} cannot be read as an image: {e}") from e


def conversation(question: str, n_images: int) -> list[dict]:
    """The SmolVLM chat form of one question about ``n_images`` images (images first, as SmolVLM is trained)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]


@dataclass
class BatchRow:
    """One question of a batch: ``images`` are paths (or PIL images) in prompt order."""

    id: Any
    question: str
    images: list
    line: int | None = None  # 1-based line of the batch file it came from

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"row {self.id!r}"


def parse_row(row: dict, index: int, base_dir: Path | None = None, line: int | None = None) -> tuple[BatchRow | None, list[str]]:
    """A checked :class:`BatchRow` from a dict with ``question`` and ``image`` (one) or ``images`` (a list),
    plus an optional ``id`` (default: the line number, or the row's position); relative image paths are
    taken from ``base_dir``. Returns (row or None, problems)."""
    where = f"line {line}" if line is not None else f"row {index}"
    problems = []
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object, got {type(row).__name__}"]
    question = row.get("question")
    if question is None:
        problems.append(f"{where}: missing the 'question' field")
    elif not isinstance(question, str) or not question.strip():
        problems.append(f"{where}: 'question' must be a non-empty string")
    if "image" in row and "images" in row:
        problems.append(f"{where}: give either 'image' or 'images', not both")
    images = row.get("images", [row["image"]] if "image" in row else [])
    if not isinstance(images, list):
        images = [images]
    resolved = []
    for image in images:
        if isinstance(image, Image.Image):
            resolved.append(image)
            continue
        if not isinstance(image, (str, Path)) or not str(image):
            problems.append(f"{where}: an image must be a path, not {image!r}")
            continue
        path = Path(image)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            problems.append(f"{where}: image file {str(path)!r} does not exist")
        resolved.append(path)
    if problems:
        return None, problems
    default_id = line if line is not None else index
    return BatchRow(id=row.get("id", default_id), question=question, images=resolved, line=line), []


def read_batch_file(path: str | Path) -> list[BatchRow]:
    """The rows of a JSONL batch file (image paths relative to the file's folder), checked before any model
    is loaded; raises :class:`BatchFileError` listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch file {str(path)!r} does not exist")
    rows, problems = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"line {line_no}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            row, row_problems = parse_row(data, len(rows), base_dir=path.parent, line=line_no)
            problems.extend(row_problems)
            if row is not None:
                rows.append(row)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise BatchFileError(f"batch file {str(path)!r} has {len(problems)} problem(s):\n  " + "\n  ".join(shown))
    if not rows:
        raise BatchFileError(f"batch file {str(path)!r} has no rows; write one JSON object per line with "
                             f"'question' and 'image' or 'images'")
    return rows


class Predictor:
    """A loaded model and processor, and the ways to ask it things. Build it with :meth:`from_ref`."""

    def __init__(self, model, processor, model_uri: str | None = None):
        self.model = model
        self.processor = processor
        self.model_uri = model_uri

    @classmethod
    def from_ref(cls, ref: str, *, registry: str | None = None, trust_remote_code: bool = False) -> "Predictor":
        """Load ``ref``: a folder, ``gs://`` URI, hub id, vlmtune model artifact, or a registry reference
        ``[REGISTRY::]NAME@VERSION|ALIAS`` (``registry`` is used when the reference names none)."""
        from components.common.modeling import load_for_inference

        uri = resolve_model(ref, registry)
        model, processor = load_for_inference(uri, trust_remote_code=trust_remote_code)
        return cls(model, processor, uri)

    def _generate(self, conversations, images, batch_size, options, processor_kwargs=None) -> list[str]:
        options = options or GenerationOptions()
        problems = check_options(options)
        if problems:
            raise ValueError("generation options: " + "; ".join(problems))
        return generate_answers(self.model, self.processor, conversations, images, batch_size, options,
                                processor_kwargs=processor_kwargs)

    def ask(self, question: str, images: Sequence | Image.Image | str | Path = (), options: GenerationOptions | None = None) -> str:
        """The answer to ``question`` about ``images`` (one, or several in one prompt, in order)."""
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        loaded = [load_image(image) for image in images]
        return self._generate([conversation(question, len(loaded))], [loaded], 1, options)[0]

    def iter_batch(
        self,
        rows: Iterable[dict | BatchRow],
        batch_size: int = 8,
        options: GenerationOptions | None = None,
        progress: bool | Callable[[int], None] = False,
        base_dir: str | Path | None = None,
    ) -> Iterator[tuple[BatchRow, str]]:
        """(row, answer) pairs in input order, generated ``batch_size`` rows at a time with left padding.

        Images are loaded a few batches at a time, so a batch file of any length fits in memory. ``progress``
        is True (a tqdm bar on stderr) or a callable that receives the number of rows just answered.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        checked, problems = [], []
        for i, row in enumerate(rows):
            if isinstance(row, BatchRow):
                checked.append(row)
                continue
            parsed, row_problems = parse_row(row, i, Path(base_dir) if base_dir else None)
            problems.extend(row_problems)
            if parsed is not None:
                checked.append(parsed)
        if problems:
            raise BatchFileError(f"{len(problems)} bad row(s):\n  " + "\n  ".join(problems[:20]))
        bar = None
        if progress is True:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(checked), desc="predict", unit="row")
        try:
            chunk = batch_size * ROWS_IN_MEMORY_PER_BATCH
            for start in range(0, len(checked), chunk):
                part = checked[start:start + chunk]
                images = [[load_image(image, row.where) for image in row.images] for row in part]
                conversations = [conversation(row.question, len(row.images)) for row in part]
                # generate_answers in slices of batch_size so the bar moves with each batch.
                for b in range(0, len(part), batch_size):
                    answers = self._generate(conversations[b:b + batch_size], images[b:b + batch_size], batch_size, options)
                    yield from zip(part[b:b + batch_size], answers)
                    if bar is not None:
                        bar.update(len(answers))
                    elif callable(progress):
                        progress(len(answers))
        finally:
            if bar is not None:
                bar.close()

    def ask_batch(
        self,
        rows: Iterable[dict | BatchRow],
        batch_size: int = 8,
        options: GenerationOptions | None = None,
        progress: bool | Callable[[int], None] = False,
        base_dir: str | Path | None = None,
    ) -> list[str]:
        """One answer per row, in order. A row has ``question`` and ``image`` (a path) or ``images`` (paths, in
        prompt order); relative paths are taken from ``base_dir``."""
        return [answer for _, answer in self.iter_batch(rows, batch_size, options, progress, base_dir)]

    def ask_video(
        self,
        question: str,
        video_path: str | Path,
        frames: int = DEFAULT_FRAMES,
        options: GenerationOptions | None = None,
        split_frames: bool = False,
    ) -> str:
        """The answer to ``question`` about ``frames`` evenly spaced frames of the video, in temporal order,
        given as that many images in one prompt (fewer if the video has fewer frames). A still image or a
        one-frame file raises :class:`components.predict.video.NotAVideoError` (use :meth:`ask` for those)."""
        from components.predict.video import sample_frames

        return self.ask_frames(question, sample_frames(video_path, frames), options, split_frames)

    def ask_frames(
        self,
        question: str,
        frames: Sequence[Image.Image],
        options: GenerationOptions | None = None,
        split_frames: bool = False,
    ) -> str:
        """The answer to ``question`` about video ``frames`` (in temporal order). Each frame is one tile unless
        ``split_frames`` tiles it like a still image (many more tokens per frame)."""
        images = [load_image(frame) for frame in frames]
        kwargs = None if split_frames else {"do_image_splitting": False}
        return self._generate([conversation(question, len(images))], [images], 1, options, processor_kwargs=kwargs)[0]
