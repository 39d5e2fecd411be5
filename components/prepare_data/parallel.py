"""Image work of ``prepare-data`` in a process pool, with a bounded number of chunks in flight.

Rows stream in; chunks of them go to worker processes (``images.process_chunk``: decode, fix, resize,
encode); results come back in submission order, so the output is the same for any number of workers.

Workers die with their parent: a killed ``prepare-data`` (SIGKILL, SIGTERM, a preempted pod) must not leave
orphans holding hundreds of MB each. On Linux each worker asks the kernel for SIGKILL when its parent goes
(``prctl(PR_SET_PDEATHSIG)``); elsewhere, or if that call fails, a thread in the worker polls its parent pid.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from components.prepare_data import images as imagelib

CHUNK_ROWS = 8  # rows per task sent to a worker: amortises the IPC without holding many images in flight
PARENT_POLL_S = 0.5  # how often the portable fallback checks that the parent is still alive
USE_PDEATHSIG = sys.platform.startswith("linux")  # False: always use the polling fallback (tests set it)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: make this process exit as soon as ``parent_pid`` (the pool's owner) is gone.

    PR_SET_PDEATHSIG fires when the *thread* that forked the worker ends; ProcessPoolExecutor forks every
    worker from the thread that submits the first task, which is the thread running the whole pool (the
    ``with ImagePool`` block), so the signal comes exactly when that thread's process dies. The parent may
    already be gone by the time the call is made (a kill right after the fork): checked right after it.
    """
    if USE_PDEATHSIG and _set_pdeathsig(signal.SIGKILL):
        if os.getppid() != parent_pid:
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _set_pdeathsig(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the symbols already loaded, libc among them (no ldconfig run)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    # An orphan is re-parented (to init or a subreaper), so a changed parent pid means the owner died.
    # os._exit, not sys.exit: the main thread may be blocked in a read that would never return.
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


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
            self.executor = cf.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context(method),
                initializer=_die_with_parent, initargs=(os.getpid(),),
            )
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
