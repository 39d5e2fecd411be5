"""prepare-data maps images of more than 8 bits per sample to 8 bits by their own range, and says so.

A 16-bit grayscale PNG whose values use a small part of 0..65535 (a 12-bit scan, a depth map) used to be
stored nearly black; now its min..max becomes 0..255 and the manifest counts it with a warning.

Run: pytest tests/components/prepare_data/test_images.py -q
"""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from components.common import artifacts
from components.common.config import build_config
from components.prepare_data import core
from components.prepare_data import images as imagelib
from components.prepare_data.config import PrepareDataConfig

RAMP = np.linspace(1000, 5000, 64).astype(np.uint16).reshape(8, 8)  # 16-bit values in a narrow band


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): grey (H, W) or RGB (H, W, 3)."""
    h, w = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png8(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "TIFF")
    return buf.getvalue()


def stored(images_bytes: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(images_bytes))
    assert im.mode == "RGB"
    return np.asarray(im)


def by_range(arr: np.ndarray) -> np.ndarray:
    """The documented mapping: min..max of the image to 0..255, rounded."""
    a = arr.astype(np.float64)
    return np.floor((a - a.min()) * (255.0 / (a.max() - a.min())) + 0.5).astype(np.uint8)


def test_high_bit_depth_images_are_mapped_by_their_range_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    floats = np.linspace(-3.0, 7.0, 64, dtype=np.float32).reshape(8, 8)
    ints = (RAMP.astype(np.int32) * 40)  # 40,000..200,000: beyond 16 bits
    colour = np.stack([RAMP, RAMP // 2, np.full_like(RAMP, 1000)], -1)
    files = {
        "gray16.png": png16(RAMP),
        "colour16.png": png16(colour),
        "float.tif": tiff(floats),
        "int32.tif": tiff(ints),
        "gray8.png": png8((RAMP // 20).astype(np.uint8)),
    }
    for name, data in files.items():
        (src / "images" / name).write_bytes(data)
    rows = [{"id": name, "image": f"images/{name}", "question": "q", "answer": name} for name in files]
    (src / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    manifest = core.run(build_config(PrepareDataConfig, {"num_workers": 0, "progress": False}), str(src), str(out))

    got = {}
    for split in ("train", "eval"):
        for rel in manifest["splits"][split]["files"]:
            for row in pq.read_table(out / rel).to_pylist():
                got[row["id"]] = row["images"][0]["bytes"]
    assert Image.open(io.BytesIO(files["gray16.png"])).mode == "I;16"  # what the source really is
    gray = stored(got["gray16.png"])
    assert (gray[..., 0] == by_range(RAMP)).all() and gray.min() == 0 and gray.max() == 255
    # Before: v / 65535 * 255 stored this image with values 4..19 (black to the eye).
    assert by_range(RAMP).max() == 255 and int(RAMP.max() / 65535 * 255 + 0.5) == 19
    assert (stored(got["float.tif"])[..., 0] == by_range(floats)).all()
    assert (stored(got["int32.tif"])[..., 0] == by_range(ints)).all()
    # 16-bit colour: Pillow decodes the high bytes; the three channels are stretched together (balance kept).
    col = stored(got["colour16.png"]).astype(int)
    high = (colour >> 8).astype(np.float64)
    expect = np.floor((high - high.min()) * (255.0 / (high.max() - high.min())) + 0.5)
    assert (col == expect).all() and col[..., 0].max() == 255 and col[..., 1].min() == 0
    assert (col[..., 2] == 28).all()  # the flat blue channel stays flat and dark: one map for all three
    assert imagelib.png_bit_depth(got["colour16.png"]) == 8
    # An 8-bit image keeps its values: no stretching where no bits were lost.
    assert (stored(got["gray8.png"])[..., 0] == (RAMP // 20)).all()

    assert manifest["images"]["rescaled_to_8bit"] == 4
    assert manifest["images"]["source_modes"] == {"F": 1, "I": 1, "I;16": 1, "L": 1, "RGB": 1}
    (warning,) = manifest["warnings"]
    assert warning.startswith("4 image(s) had more than 8 bits per sample (F x1, I x1, I;16 x1, RGB x1;")
    assert "mapped to 8 bits by its own min..max range" in warning
    assert artifacts.read_manifest(str(out))["images"]["rescaled_to_8bit"] == 4


def test_constant_and_non_finite_high_depth_images():
    settings = imagelib.ImageSettings()
    # A constant image has no range: full scale decides (65535 is white, a flat 2000 stays dark, F 0.5 is mid-grey).
    for arr, value in [(np.full((4, 4), 65535, np.uint16), 255), (np.full((4, 4), 2000, np.uint16), 8),
                       (np.full((4, 4), 0.5, np.float32), 128)]:
        data = png16(arr) if arr.dtype == np.uint16 else tiff(arr)
        image = imagelib.process_image(data, settings)
        assert image.rescaled and (stored(image.data) == value).all(), (arr.dtype, value)
    # NaN and -inf go to black, +inf to white; the finite values span the range.
    arr = np.array([[np.nan, -np.inf, np.inf, 1.0], [2.0, 3.0, 4.0, 5.0]], np.float32)
    out = stored(imagelib.process_image(tiff(arr), settings).data)[..., 0]
    assert out.tolist() == [[0, 0, 255, 0], [64, 128, 191, 255]]
