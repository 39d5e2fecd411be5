"""CLI plumbing shared by every step's entry point (prepare-data, sft, dpo, evaluate, register): every config
field becomes a ``--flag`` (help text, and the allowed values where the field's metadata lists ``choices``,
from the dataclass), plus ``--config FILE`` (YAML, local or gs://) and ``--set key=value``. Flags win over
--set, which wins over the file.

The exit statuses, the same for every ``vlmtune`` command:

    0  done
    1  a bug in vlmtune (an unexpected exception: the traceback is printed; please report it)
    2  the input is wrong: a config, a flag, a path, an artifact, a registry (one message says what and how to fix it)
    3  the data is over an invalid-row limit (prepare-data's max_invalid_fraction, sft's max_too_long_fraction)

:func:`run_main` turns known errors into one clear message on stderr and that status, never a traceback for
bad input. :func:`step_inputs` is the up-front check of a step's CLI: its config (every problem, with the
file or flag that set it) and the artifacts it reads, all reported at once before any model is loaded.
:func:`reported_failure` does the same classification inside a KFP component body, printing a marker line
that ``vlmtune run`` reads to exit with the step's status. :func:`quiet_known_notices` silences, by their
exact text, third-party notices that say nothing to a vlmtune user.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from components.common.config import ConfigError, Problem, config_problems, parse_override, read_yaml_mapping

EXIT_OK, EXIT_BUG, EXIT_INPUT, EXIT_DATA = 0, 1, 2, 3
#: Printed by :func:`reported_failure` as ``vlmtune-step-failed: exit status N: "message"`` (JSON string).
FAILURE_MARKER = "vlmtune-step-failed"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(f"{cls.__name__} fields (also settable in --config YAML)")
    group.add_argument("--config", help="YAML file of config fields (local path or gs://).")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override any config field (repeatable).")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        choices = f.metadata.get("choices")
        # With choices argparse refuses anything else up front and shows them ({a,b}) in the usage line.
        shown = {"choices": list(choices)} if choices else {"metavar": "VALUE"}
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                           # argparse %-formats help strings: a literal % in our help text must be doubled
                           help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"), **shown)


def config_values(args: argparse.Namespace, extra: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any], dict[str, str], list[Problem]]:
    """(values, where each was set, problems) from ``--config FILE``, ``--set`` and the field flags, merged in
    that order (later wins); ``extra`` (values the CLI sets itself) last. Nothing is checked against a config
    class here: that is :func:`~components.common.config.config_problems`' job."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    if getattr(args, "config", None):
        try:
            loaded = read_yaml_mapping(args.config)
        except ConfigError as e:
            problems.append(Problem("", str(e), "--config"))
        else:
            values.update(loaded)
            sources.update({k: args.config for k in loaded})
    for pair in getattr(args, "set", None) or []:
        try:
            key, value = parse_override(pair)
        except ConfigError as e:
            problems.append(Problem("", str(e)))
            continue
        values[key], sources[key] = value, "--set"
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            values[key[4:]], sources[key[4:]] = value, f"--{key[4:].replace('_', '-')}"
    for key, value in (extra or {}).items():
        if value is not None:
            values[key] = value
            sources.pop(key, None)
    return values, sources, problems


def artifact_problems(inputs: Iterable[tuple[str, str | None, str]]) -> list[Problem]:
    """Problems with the artifacts a step reads, given as (flag, URI, kind); a None URI (optional flag) is
    skipped. Each problem is the true reason (does not exist / not a vlmtune artifact / did not finish)."""
    from components.common import artifacts
    from components.common.storage import StorageError

    problems = []
    for flag, uri, kind in inputs:
        if not uri:
            continue
        try:
            artifacts.read_manifest(uri, kind=kind)
        except (artifacts.IncompleteArtifactError, StorageError) as e:
            problems.append(Problem("", str(e), flag))
    return problems


def step_inputs(args: argparse.Namespace, cls: type, *, extra: dict[str, Any] | None = None,
                artifacts: Iterable[tuple[str, str | None, str]] = (), problems: Iterable[Problem | str] = ()):
    """The step's config from its command line, after checking it and the input ``artifacts`` ((flag, URI,
    kind) triples) together: every problem in one :class:`ConfigError`, before any work starts. ``problems``
    adds the CLI's own (e.g. a malformed ``--model NAME=URI``)."""
    values, sources, found = config_values(args, extra)
    found += [p if isinstance(p, Problem) else Problem("", p) for p in problems]
    config_found, config = config_problems(cls, values, sources)
    found += config_found + artifact_problems(artifacts)
    if found:
        raise ConfigError(problems=found, title="invalid input")
    return config


def config_from_args(args: argparse.Namespace, cls: type, extra: dict[str, Any] | None = None):
    """The config from ``--config``, ``--set`` and the field flags: :func:`step_inputs` without artifacts."""
    return step_inputs(args, cls, extra=extra)


@dataclass(frozen=True)
class ErrorRule:
    """How a CLI reports one kind of error: its exit status and its message (default: the error's own text)."""

    types: tuple[type[BaseException], ...]
    status: int = EXIT_INPUT
    message: Callable[[BaseException], str] = str


