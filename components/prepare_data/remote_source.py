"""A source as prepare-data sees it: local sources as they are, gs:// sources listed and fetched piecemeal.

:func:`open_view` is how the step opens its source (``core.run``, ``core.plan`` and each ``core.part``):

- a local path or ``file://`` URI: ``storage.local_input`` + ``sources.open_source``, unchanged;
- a ``gs://`` folder: the folder is **listed** (``storage.list_files``), and only its *row files* are downloaded
  into a temp folder that mirrors the bucket's layout: ``rows.jsonl`` when there is one (the other top-level
  row-like files are only named in a note, so empty stand-ins of the same name are made for them), else the
  top-level ``*.jsonl`` / ``*.csv`` / ``*.parquet`` / ``*.json`` files, and, when none of those is rows, the
  ``*.parquet`` files at any depth: exactly the files ``sources.open_source`` reads. ``open_source`` then
  decides the layout on that folder as it would on a full copy. No image is downloaded for this:
  ``core.plan`` counts rows and lists items from it alone.
- a ``gs://`` row file (``gs://b/ds/rows.jsonl``): that file is downloaded; its folder is listed as the image
  root.

Images of a gs:// source are fetched by the rows that name them: the source's ``fetch_images`` hook
(``fanout.process_item`` passes the raw rows of its range through it, before they are counted and
normalised) takes the rows in batches of ``FETCH_BATCH_ROWS``, downloads the listed images their image column
names (resolved as ``rows.normalize_row`` resolves them) that are not yet here (one ``storage.download_files``
call per batch: the transfer manager, in parallel, every file checked; the next batch downloads in a
background thread while this one is read), and hands the rows on. So a part fetches only its own rows'
images, and ``core.run`` only the images some row references: stray files in the bucket are never
downloaded. An image a row names that the listing does not hold is not fetched, so it is missing locally and
rejected exactly as for a local source (``missing_image``, "no such file"); a name the listing holds as a
folder becomes a local folder ("a folder, not an image file"). A row later rejected for another reason (a
blank answer) has had its images fetched; a part that gives up early may have fetched up to two batches more
than it read. Counts, rejects and the dataset are those of a local source.

Costs: every part lists the whole source folder (one request per 1,000 objects) and downloads the row files
whole (one stream per file: ``download_files`` does not slice big objects, as ``download_dir`` does).

Sources whose images are inside the row files (Parquet with image bytes, a ``datasets`` ``save_to_disk``
folder) need those files whole: each part reads the row files (for ``save_to_disk``, the whole folder is
downloaded, as before), and there is nothing further to fetch.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from components.common import storage
from components.prepare_data.parallel import chunks
from components.prepare_data.rows import image_paths
from components.prepare_data.sources import ROW_SUFFIXES, RawRow, Source, json_format, open_source

FETCH_BATCH_ROWS = 256  # rows whose images are downloaded in one parallel transfer
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # as sources.open_source checks them
PREFERRED_ROWS = "rows.jsonl"


@contextlib.contextmanager
def open_view(uri: str, source_split: str | None = None, image_column: str | None = None) -> Iterator[Source]:
    """The opened :class:`Source` of ``uri`` for the duration of the block (temp downloads removed after)."""
    if not storage.is_remote(uri):
        with storage.local_input(uri) as path:
            yield open_source(Path(path), source_split, image_column)
        return
    with tempfile.TemporaryDirectory(prefix="vlmtune-src-") as tmp:
        yield RemoteSource.open(uri, Path(tmp) / "data", source_split, image_column)


class RemoteSource:
    """A listed gs:// folder mirrored lazily into ``local_root``: row files on open, images on demand."""

    def __init__(self, base: str, local_root: Path, listed: list[str], image_column: str):
        self.base = base.rstrip("/")
        self.image_column = image_column
        self.local_root = local_root
        self.objects = {u[len(self.base) + 1:] for u in listed if u.startswith(self.base + "/")}
        self.folders = {posixpath.dirname(r) for r in self.objects}
        for f in list(self.folders):
            while f:
                f = posixpath.dirname(f)
                self.folders.add(f)
        self.fetched: set[str] = set()
        self.downloaded: list[str] = []  # every object fetched, relative to the source folder (for tests/logs)

    # -------------------------------------------------------------------------------------------- open

    @classmethod
    def open(cls, uri: str, local_root: Path, source_split: str | None, image_column: str | None) -> Source:
        base = uri.rstrip("/")
        listed = storage.list_files(base)
        local_root.mkdir(parents=True)
        if not listed:  # not a folder: a single row file (its folder holds the images), or nothing
            if "/" not in base[len(storage.GCS_SCHEME):] or not storage.exists(base):
                raise FileNotFoundError(f"source {uri!r} does not exist (no object and no objects under it); "
                                        f"pass a gs:// folder of rows + images, or a row file")
            parent, name = base.rsplit("/", 1)
            view = cls(parent, local_root, storage.list_files(parent), image_column)
            view.fetch([name])
            src = open_source(local_root / name, source_split, image_column)
        else:
            view = cls(base, local_root, listed, image_column)
            top = sorted(r for r in view.objects if "/" not in r)
            if any(m in top for m in HF_DISK_MARKERS):
                # a datasets save_to_disk folder: images are inside its Arrow files, which it needs whole.
                storage.download_dir(base, local_root)
                view.downloaded = sorted(view.objects)
                return open_source(local_root, source_split, image_column)
            view.fetch_row_files(top, image_column)
            src = open_source(local_root, source_split, image_column)
        src.fetch_images = view.fetch_images
        src.remote = view  # type: ignore[attr-defined]
        return src

    def fetch_row_files(self, top: list[str], image_column: str | None) -> None:
        """Download the files ``sources.open_source`` reads rows from (see the module docstring)."""
        candidates = [r for r in top if Path(r).suffix.lower() in ROW_SUFFIXES]
        if PREFERRED_ROWS in candidates:
            self.fetch([PREFERRED_ROWS])
            for name in candidates:  # named in the "ignored ..." note only: never read, so never downloaded
                if name != PREFERRED_ROWS:
                    (self.local_root / name).touch()
            return
        self.fetch(candidates)
        rows = [r for r in candidates if Path(r).suffix.lower() != ".json"
                or json_format(self.local_root / r, image_column)[0] is not None]
        if not rows:
            self.fetch(sorted(r for r in self.objects if "/" in r and r.endswith(".parquet")))

    # -------------------------------------------------------------------------------------------- images

    def fetch_images(self, rows: Iterable[RawRow]) -> Iterator[RawRow]:
        """Pass the raw rows through, the listed images they name downloaded first, a batch at a time: the next
        batch downloads (one background thread) while the reader works through this one."""
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlmtune-fetch") as fetcher:
            ready: tuple[list, concurrent.futures.Future] | None = None
            for batch in chunks(rows, FETCH_BATCH_ROWS):
                coming = (batch, fetcher.submit(self.fetch, self._named(batch)))
                if ready is not None:
                    ready[1].result()  # a download that failed after its retries fails the part here
                    yield from ready[0]
                ready = coming
            if ready is not None:
                ready[1].result()
                yield from ready[0]

    def _named(self, batch: list[RawRow]) -> list[str]:
        """The image paths (relative to the source folder) the rows of ``batch`` name, as rows.py resolves them."""
        root = self.local_root
        root_resolved = root.resolve()
        # image_paths keeps only paths inside the source folder (rows.py rejects any other)
        return [os.path.relpath(p, root_resolved).replace(os.sep, "/") for raw in batch if raw.row is not None
                for p in image_paths(raw.row, self.image_column, root, root_resolved)]

    def fetch(self, rels: Iterable[str]) -> None:
        """Download the listed objects among ``rels`` (paths relative to the source folder) not yet here; a name
        the listing holds as a folder becomes a local folder; any other name is left absent (a missing image)."""
        want = []
        for rel in dict.fromkeys(rels):
            if rel in self.fetched:
                continue
            self.fetched.add(rel)
            if rel in self.objects:
                want.append(rel)
            elif rel in self.folders and rel not in ("", "."):
                (self.local_root / rel).mkdir(parents=True, exist_ok=True)
        if not want:
            return
        # download_files names files relative to their common parent folder: put that folder in place.
        common = posixpath.commonpath([posixpath.dirname(r) for r in want])
        storage.download_files([f"{self.base}/{r}" for r in want], self.local_root / common)
        self.downloaded.extend(want)
