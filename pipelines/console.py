"""What ``vlmtune run`` and ``vlmtune demo`` show while the pipeline runs: one line per step, the full logs in a file.

kfp.local prints everything to ``sys.stdout``: its own log records (a handler it points at ``sys.stdout`` for
each task), each step subprocess's output line by line (``print`` inside ``logging_utils.indented_print``, so
step lines arrive indented by four spaces) and, after a task, its outputs with their URIs. Cache hits and
skipped conditions go to the root logger. :class:`StepConsole` is put in place of ``sys.stdout`` and
``sys.stderr`` (and as a root-logger handler) while the pipeline runs: every line goes to the log file, and
the lines kfp writes about tasks become the console view:

    [1/6] prepare SFT data            ok    9.1 s  600 rows: train 481, eval 119
    [2/6] SFT                 ok  101.4 s  600 steps, loss 5.31 -> 0.42
    [6/6] register                    ok    0.4 s  demo-shapes v1 (champion)

On a terminal the line of the running step is redrawn every half second with its elapsed time and progress
(rows, epoch and loss, models scored); elsewhere (CI logs, pipes) a progress line is printed every
:data:`PROGRESS_EVERY_S` seconds. When a step fails, its last lines and the log path are shown, and the
``vlmtune-step-failed`` line the component prints (``components.common.cli.reported_failure``) gives the exit
status. ``verbose=True`` streams everything to the terminal as well (kfp's own view).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from components.common.cli import EXIT_BUG, parse_failure_marker

PROGRESS_EVERY_S = 60.0
TAIL_LINES = 12  # shown when a step fails
_KEPT_LINES = 200  # kept per step, to find where its traceback starts

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_KFP_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ - (?:INFO|WARNING|ERROR|DEBUG|CRITICAL) - (.*)$")
_START = re.compile(r"^Executing task '([^']+)'$")
_END = re.compile(r"^Task '([^']+)' finished with status (\w+)$")
_OUTPUTS = re.compile(r"^Task '([^']+)' (?:outputs:|has no outputs)$")
_CACHE_HIT = re.compile(r"Task (\S+) cache hit \(key=")
_SKIPPED = re.compile(r"Skipping conditional task (\S+) \(condition evaluated to False\)")
_UPSTREAM_FAILED = re.compile(r"Skipping task (\S+): upstream task\(s\)")
_OUTPUT_ARTIFACT = re.compile(r"^ {4}(\w+): \w+\( name='")
_OUTPUT_URI = re.compile(r"^\s+uri='(.*)',$")
_OUTPUT_PARAM = re.compile(r"^ {4}(\w+): (.*)$")
_RULE = re.compile(r"^-{20,}$")
_TQDM = re.compile(r"^(?P<desc>[\w -]+?): +(?P<pct>\d+)%\|.*?\| *(?P<n>\d+)/(?P<total>\d+) ")
_LOSS = re.compile(r"^\{'loss': '?(?P<loss>[-\d.e+]+)'?.*'epoch': '?(?P<epoch>[\d.e+-]+)'?")
_SCORED = re.compile(r"\]: (?P<model>\w+): (?P<metric>\w+)=(?P<score>[\d.]+) \(\d+ rows")
#: What a skipped condition means, by the condition's name in the pipeline (pipelines/pipeline.py).
CONDITIONS = {"passed-gate": "the evaluation gate did not pass", "new-data": "the data is unchanged since the champion"}


class StepFailed(Exception):
    """A pipeline step failed: which, the exit status it reported (1 when it reported none), its message, its
    last lines, and the steps that did not run because of it."""

    def __init__(self, step: str, status: int, message: str, tail: list[str], log_path: Path | None,
                 not_run: list[str] | None = None):
        super().__init__(f"{step} failed: {message}")
        self.step, self.status, self.message, self.tail, self.log_path = step, status, message, tail, log_path
        self.not_run = not_run or []


def failure_tail(lines: list[str]) -> list[str]:
    """The last lines of a failed step worth showing: its own output, without kfp's executor-input JSON (the
    step's inputs, printed when it starts) and the failure marker (shown as the message)."""
    shown, in_json = [], False
    for line in lines:
        if line.rstrip().endswith("Got executor_input:"):
            in_json = True
        elif in_json and line.rstrip() == "}":
            in_json = False
        elif not in_json and line.strip() and parse_failure_marker(line) is None:
            shown.append(line)
    return shown[-TAIL_LINES:]