def input_error_types() -> tuple[type[BaseException], ...]:
    """The errors that mean "the input is wrong" (exit status 2) wherever they come from."""
    from components.common.artifacts import IncompleteArtifactError
    from components.common.registry.types import RegistryError
    from components.common.storage import StorageError

    return (ConfigError, IncompleteArtifactError, StorageError, RegistryError, FileNotFoundError, ValueError)


def exit_status(error: BaseException, rules: Sequence[ErrorRule] = ()) -> int:
    """The exit status for ``error``: the first matching rule's, 2 for an input error, else 1 (a bug)."""
    for rule in rules:
        if isinstance(error, rule.types):
            return rule.status
    return EXIT_INPUT if isinstance(error, input_error_types()) else EXIT_BUG


def run_main(body: Callable[[], int | None], prefix: str = "error", rules: Sequence[ErrorRule] = ()) -> int:
    """Run a CLI body. An error matching one of ``rules`` (first match wins) is printed as ``PREFIX: message``
    with that rule's exit status; after them, input errors (bad config, missing file or artifact, unreadable
    storage, registry, other ValueErrors) are printed the same way with status 2. Anything else is a bug: it
    propagates with its traceback, and the process exits 1."""
    logging.basicConfig(level=os.environ.get("VLMTUNE_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    quiet_known_notices()
    rules = (*rules, ErrorRule(input_error_types()))
    try:
        return body() or EXIT_OK
    except tuple(t for rule in rules for t in rule.types) as e:
        rule = next(r for r in rules if isinstance(e, r.types))
        print(f"{prefix}: {rule.message(e)}", file=sys.stderr)
        return rule.status


@contextlib.contextmanager
def reported_failure(rules: Sequence[ErrorRule] = ()) -> Iterator[None]:
    """For a KFP component body: on an error, print ``vlmtune-step-failed: exit status N: message`` (N by the
    same rules as :func:`run_main`) to stderr and re-raise, so the run fails as before and ``vlmtune run``
    can exit with the step's own status and show its message."""
    quiet_known_notices()
    try:
        yield
    except Exception as e:
        status = exit_status(e, rules)
        text = str(e) if status != EXIT_BUG else f"{type(e).__name__}: {e}"
        # One line whatever the message (JSON-quoted), so a reader finds all of it after the marker.
        print(f"{FAILURE_MARKER}: exit status {status}: {json.dumps(text)}", file=sys.stderr, flush=True)
        raise


def parse_failure_marker(line: str) -> tuple[int, str] | None:
    """(status, message) from a :func:`reported_failure` line, or None for any other line."""
    match = re.search(rf"{FAILURE_MARKER}: exit status (\d+): (\".*\")\s*$", line)
    if not match:
        return None
    try:
        return int(match.group(1)), json.loads(match.group(2))
    except ValueError:
        return int(match.group(1)), match.group(2)


# ------------------------------------------------------------------------------------ third-party notices

#: (logger name, exact message template) of log records that say nothing to a vlmtune user. Matched against the
#: record's unformatted message: exactly these, nothing else from the same logger.
QUIET_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    # bitsandbytes 0.50 on CPUs with AVX512-BF16, on every 4-bit load: the `kernels` package would download
    # compute kernels from a hub at run time, which cannot work offline; bitsandbytes falls back to its own.
    ("bitsandbytes.backends.cpu.ops",
     "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
     "kernels` and the kernels >= 0.11.1"),
)
#: (logger name, regex of the whole formatted message): the same for messages built with an f-string.
QUIET_LOG_PATTERNS: tuple[tuple[str, str], ...] = (
    # transformers 5.x without torchvision (its wheels need CUDA torch here): the PIL image processor is used.
    ("transformers.utils.import_utils",
     r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil` for "
     r"backward compatibility\. Install torchvision to use the default backend, or import `\w+ImageProcessorPil` "
     r"directly to silence this warning\."),
)
#: (category, regex of the whole warning text) of Python warnings to ignore.
QUIET_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # kfp.local: display names are for the Vertex/Kubeflow UIs; the local runner has nowhere to show them.
    (UserWarning, r"Task '[^']+': settings \['display_name'\] have no effect in the current local runner and will "
                  r"be ignored\."),
    # kfp.local.SubprocessRunner(use_venv=False) runs every step in this interpreter on purpose; the image is
    # for the cloud runners.
    (RuntimeWarning, r'You may be attemping to run a task that uses custom or non-Python base image "[^"]+" in a '
                     r'Python environment\. This may result in incorrect dependencies and/or incorrect behavior\. '
                     r'Consider using the "DockerRunner" to run this task in a container\.'),
)


class _QuietRecords(logging.Filter):
    def __init__(self, templates: Sequence[str], patterns: Sequence[str]):
        super().__init__()
        self.templates = set(templates)
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.templates:
            return False
        return not any(p.fullmatch(record.getMessage()) for p in self.patterns)


def quiet_known_notices() -> None:
    """Silence the third-party notices listed above, each by its exact text (so every other warning from the
    same library still shows). Idempotent; applies to this process (each step's subprocess calls it too)."""
    for category, pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern + r"\Z", category=category)
    names = {name for name, _ in QUIET_LOG_RECORDS} | {name for name, _ in QUIET_LOG_PATTERNS}
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietRecords) for f in logger.filters):
            logger.addFilter(_QuietRecords([m for n, m in QUIET_LOG_RECORDS if n == name],
                                           [p for n, p in QUIET_LOG_PATTERNS if n == name]))
