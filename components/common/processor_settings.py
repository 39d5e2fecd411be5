"""The processor settings contract: how an Idefics3/SmolVLM processor will size and tile an image.

prepare-data reads these settings from the target model's processor, resizes the stored images for them and
records them in the dataset manifest (``processor_settings``); SFT, DPO and evaluate apply the same settings
to their processor (:func:`apply_processor_settings`), so the token counts in the manifest hold at training
and evaluation time and the saved processor resizes as the data was prepared. No step owns this: it is the
agreement between them.

The geometry functions (:func:`processor_output_size`, :func:`tile_grid`, :func:`image_tokens`) reproduce
the processor's own arithmetic with plain integers (no torch, no transformers), so prepare-data's image
workers can use them and predict each image's token cost exactly.

Image sizing (``image_sizing`` in the settings, prepare-data's ``image_sizing``):

- ``need`` (the default): an image is encoded at the smallest grid of whole tiles that holds its own
  resolution, capped by the processor's longest edge (or the user's ``longest_edge``). Images larger than the
  cap are stored downscaled to it, as in ``fixed``; smaller ones are stored as they are, never upscaled. At
  SmolVLM-256M's settings (2048 px, 512 px tiles, 64 tokens a tile) a 128x128 image is stored at 128 px and
  encoded as the processor's global image only: one tile, 64 image tokens (67 with its delimiters) instead of
  16 tiles + the global image (1,088). A 600x400 image becomes 2x2 tiles + the global image; a 4000x3000 one
  is downscaled to 2048x1536 and costs exactly what it cost before.
- ``fixed``: the processor's own behaviour: every image is first resized so its longest edge is the cap
  (upscaling small ones), then tiled. This is the size distribution the model was trained at.

How the processor is made to agree, for every caller at once (our collators, TRL's DPO collator, generation,
predict): the Idefics3 image processor resizes each image to ``size["longest_edge"]`` only when ``do_resize``
is on; with it off, its next step (``resize_for_vision_encoder``) rounds each image's own size up to whole
tiles, which is exactly the need rule once the image is within the cap. So :func:`apply_processor_settings`
turns ``do_resize`` off for ``need`` (a plain attribute: it survives ``save_pretrained``, so a trained
model's saved processor keeps sizing by need), and :func:`images_for_processor` downscales images above the
cap before any processor call (a no-op for prepared data, which is already within it). Checked against the
processor itself: identical to calling it with a per-image ``size={"longest_edge": need_longest_edge(...)}``.
Outside vlmtune, a processor saved with ``do_resize: false`` expects images already within its
``size["longest_edge"]``: downscale larger ones first.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

from components.common import storage
from components.common.config import ConfigError

# transformers' Idefics3 image processor caps any edge at this size (MAX_IMAGE_SIZE there).
PROCESSOR_MAX_EDGE = 4096
IMAGE_SIZINGS = ("need", "fixed")
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


def capped_size(width: int, height: int, cap: int | None) -> tuple[int, int]:
    """(width, height) of an image within the cap: unchanged when its longest edge fits, else downscaled to the
    processor's own size for ``cap`` (same rounding). What prepare-data stores, and what predict hands the
    processor under need-based sizing."""
    if cap is None or max(width, height) <= cap:
        return width, height
    return processor_output_size(width, height, cap)


def need_longest_edge(width: int, height: int, cap: int, tile: int) -> int:
    """The longest edge an image is encoded at under need-based sizing: the smallest multiple of ``tile`` that
    holds its own longest edge (within ``cap``). Never an upscale beyond rounding up to whole tiles."""
    longest = max(capped_size(width, height, cap))
    return -(-longest // tile) * tile


def tile_grid(width: int, height: int, size_longest_edge: int, tile: int, do_image_splitting: bool,
              image_sizing: str = "fixed") -> tuple[int, int]:
    """(rows, cols) of tiles the Idefics3 processor cuts an image of this size into (0, 0: global image only).

    ``fixed``: the processor first resizes the image to ``size_longest_edge`` (its ``do_resize``); ``need``:
    the image is only brought within that cap, then rounded up to whole tiles (``do_resize`` off)."""
    if not do_image_splitting:
        return 0, 0
    if image_sizing == "need":
        w, h = capped_size(width, height, size_longest_edge)
    else:
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


def load_processor_settings(ref: str, longest_edge: int | None = None, image_sizing: str = "need") -> dict[str, Any]:
    """Read the image-size settings of an Idefics3/SmolVLM processor (folder, gs:// folder or hub id).

    ``longest_edge`` overrides ``size["longest_edge"]`` (the cap), snapped down to a multiple of the tile size
    when the processor splits images, so an image at the cap fills whole tiles. ``image_sizing`` (``need`` or
    ``fixed``, see the module doc) is recorded with them.
    """
    if image_sizing not in IMAGE_SIZINGS:
        raise ConfigError(f"image_sizing: must be one of {IMAGE_SIZINGS}, got {image_sizing!r}")
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
        "image_sizing": image_sizing,
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


def image_sizing_of(settings: dict[str, Any] | None) -> str:
    """The ``image_sizing`` of recorded settings; settings recorded before it existed were ``fixed``."""
    return (settings or {}).get("image_sizing", "fixed")


def apply_processor_settings(processor: Any, settings: dict[str, Any] | None) -> Any:
    """Make a loaded processor resize images exactly as the dataset was prepared for (manifest's
    ``processor_settings``), so the token counts in the manifest hold at training and evaluation time.

    ``need`` turns the processor's ``do_resize`` off (each image is rounded up to whole tiles from its own
    size, module doc); ``fixed`` turns it on (every image resized to the cap first)."""
    if settings:
        image_processor = getattr(processor, "image_processor", processor)
        image_processor.size = dict(settings["size"])
        image_processor.max_image_size = dict(settings["max_image_size"])
        image_processor.do_image_splitting = settings["do_image_splitting"]
        image_processor.do_resize = image_sizing_of(settings) != "need"
    return processor


def images_for_processor(processor: Any, images: Sequence[Any]) -> list[Any]:
    """``images`` ready for this processor's call: under need-based sizing (``do_resize`` off) every image
    above the cap (``size["longest_edge"]``) is downscaled to it, as prepare-data stores it (:func:`capped_size`,
    the same Lanczos filter); all others, and every image under fixed sizing, are returned as they are.

    Every processor call of vlmtune goes through this (SFT/DPO/evaluate's collator, generation, predict), so
    a raw 4,000 px photo at predict time costs what the same photo cost in training."""
    image_processor = getattr(processor, "image_processor", processor)
    if getattr(image_processor, "do_resize", True):
        return list(images)
    cap = _longest_edge(getattr(image_processor, "size", None))
    out = []
    for image in images:
        size = getattr(image, "size", None)  # PIL images; anything else goes to the processor unchanged
        if cap is not None and isinstance(size, tuple) and max(size) > cap:
            from PIL import Image

            image = image.resize(capped_size(size[0], size[1], cap), Image.Resampling.LANCZOS)
        out.append(image)
    return out


def tokens_for_size(width: int, height: int, settings: dict[str, Any], image_sizing: str | None = None) -> int | None:
    """Prompt tokens one stored image of this size becomes under ``settings`` (None without a processor).

    ``image_sizing`` overrides the settings' own (e.g. ``"fixed"``: what the processor's fixed size would cost)."""
    if not settings or settings.get("image_seq_len") is None:
        return None
    rows, cols = tile_grid(
        width, height, settings["size"]["longest_edge"], settings["max_image_size"]["longest_edge"],
        settings["do_image_splitting"], image_sizing or image_sizing_of(settings),
    )
    return image_tokens(rows, cols, settings["image_seq_len"], settings.get("extra_split_newline_tokens", 0))
