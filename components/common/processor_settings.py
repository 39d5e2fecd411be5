"""The processor settings contract: how an Idefics3/SmolVLM processor will size and tile an image.

prepare-data reads these settings from the target model's processor, resizes the stored images for them and
records them in the dataset manifest (``processor_settings``); SFT, DPO and evaluate apply the same settings
to their processor (:func:`apply_processor_settings`), so the token counts in the manifest hold at training
and evaluation time and the saved processor resizes as the data was prepared. No step owns this: it is the
agreement between them.

The geometry functions (:func:`processor_output_size`, :func:`tile_grid`, :func:`image_tokens`) reproduce
the processor's own arithmetic with plain integers (no torch, no transformers), so prepare-data's image
workers can use them and predict each image's token cost exactly.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from components.common import storage
from components.common.config import ConfigError

# transformers' Idefics3 image processor caps any edge at this size (MAX_IMAGE_SIZE there).
PROCESSOR_MAX_EDGE = 4096
# Files never fetched when only a remote processor is needed: the model weights next to it.
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx"}


# ----------------------------------------------------------------------------------------------------------
# Geometry: the processor's own arithmetic.

def processor_output_size(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """(width, height) after the Idefics3 processor's first resize to ``longest_edge`` (its exact rounding)."""
    aspect = width / height
    if width >= height:
        w = longest_edge
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest_edge
        w = int(h * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    # then "scale below upper bound"
    aspect = w / h
    if w >= h and w > PROCESSOR_MAX_EDGE:
        w = PROCESSOR_MAX_EDGE
        h = int(w / aspect)
    elif h > w and h > PROCESSOR_MAX_EDGE:
        h = PROCESSOR_MAX_EDGE
        w = int(h * aspect)
    return max(w, 1), max(h, 1)


def tile_grid(width: int, height: int, size_longest_edge: int, tile: int, do_image_splitting: bool) -> tuple[int, int]:
    """(rows, cols) of tiles the Idefics3 processor cuts an image of this size into (0, 0: global image only)."""
    if not do_image_splitting:
        return 0, 0
    w, h = processor_output_size(width, height, size_longest_edge)
    aspect = w / h
    if w >= h:
        W = math.ceil(w / tile) * tile
        H = int(W / aspect)
        H = math.ceil(H / tile) * tile
    else:
        H = math.ceil(h / tile) * tile
        W = int(H * aspect)
        W = math.ceil(W / tile) * tile
    if H > tile or W > tile:
        return math.ceil(H / tile), math.ceil(W / tile)
    return 0, 0


def image_tokens(rows: int, cols: int, image_seq_len: int, extra_split_newline: int = 0) -> int:
    """Tokens one image expands to in the prompt (Idefics3Processor's layout: tiles, row breaks, global image)."""
    base = image_seq_len + 3  # <fake><global-img><image>*n<fake>
    if rows == 0:
        return base
    return base + extra_split_newline + rows * (cols * (image_seq_len + 2) + 1)



# ----------------------------------------------------------------------------------------------------------
# Reading the settings from a processor, applying them to one.


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
        prefix = ref.rstrip("/") + "/"
        wanted = [uri for uri in storage.list_files(ref)
                  if "/" not in uri[len(prefix):] and Path(uri).suffix not in WEIGHT_SUFFIXES]
        with tempfile.TemporaryDirectory(prefix="vlmtune-processor-") as tmp:
            storage.download_files(wanted, tmp)
            processor = _load(tmp)
    else:
        local = storage.to_local_path(ref)
        processor = _load(str(local) if local.exists() else ref)
    image_processor = getattr(processor, "image_processor", processor)
    size = _longest_edge(getattr(image_processor, "size", None))
    tile = _longest_edge(getattr(image_processor, "max_image_size", None))
    splitting = bool(getattr(image_processor, "do_image_splitting", False))
    if size is None or tile is None:
        raise ConfigError(
            f"processor: {ref!r} has no size/max_image_size longest_edge settings; it is not an Idefics3/SmolVLM "
            f"processor. Use a SmolVLM/Idefics3 model, or leave `processor` unset."
        )
    if longest_edge is not None:
        size = min(longest_edge, PROCESSOR_MAX_EDGE)
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


def _longest_edge(value: Any) -> int | None:
    """``size["longest_edge"]`` of a processor setting, whether it is a dict or a ``SizeDict``."""
    if value is None:
        return None
    try:
        return int(value["longest_edge"])
    except (KeyError, TypeError):
        return getattr(value, "longest_edge", None)


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
    rows, cols = tile_grid(
        width, height, settings["size"]["longest_edge"], settings["max_image_size"]["longest_edge"],
        settings["do_image_splitting"],
    )
    return image_tokens(rows, cols, settings["image_seq_len"], settings.get("extra_split_newline_tokens", 0))
