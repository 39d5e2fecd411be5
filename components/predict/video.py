"""Evenly spaced frames of a video, in temporal order, as PIL images: how ``vlmtune predict --video`` sees a video.

Decoding goes through PyAV (``av`` on PyPI; its wheels bundle FFmpeg, so mp4/webm/mkv/avi/mov with the usual
codecs work without a system FFmpeg). Animated GIF, APNG, animated WebP and multi-frame TIFF are read with
Pillow, so those work even without PyAV.

Frames are chosen by index: ``frame_indices(total, n)`` spreads ``n`` picks over ``total`` frames including
the first and the last. The video is decoded once, front to back, and only the chosen frames are converted
to images; seeking would be faster on long videos but lands on key frames, not on the frame asked for.

A video is a decodable stream with more than one frame. A still image (a photo, a one-frame GIF or PNG, a JPEG
whatever its frame count: MPO camera files hold a second picture, not a moment later), a file with no video
stream, or a video that decodes to a single frame raises :class:`NotAVideoError` naming the file and what to
use instead, before any model is loaded.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

INSTALL_HINT = "install PyAV (`pip install av`) to read video files; animated GIF/WebP/APNG and TIFF work without it"
# Pillow formats whose frames follow each other in time (animations, multi-page TIFF stacks). Every other format
# Pillow identifies is a still picture, even one with several frames (MPO, PSD layers, ICNS sizes). "MPEG" is
# Pillow recognising an MPEG video header it cannot decode: that one goes to PyAV.
ANIMATION_FORMATS = frozenset({"GIF", "PNG", "WEBP", "AVIF", "FLI", "TIFF"})
VIDEO_FIX = ("--video needs a video with more than one frame (mp4, webm, mkv, mov, avi, or an animated "
             "GIF/WebP/PNG); to ask about a still image, pass it with --image (Predictor.ask in Python)")

DECODE_FIX = "check that the file is complete and is a video (mp4, webm, mkv, mov, avi, animated GIF/WebP/PNG)"


class NotAVideoError(ValueError):
    """The file can be read, but it is not a video (a still image, a single frame, or no video stream)."""


def _not_a_video(path: Path, what: str) -> NotAVideoError:
    return NotAVideoError(f"{str(path)!r} is {what}, not a video: {VIDEO_FIX}")


def frame_indices(total: int, n: int) -> list[int]:
    """``min(n, total)`` distinct, increasing frame indices spread evenly over ``range(total)``.

    One frame is the middle one; two or more include the first and the last frame. Asking for more frames
    than the video has gives every frame once (repeating frames would add tokens, not information).
    """
    if n < 1:
        raise ValueError(f"the number of frames must be at least 1, not {n}")
    if total < 1:
        return []
    if n == 1:
        return [total // 2]
    if n >= total:
        return list(range(total))
    # Picks (total-1)/(n-1) >= 1 apart round to distinct integers, so no frame is taken twice.
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def sample_frames(path: str | Path, n: int) -> list[Image.Image]:
    """``n`` evenly spaced RGB frames of the video at ``path``, in temporal order (fewer if it is shorter).

    Raises FileNotFoundError (no such file), :class:`NotAVideoError` (readable, but a still image or one
    frame), ValueError (cannot be decoded) or RuntimeError (needs PyAV, which is not installed)."""
    path = Path(path)
    if n < 1:
        raise ValueError(f"the number of frames must be at least 1, not {n}")
    if not path.is_file():
        raise FileNotFoundError(f"video file {str(path)!r} does not exist")
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        image = None
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read video {str(path)!r}: {e}; {DECODE_FIX}") from e
    if image is not None and image.format != "MPEG":
        with image:
            if image.format not in ANIMATION_FORMATS:
                raise _not_a_video(path, f"a still {image.format} image")
            return _pillow_frames(path, image, n)
    if image is not None:
        image.close()
    return _pyav_frames(path, n)


def _pillow_frames(path: Path, image: Image.Image, n: int) -> list[Image.Image]:
    try:
        total = getattr(image, "n_frames", 1)
        if total < 2:
            raise _not_a_video(path, f"a still {image.format} image (one frame)")
        frames = []
        for index in frame_indices(total, n):
            image.seek(index)
            frames.append(image.convert("RGB"))
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode video {str(path)!r}: {e}; {DECODE_FIX}") from e
    return frames


def _pyav_frames(path: Path, n: int) -> list[Image.Image]:
    try:
        import av
    except ImportError as e:
        raise RuntimeError(f"{str(path)!r} is not an image Pillow can read; {INSTALL_HINT}") from e

    try:
        total = _count_frames(av, path)
        if total == 1:
            raise _not_a_video(path, "a single frame (a still image)")
        wanted = frame_indices(total, n)
        frames, decoded = _decode_frames(av, path, wanted)
        if len(frames) < len(wanted):
            # The container declared more frames than it decodes to (edited or cut files do this), so the
            # whole video was decoded: choose again over the frames that are really there.
            if decoded == 1:
                raise _not_a_video(path, "a single decodable frame (a still image)")
            frames, _ = _decode_frames(av, path, frame_indices(decoded, n)) if decoded else ([], 0)
        # Every wanted frame came back: the last one has index >= 1 (total >= 2), so two or more frames decode.
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode video {str(path)!r}: {e}; {DECODE_FIX}") from e
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames that could be decoded; {DECODE_FIX}")
    return frames


def _count_frames(av, path: Path) -> int:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise _not_a_video(path, "a file without a video stream")
        stream = container.streams.video[0]
        if stream.frames:
            return stream.frames
        # No frame count in the header (e.g. webm, some mkv): count packets, which needs no decoding.
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_frames(av, path: Path, wanted: list[int]) -> tuple[list[Image.Image], int]:
    """The frames at the ``wanted`` indices, and how many frames were decoded (it stops after the last wanted)."""
    wanted_set = set(wanted)
    last = max(wanted, default=-1)
    frames: list[Image.Image] = []
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted_set:
                frames.append(frame.to_image().convert("RGB"))
            if index >= last:
                break
    return frames, decoded
