"""Image work of ``prepare-data``: decode, fix, resize the way the target processor will, encode once.

Runs in worker processes, so it imports only Pillow/numpy and takes plain values. Every failure becomes an
:class:`ImageRejected` with a stable reason name that ends up, counted, in the dataset manifest.

Token-aware sizing: images larger than the cap (the processor's ``size["longest_edge"]`` or the user's
``longest_edge``) are downscaled to exactly the size the processor would compute (same rounding); smaller ones
are stored as they are, never upscaled. Under ``image_sizing: need`` (the default) the processor then encodes
each image at the smallest grid of whole tiles that holds it; under ``fixed`` it upscales every image to the cap
first (``components.common.processor_settings``, module doc). Either way the stored size alone decides the
token count, which ``processor_settings.tokens_for_size`` predicts exactly.

More than 8 bits per sample (16-bit grayscale PNG/TIFF: modes ``I;16*``; 32-bit ``I``; floating point ``F``;
16-bit colour PNG): mapped to 8 bits by the image's own range, min..max of its pixel values, not by the full
0..65535 scale, so a 12-bit scan or a depth map is not stored black. Each such image is flagged
(``ProcessedImage.rescaled``) and counted in the manifest with a warning. A constant image has no range: it
keeps the full-scale mapping. Pillow decodes a 16-bit *colour* PNG to its high bytes only, so there the range
is stretched from 8-bit values (a 12-bit colour image keeps 16 levels per channel).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from components.common.processor_settings import capped_size

WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_ORIENTATION_TAG = 0x0112
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # one channel, more than 8 bits per sample
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageRejected(Exception):
    """An image that cannot go into the dataset; ``reason`` is a stable name counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSettings:
    longest_edge: int | None = None  # target longest edge (None: no resizing)
    max_pixels: int = 64_000_000
    image_format: str = "auto"  # auto | png | jpeg
    jpeg_quality: int = 95


@dataclass
class ProcessedImage:
    data: bytes
    format: str
    width: int
    height: int
    source_width: int
    source_height: int
    source_mode: str
    source_hash: str
    reencoded: bool
    rescaled: bool = False  # more than 8 bits per sample, mapped to 8 bits by the image's own min..max


def stored_size(width: int, height: int, longest_edge: int | None) -> tuple[int, int]:
    """Size we store: the processor's own target size when the image is larger than the cap, else unchanged
    (the same for both image sizings; never an upscale)."""
    return capped_size(width, height, longest_edge)


def png_bit_depth(data: bytes) -> int | None:
    """Bits per sample of a PNG, read from its IHDR header (Pillow hides it for 16-bit colour)."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def _to_8bit_by_range(im: Image.Image) -> Image.Image:
    """A one-channel image of more than 8 bits as 8-bit ``L``: its min..max mapped to 0..255 (over the finite
    values; NaN and -inf become 0, +inf 255). A constant image keeps the full-scale mapping: 65535 (or 255 for
    values that fit 8 bits) is white, F values in 0..1 scale from 1.0."""
    import numpy as np

    arr = np.asarray(im).astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(np.isnan(arr), -np.inf, arr)
    lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
    if hi > lo:
        scaled = (np.clip(arr, lo, hi) - lo) * (255.0 / (hi - lo))
    else:
        if im.mode.startswith("I;16") or hi > 255:
            top = 65535.0
        elif im.mode == "F" and 0.0 <= lo and hi <= 1.0:
            top = 1.0
        else:
            top = 255.0
        scaled = np.where(finite, arr, 0.0) / top * 255.0
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), mode="L")


def _stretch_colour_by_range(im: Image.Image) -> Image.Image:
    """A 16-bit colour PNG (decoded by Pillow to its high bytes): colour channels stretched jointly, min..max
    to 0..255, so their balance stays; alpha unchanged."""
    import numpy as np

    im = im.convert("RGBA") if im.mode in _ALPHA_MODES else im.convert("RGB")
    arr = np.asarray(im).copy()
    colour = arr[..., :3].astype(np.float64)
    lo, hi = float(colour.min()), float(colour.max())
    if hi > lo:
        arr[..., :3] = np.clip((colour - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode=im.mode)


def _to_rgb(im: Image.Image, deep_colour: bool = False) -> Image.Image:
    """``im`` as 8-bit RGB: transparency onto white, more than 8 bits by the image's own range (module doc)."""
    if deep_colour and im.mode not in HIGH_DEPTH_MODES:
        im = _stretch_colour_by_range(im)
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode in HIGH_DEPTH_MODES:
        return _to_8bit_by_range(im).convert("RGB")
    return im.convert("RGB")


