"""Image work of ``prepare-data`` in a process pool, with a bounded number of chunks in flight.

Rows stream in; chunks of them go to worker processes (``images.process_chunk``: decode, fix, resize,
encode); results come back in submission order, so the output is the same for any number of workers.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import multiprocessing
import os
from pathlib import Path
from typing import Iterable, Iterator

from components.prepare_data import images as imagelib

CHUNK_ROWS = 8  # rows per task sent to a worker: amortises the IPC without holding many images in flight


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


def chunks(rows: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class ImagePool:
    """``with ImagePool(workers, settings) as pool: for chunk, results in pool.process(rows): ...``

    ``workers=0`` processes in this process (no pool). The pool is shut down when the block ends, also when
    the consumer raises (e.g. the run stops early on too many invalid rows)."""

    def __init__(self, workers: int, settings: imagelib.ImageSettings):
        self.workers = workers
        self.settings = settings
        self.max_in_flight = max(2, 4 * workers)
        self.executor: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> "ImagePool":
        if self.workers > 0:
            # fork: no interpreter start-up per worker and no re-import of __main__ (spawn breaks for `python -`
            # and stdin-fed runners). Workers only run Pillow code, never the parent's threads or torch.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.executor = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context(method))
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def process(self, rows: Iterable) -> Iterator[tuple[list, list]]:
        """(chunk of rows, their per-image results) in input order. Each row needs ``index`` and ``refs``;
        a row's ``refs`` (possibly image bytes) are dropped once submitted."""
        in_flight: collections.deque = collections.deque()
        for chunk in chunks(rows, CHUNK_ROWS):
            tasks = [(row.index, row.refs) for row in chunk]
            if self.executor is not None:
                in_flight.append((chunk, self.executor.submit(imagelib.process_chunk, tasks, self.settings)))
                while len(in_flight) > self.max_in_flight:
                    yield self._result(in_flight.popleft())
            else:
                in_flight.append((chunk, imagelib.process_chunk(tasks, self.settings)))
                yield self._result(in_flight.popleft())
            for row in chunk:
                row.refs = []
        while in_flight:
            yield self._result(in_flight.popleft())

    def _result(self, entry) -> tuple[list, list]:
        chunk, future = entry
        return chunk, (future.result() if self.executor is not None else future)
