"""Using a model: one image, several images in one prompt, a batch file, a video.

- ``api.py``: :class:`Predictor` (``from_ref``, ``ask``, ``ask_batch``, ``ask_video``) and batch-file reading.
- ``video.py``: evenly spaced frames of a video in temporal order (PyAV; Pillow for animated GIF/WebP/APNG/TIFF).
- The CLI is ``vlmtune predict`` (``pipelines/predict_cli.py``).
"""
from components.predict.api import BatchFileError, BatchRow, GenerationOptions, Predictor, read_batch_file, resolve_model

__all__ = ["BatchFileError", "BatchRow", "GenerationOptions", "Predictor", "read_batch_file", "resolve_model"]