def process_image(data: bytes, settings: ImageSettings) -> ProcessedImage:
    """Decode ``data``, apply EXIF orientation, make RGB, downscale to the processor's size, encode once.

    Bytes go through untouched when nothing needs changing (RGB, upright, small enough, target format).
    """
    # Pillow's own bomb guard is a process-wide global: set it for this image only, so an in-process run
    # (num_workers=0) does not leave a strict limit behind for other code in the same interpreter.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = settings.max_pixels
    try:
        return _process_image(data, settings)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _process_image(data: bytes, settings: ImageSettings) -> ProcessedImage:
    if not data:
        raise ImageRejected("empty_file", "zero bytes")
    source_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check below decides
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageRejected("not_an_image", "not a format Pillow can identify") from e
    except Image.DecompressionBombError as e:
        raise ImageRejected("too_many_pixels", f"{e} (max_image_pixels={settings.max_pixels:,})") from e
    except Exception as e:  # noqa: BLE001 - any header failure means a corrupt file
        raise ImageRejected("corrupt_image", f"{type(e).__name__}: {e}") from e
    with im:
        src_w, src_h = im.size
        if src_w < 1 or src_h < 1:
            raise ImageRejected("corrupt_image", f"size {src_w}x{src_h}")
        if src_w * src_h > settings.max_pixels:
            raise ImageRejected("too_many_pixels", f"{src_w}x{src_h} = {src_w * src_h:,} pixels, above "
                                f"max_image_pixels={settings.max_pixels:,}")
        src_format = im.format or ""
        src_mode = im.mode
        deep_colour = src_format == "PNG" and png_bit_depth(data) == 16 and src_mode not in HIGH_DEPTH_MODES
        rescaled = src_mode in HIGH_DEPTH_MODES or deep_colour
        try:
            orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
        except Exception:  # noqa: BLE001 - unreadable EXIF: treat as upright
            orientation = 1
        upright_w, upright_h = (src_h, src_w) if orientation in (5, 6, 7, 8) else (src_w, src_h)
        out_w, out_h = stored_size(upright_w, upright_h, settings.longest_edge)
        target_format = settings.image_format
        if target_format == "auto":
            target_format = "jpeg" if src_format == "JPEG" else "png"
        needs_change = (
            src_mode != "RGB"
            or deep_colour
            or orientation != 1
            or (out_w, out_h) != (upright_w, upright_h)
            or src_format != target_format.upper()
            or getattr(im, "n_frames", 1) != 1
        )
        if not needs_change:
            try:
                im.load()  # still prove the bytes decode
            except Exception as e:  # noqa: BLE001
                raise _decode_reject(e) from e
            return ProcessedImage(data, target_format, src_w, src_h, src_w, src_h, src_mode, source_hash, False)
        if src_format == "JPEG" and (out_w, out_h) != (upright_w, upright_h):
            # Let libjpeg decode at a reduced scale (DCT scaling) while staying >= 2x the target, like thumbnail().
            req = (out_w * 2, out_h * 2) if orientation not in (5, 6, 7, 8) else (out_h * 2, out_w * 2)
            im.draft("RGB" if src_mode == "RGB" else None, req)
        try:
            im.load()
            fixed = ImageOps.exif_transpose(im) if orientation != 1 else im
            fixed = _to_rgb(fixed, deep_colour)
            if fixed.size != (out_w, out_h):
                fixed = fixed.resize((out_w, out_h), Image.Resampling.LANCZOS)
        except Image.DecompressionBombError as e:
            raise ImageRejected("too_many_pixels", f"{e} (max_image_pixels={settings.max_pixels:,})") from e
        except Exception as e:  # noqa: BLE001
            raise _decode_reject(e) from e
    buf = io.BytesIO()
    if target_format == "jpeg":
        fixed.save(buf, "JPEG", quality=settings.jpeg_quality)
    else:
        fixed.save(buf, "PNG", compress_level=3)
    return ProcessedImage(buf.getvalue(), target_format, out_w, out_h, src_w, src_h, src_mode, source_hash, True, rescaled)


def _decode_reject(e: Exception) -> ImageRejected:
    text = str(e)
    if "truncated" in text.lower():
        return ImageRejected("truncated_image", text)
    return ImageRejected("corrupt_image", f"{type(e).__name__}: {text}")


def process_refs(refs: list, settings: ImageSettings) -> list:
    """Worker entry point: each ref is ``("bytes", b)`` or ``("path", local_path)``.

    Returns, per ref, a :class:`ProcessedImage` or ``(reason, detail)``.
    """
    out = []
    for kind, value in refs:
        try:
            if kind == "path":
                try:
                    with open(value, "rb") as f:
                        data = f.read()
                except FileNotFoundError as e:
                    raise ImageRejected("missing_image", "no such file") from e
                except IsADirectoryError as e:
                    raise ImageRejected("missing_image", "a folder, not an image file") from e
            else:
                data = value
            out.append(process_image(data, settings))
        except ImageRejected as e:
            out.append((e.reason, e.detail))
    return out


def process_chunk(chunk: list[tuple[int, list]], settings: ImageSettings) -> list[tuple[int, list]]:
    """Process the images of several rows: ``[(row_index, refs), ...]`` -> ``[(row_index, results), ...]``."""
    return [(index, process_refs(refs, settings)) for index, refs in chunk]