@dataclass
class _Task:
    name: str
    label: str
    index: int
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    status: str = "running"
    outputs: dict[str, str] = field(default_factory=dict)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_KEPT_LINES))
    progress: str = ""
    fraction: float | None = None
    failure: tuple[int, str] | None = None
    last_report: float = field(default_factory=time.monotonic)
    losses: list[float] = field(default_factory=list)
    scores: dict[str, str] = field(default_factory=dict)


def task_labels(pipeline) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str]]:
    """(task name -> display name, condition task -> the tasks inside it, condition task -> its name) of a
    built pipeline, from its spec (what kfp.local's log lines name)."""
    spec = pipeline.pipeline_spec
    labels, inside, conditions = {}, {}, {}
    for name, task in spec.root.dag.tasks.items():
        component = spec.components[task.component_ref.name]
        if component.WhichOneof("implementation") == "dag":
            inside[name] = [t.task_info.name or n for n, t in component.dag.tasks.items()]
            conditions[name] = task.task_info.name
            for inner, t in component.dag.tasks.items():
                labels[inner] = t.task_info.name or inner
        else:
            labels[name] = task.task_info.name or name
    return labels, inside, conditions


class StepConsole:
    """A stand-in for ``sys.stdout``/``sys.stderr`` while a pipeline runs (see the module docstring).

    ``figures(task_name, outputs)`` turns a finished task's outputs (output name -> URI or value) into its key
    figures; ``hints`` (task name -> {"epochs", "max_steps", "logging_steps", "models"}) size progress bars."""

    def __init__(self, log_path: str | Path, *, verbose: bool = False, out: TextIO | None = None,
                 interactive: bool | None = None,
                 figures: Callable[[str, dict[str, str]], str] | None = None,
                 hints: dict[str, dict[str, Any]] | None = None):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self.out = out or sys.stdout
        self.interactive = (self.out.isatty() if hasattr(self.out, "isatty") else False) if interactive is None else interactive
        self.figures = figures or (lambda name, outputs: "")
        self.hints = hints or {}
        self.labels: dict[str, str] = {}
        self.conditions: dict[str, list[str]] = {}
        self.condition_names: dict[str, str] = {}
        self.total = 0
        self.tasks: dict[str, _Task] = {}
        self.current: _Task | None = None
        self.finished: _Task | None = None  # ended, outputs still being read
        self.in_outputs: _Task | None = None
        self.pending_output: str | None = None
        self.failed: _Task | None = None
        self._buffer = ""
        self._lock = threading.RLock()
        self._log: TextIO | None = None
        self._live = False  # a redrawable line is on the terminal
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # ------------------------------------------------------------------ set-up
    def describe(self, pipeline) -> None:
        """Learn the task names of the pipeline about to run (display names, conditions, how many steps)."""
        self.labels, self.conditions, self.condition_names = task_labels(pipeline)
        self.total = len(self.labels)

    @contextlib.contextmanager
    def capture(self) -> Iterator["StepConsole"]:
        """Route this process's stdout, stderr and root logging into the console for the block."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="replace")
        root = logging.getLogger()
        handler = logging.StreamHandler(self)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s", "%H:%M:%S"))
        old_level, old_out, old_err = root.level, sys.stdout, sys.stderr
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        sys.stdout = sys.stderr = self  # type: ignore[assignment]
        if self.interactive and not self.verbose:
            self._ticker = threading.Thread(target=self._tick, name="vlmtune-console", daemon=True)
            self._ticker.start()
        try:
            yield self
        finally:
            self._stop.set()
            if self._ticker:
                self._ticker.join(timeout=2)
            sys.stdout, sys.stderr = old_out, old_err
            root.removeHandler(handler)
            root.setLevel(old_level)
            with self._lock:
                if self._buffer:
                    self._line(self._buffer)
                    self._buffer = ""
                self._flush_finished()
                self._clear_live()
                self._log.close()
                self._log = None

    # ------------------------------------------------------------------ file-like
    def write(self, text: str) -> int:
        with self._lock:
            if self.verbose:
                self.out.write(text)
            self._buffer += text
            *lines, self._buffer = re.split(r"\r\n|\r|\n", self._buffer)
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._log:
                self._log.flush()
            self.out.flush()

    def isatty(self) -> bool:
        return False  # tqdm and friends in this process: plain lines, not redraws

    # ------------------------------------------------------------------ what the user sees
    def say(self, text: str) -> None:
        """A line of our own on the terminal (and in the log)."""
        with self._lock:
            self._clear_live()
            self.out.write(text + "\n")
            self.out.flush()
            if self._log:
                self._log.write(f"[vlmtune] {text}\n")

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[dict]:
        """A step of our own (e.g. building the demo's inputs) shown like a pipeline step. The block may set
        ``info["figures"]``; an error inside it marks the step failed and propagates."""
        task = _Task(name=label, label=label, index=0)
        info: dict[str, Any] = {"figures": ""}
        with self._lock:
            self.current = task
            self._show_start(task)
        try:
            yield info
        except BaseException:
            task.status = "failed"
            raise
        else:
            task.status = "ok"
        finally:
            with self._lock:
                task.seconds = time.monotonic() - task.started
                self.current = None
                self._show_end(task, info["figures"])

    def _label(self, task: _Task) -> str:
        counter = f"[{task.index}/{self.total}] " if task.index and self.total else ""
        return f"  {counter}{task.label}"

    def _show_start(self, task: _Task) -> None:
        if self.verbose:
            return
        if self.interactive:
            self._draw_live(task)
        else:
            self.out.write(f"{self._label(task):<34}started\n")
            self.out.flush()

    def _show_end(self, task: _Task, figures: str = "") -> None:
        if self.verbose:
            return
        self._clear_live()
        seconds = f"{task.seconds:7.1f} s" if task.seconds is not None else " " * 9
        self.out.write(f"{self._label(task):<34}{task.status:<7}{seconds}  {figures}".rstrip() + "\n")
        self.out.flush()

    def _progress_text(self, task: _Task) -> str:
        elapsed = time.monotonic() - task.started
        bar = ""
        if task.fraction is not None:
            filled = int(round(20 * min(max(task.fraction, 0.0), 1.0)))
            bar = f" [{'#' * filled}{'.' * (20 - filled)}] {100 * min(task.fraction, 1.0):3.0f}%"
        return f"{self._label(task):<34}{'running':<7}{elapsed:7.0f} s{bar}  {task.progress}".rstrip()

    def _draw_live(self, task: _Task) -> None:
        self.out.write("\r\x1b[K" + self._progress_text(task))
        self.out.flush()
        self._live = True

    def _clear_live(self) -> None:
        if self._live:
            self.out.write("\r\x1b[K")
            self._live = False

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self.current is not None and not self.verbose:
                    self._draw_live(self.current)

    def _maybe_report_progress(self, task: _Task) -> None:
        if self.interactive or self.verbose:
            return
        now = time.monotonic()
        if now - task.last_report >= PROGRESS_EVERY_S:
            task.last_report = now
            self.out.write(self._progress_text(task) + "\n")
            self.out.flush()

    # ------------------------------------------------------------------ reading kfp's lines
    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        if self._log:
            self._log.write(line + "\n")
        record = _KFP_RECORD.match(line)
        text = record.group(1) if record else line
        if self.in_outputs is not None and (record or _RULE.match(line)):
            self._flush_finished()
        if self.in_outputs is not None:
            self._output_line(line)
            return
        if record:
            self._kfp_record(text)
            return
        hit = _CACHE_HIT.search(line)
        if hit:
            self._cached(hit.group(1))
            return
        skipped = _SKIPPED.search(line)
        if skipped:
            self._skipped(skipped.group(1))
            return
        if _RULE.match(line):
            self._flush_finished()
            return
        if self.current is not None and line.startswith("    "):
            self._step_line(self.current, line[4:])

    def _kfp_record(self, text: str) -> None:
        start, end, outputs = _START.match(text), _END.match(text), _OUTPUTS.match(text)
        if start:
            self._flush_finished()
            name = start.group(1)
            task = _Task(name=name, label=self.labels.get(name, name), index=len(self.tasks) + 1)
            self.tasks[name] = task
            self.current = task
            self._show_start(task)
        elif end:
            task = self.tasks.get(end.group(1))
            if task is None:
                return
            task.seconds = time.monotonic() - task.started
            task.status = "ok" if end.group(2) == "SUCCESS" else "failed"
            self.current = None
            if task.status == "failed":
                self.failed = task
                self._show_end(task, f"exit status {task.failure[0]}, see below" if task.failure else "see below")
            else:
                self.finished = task
        elif outputs:
            task = self.tasks.get(outputs.group(1))
            if task is not None and task is self.finished and text.endswith("outputs:"):
                self.in_outputs = task
            else:
                self._flush_finished()
        else:
            hit, skipped, upstream = _CACHE_HIT.search(text), _SKIPPED.search(text), _UPSTREAM_FAILED.search(text)
            if hit:
                self._cached(hit.group(1))
            elif skipped:
                self._skipped(skipped.group(1))
            elif upstream:
                self._not_run(upstream.group(1))

    def _output_line(self, line: str) -> None:
        task = self.in_outputs
        artifact, uri, param = _OUTPUT_ARTIFACT.match(line), _OUTPUT_URI.match(line), _OUTPUT_PARAM.match(line)
        if artifact:
            self.pending_output = artifact.group(1)
        elif uri and self.pending_output:
            task.outputs[self.pending_output] = uri.group(1)
            self.pending_output = None
        elif param and not line.startswith("     "):
            task.outputs[param.group(1)] = param.group(2)

    def _flush_finished(self) -> None:
        task, self.finished, self.in_outputs, self.pending_output = self.finished, None, None, None
        if task is None:
            return
        try:
            figures = self.figures(task.name, task.outputs)
        except Exception as e:  # figures are a courtesy: never let them fail a run
            figures = f"(figures unavailable: {type(e).__name__})"
        self._show_end(task, figures)

    def _cached(self, name: str) -> None:
        self._flush_finished()
        task = _Task(name=name, label=self.labels.get(name, name), index=len(self.tasks) + 1, seconds=None,
                     status="cached")
        self.tasks[name] = task
        self._show_end(task, "kfp's cache has this step's outputs")

    def _skipped(self, condition: str) -> None:
        self._flush_finished()
        why = CONDITIONS.get(self.condition_names.get(condition, ""), f"condition {condition!r} is false")
        for label in self.conditions.get(condition, [condition]):
            task = _Task(name=label, label=label, index=len(self.tasks) + 1, status="skipped")
            self.tasks[label] = task
            self._show_end(task, why)

    def _not_run(self, name: str) -> None:
        self._flush_finished()
        task = _Task(name=name, label=self.labels.get(name, name), index=len(self.tasks) + 1, status="not run")
        self.tasks[name] = task
        self._show_end(task, "an earlier step failed")

    def _step_line(self, task: _Task, line: str) -> None:
        if line.strip():
            task.tail.append(line)
        marker = parse_failure_marker(line)
        if marker:
            task.failure = marker
            return
        hints = self.hints.get(task.name, {})
        bar = _TQDM.match(line.strip())
        loss = _LOSS.match(line.strip())
        scored = _SCORED.search(line)
        if bar and bar.group("desc").strip() in ("prepare-data", "generate"):
            n, total = int(bar.group("n")), int(bar.group("total"))
            task.fraction = n / total if total else None
            task.progress = f"{n}/{total} {'rows' if bar.group('desc') == 'prepare-data' else 'answers'}"
        elif loss:
            task.losses.append(float(loss.group("loss")))
            epoch = float(loss.group("epoch"))
            max_steps, epochs = hints.get("max_steps") or 0, hints.get("epochs") or 0
            if max_steps > 0:
                steps = len(task.losses) * (hints.get("logging_steps") or 1)
                task.fraction = steps / max_steps
                task.progress = f"step ~{min(steps, max_steps)}/{max_steps}, loss {task.losses[-1]:.3g}"
            else:
                task.fraction = epoch / epochs if epochs else None
                task.progress = f"epoch {epoch:g}" + (f"/{epochs:g}" if epochs else "") + f", loss {task.losses[-1]:.3g}"
        elif scored:
            task.scores[scored.group("model")] = scored.group("score")
            models = hints.get("models")
            task.fraction = len(task.scores) / models if models else None
            task.progress = ", ".join(f"{m} {s[:5]}" for m, s in task.scores.items())
        else:
            return
        self._maybe_report_progress(task)

    # ------------------------------------------------------------------ failure
    def failure(self, error: BaseException | None = None) -> StepFailed:
        """What failed, as a :class:`StepFailed`: the failed step (its reported status and message, its last
        lines) or, when no step failed, the error raised in this process."""
        task = self.failed
        if task is not None:
            status, message = task.failure or (EXIT_BUG, f"the step exited with an error ({task.tail[-1] if task.tail else 'no output'})")
            not_run = [label for name, label in self.labels.items() if name not in self.tasks]
            return StepFailed(task.label, status, message, failure_tail(list(task.tail)), self.log_path, not_run)
        return StepFailed("vlmtune", EXIT_BUG, f"{type(error).__name__}: {error}" if error else "unknown error", [],
                          self.log_path)
