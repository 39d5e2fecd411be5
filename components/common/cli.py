"""CLI plumbing shared by the step entry points: every config field becomes a ``--flag`` (help text from the
dataclass), plus ``--config FILE`` (YAML, local or gs://) and ``--set key=value``. Flags win over --set, which
wins over the file. Errors print one clear message and exit 2, never a traceback for bad input."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any, Callable

from components.common.config import ConfigError, load_config, parse_overrides


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(f"{cls.__name__} fields (also settable in --config YAML)")
    group.add_argument("--config", help="YAML file of config fields (local path or gs://).")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override any config field (repeatable).")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None, metavar="VALUE",
                           help=f"{f.metadata.get('help', '')} (default: {default!r})")


def config_from_args(args: argparse.Namespace, cls: type, extra: dict[str, Any] | None = None):
    overrides = parse_overrides(args.set)
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            overrides[key[4:]] = value
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_config(cls, args.config, overrides)


def run_main(body: Callable[[], int | None]) -> int:
    """Run a CLI body: known input errors become one-line messages and exit status 2."""
    from components.common.artifacts import IncompleteArtifactError
    from components.common.storage import StorageError

    logging.basicConfig(level=os.environ.get("VLMTUNE_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return body() or 0
    except (ConfigError, IncompleteArtifactError, StorageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
