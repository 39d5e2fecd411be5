"""``vlmtune prepare-data``: the command-line face of ``components.prepare_data.core.run``.

    vlmtune prepare-data --source DIR_OR_URI --output DIR_OR_URI [--config FILE] [--task sft|preference]
        [--preset NAME] [--processor MODEL] [--max-invalid-fraction F] [--set key=value ...]

Run ``python -m components.prepare_data.cli --help`` for the same without the ``vlmtune`` entry point.
"""
from __future__ import annotations

import argparse
import sys

from components.common.artifacts import IncompleteArtifactError
from components.common.config import ConfigError, help_of, load_config, parse_overrides
from components.common.storage import StorageError
from components.prepare_data.config import PRESETS, PrepareDataConfig


def make_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The argument parser (pass an existing (sub)parser to fill it in, e.g. from the ``vlmtune`` CLI)."""
    parser = parser or argparse.ArgumentParser(
        prog="vlmtune prepare-data",
        description="Turn a source dataset (folder/JSONL/CSV/Parquet/datasets, local or gs://) into train/eval "
        "Parquet shards in SmolVLM chat form, with fixed and token-aware-resized images and a manifest.",
    )
    parser.add_argument("--source", required=True, help="Source folder or file: local path, file:// or gs:// URI.")
    parser.add_argument("--output", required=True, help="Output dataset folder: local path, file:// or gs:// URI.")
    parser.add_argument("--config", help="YAML file with PrepareDataConfig fields (local or gs://).")
    parser.add_argument("--task", choices=["sft", "preference"], help=help_of(PrepareDataConfig, "task"))
    parser.add_argument("--preset", choices=sorted(PRESETS), help=help_of(PrepareDataConfig, "preset"))
    parser.add_argument("--processor", help=help_of(PrepareDataConfig, "processor"))
    parser.add_argument("--max-invalid-fraction", type=float, help=help_of(PrepareDataConfig, "max_invalid_fraction"))
    parser.add_argument("--num-workers", type=int, help=help_of(PrepareDataConfig, "num_workers"))
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override any config field, e.g. --set eval_fraction=0.1 --set answer_column=label (repeatable).",
    )
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def summarize(manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [
        f"prepared {counts['rows_out']} of {counts['rows_in']} rows "
        f"(train {manifest['splits']['train']['rows']}, eval {manifest['splits']['eval']['rows']}) "
        f"in {manifest.get('seconds', '?')} s",
    ]
    for reason, entry in manifest["rejects"].items():
        lines.append(f"  rejected {entry['count']:>6}  {reason}  (e.g. {', '.join(entry['examples'][:3])})")
    tokens = manifest.get("tokens_per_image")
    if tokens:
        lines.append(f"  tokens per image: min {tokens['min']}, mean {tokens['mean']}, max {tokens['max']}")
    lines.extend(f"  warning: {w}" for w in manifest.get("warnings", []))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from components.prepare_data import core
    from components.prepare_data.sources import SourceError

    try:
        overrides = parse_overrides(args.overrides)
        for key, value in (
            ("task", args.task), ("preset", args.preset), ("processor", args.processor),
            ("max_invalid_fraction", args.max_invalid_fraction), ("num_workers", args.num_workers),
        ):
            if value is not None:
                overrides[key] = value
        if args.no_progress:
            overrides["progress"] = False
        config = load_config(PrepareDataConfig, args.config, overrides)
        manifest = core.run(config, args.source, args.output)
    except ConfigError as e:
        print(f"prepare-data: {e}", file=sys.stderr)
        return 2
    except core.TooManyInvalidRowsError as e:
        print(f"prepare-data: {e}\nNo manifest was written to {args.output!r}.", file=sys.stderr)
        return 3
    except (SourceError, FileNotFoundError) as e:
        print(f"prepare-data: cannot read --source {args.source!r}: {e}", file=sys.stderr)
        return 2
    except (StorageError, IncompleteArtifactError) as e:
        print(f"prepare-data: storage error (--source {args.source!r}, --output {args.output!r}): {e}", file=sys.stderr)
        return 2
    print(summarize(manifest))
    print(f"dataset written to {args.output} (manifest.json, content hash {manifest['content_hash'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
