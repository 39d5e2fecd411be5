"""Following a submitted run (Vertex AI or Kubeflow) until it ends: each state change printed as it happens."""
from __future__ import annotations

import datetime as dt
import sys
import time
from typing import Callable

POLL_SECONDS = 30.0


class RunFailed(RuntimeError):
    """A run that was waited for ended in a state other than success."""


def stream_state(get_state: Callable[[], str], terminal: set[str], *, poll_s: float = POLL_SECONDS,
                 out=None, sleep: Callable[[float], None] = time.sleep) -> str:
    """Print each state change until a terminal state; return it."""
    out = out or sys.stdout
    last = None
    while True:
        state = get_state()
        if state != last:
            print(f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S} state: {state}", file=out, flush=True)
            last = state
        if state in terminal:
            return state
        sleep(poll_s)
