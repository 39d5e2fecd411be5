"""CLI plumbing shared by every step's entry point (prepare-data, sft, dpo, evaluate): every config field becomes
a ``--flag`` (help text, and the allowed values where the field's metadata lists ``choices``, from the
dataclass), plus ``--config FILE`` (YAML, local or gs://) and ``--set key=value``. Flags win over --set, which
wins over the file. :func:`run_main` turns known input errors into one clear line on stderr and an exit status
(2 unless the step gives a rule of its own), never a traceback for bad input."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from components.common.config import ConfigError, load_config, parse_overrides


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
                           help=f"{f.metadata.get('help', '')} (default: {default!r})", **shown)


def config_from_args(args: argparse.Namespace, cls: type, extra: dict[str, Any] | None = None):
    overrides = parse_overrides(args.set)
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            overrides[key[4:]] = value
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_config(cls, args.config, overrides)


@dataclass(frozen=True)
class ErrorRule:
    """How a CLI reports one kind of error: its exit status and its message (default: the error's own text)."""

    types: tuple[type[BaseException], ...]
    status: int = 2
    message: Callable[[BaseException], str] = str


def run_main(body: Callable[[], int | None], prefix: str = "error", rules: Sequence[ErrorRule] = ()) -> int:
    """Run a CLI body. An error matching one of ``rules`` (first match wins) is printed as ``PREFIX: message``
    with that rule's exit status; after them, known input errors (bad config, missing file, unreadable storage,
    incomplete artifact, other ValueErrors) are printed the same way and exit with status 2."""
    from components.common.artifacts import IncompleteArtifactError
    from components.common.storage import StorageError

    logging.basicConfig(level=os.environ.get("VLMTUNE_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    rules = (*rules, ErrorRule((ConfigError, IncompleteArtifactError, StorageError, FileNotFoundError, ValueError)))
    try:
        return body() or 0
    except tuple(t for rule in rules for t in rule.types) as e:
        rule = next(r for r in rules if isinstance(e, r.types))
        print(f"{prefix}: {rule.message(e)}", file=sys.stderr)
        return rule.status
