"""``vlmtune prepare-data``: the command-line face of ``components.prepare_data.core.run``.

    vlmtune prepare-data --source DIR_OR_URI --output DIR_OR_URI [--config FILE] [--task sft|preference]
        [--preset NAME] [--processor MODEL] [--max-invalid-fraction F] [--set key=value ...]
    vlmtune prepare-data plan --source SRC --plan PLAN.json --shards N [config flags]   # fanned out:
    vlmtune prepare-data part --plan PLAN.json --item I --output PART_I                 #   one per item
    vlmtune prepare-data finalize --plan PLAN.json --parts PART_0 ... --output DATASET  #   manifest last

Every PrepareDataConfig field is also a flag (``components.common.cli``, as for the other steps); shipped
configs for common dataset layouts are in ``pipelines/configs/prepare_data/``. Exit status 2 for a bad config,
an unreadable source or a storage error, 3 when too many rows are invalid (no manifest is written then; the
message shows the first rejected rows and the full list is left at ``OUTPUT/rejects.jsonl``). Every rejected
row of a finished run is listed in ``rejects.jsonl`` beside the manifest.
Run ``python -m components.prepare_data.cli --help`` for the same without the ``vlmtune`` entry point.
"""
from __future__ import annotations

import argparse
import sys

from components.common import storage
from components.common.artifacts import IncompleteArtifactError
from components.common.cli import ErrorRule, add_config_arguments, config_from_args, run_main
from components.common.storage import StorageError
from components.prepare_data.config import PrepareDataConfig


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmtune prepare-data",
        description="Turn a source dataset (folder/JSONL/CSV/Parquet/datasets, local or gs://) into train/eval "
        "Parquet shards in SmolVLM chat form, with fixed and token-aware-resized images and a manifest.",
    )
    parser.add_argument("--source", required=True, help="Source folder or file: local path, file:// or gs:// URI.")
    parser.add_argument("--output", required=True, help="Output dataset folder: local path, file:// or gs:// URI.")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    # `progress` is the one field set by a switch (--no-progress) rather than a --progress VALUE flag.
    add_config_arguments(parser, PrepareDataConfig, skip=("progress",))
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
        lines.append(f"  tokens per image ({tokens.get('image_sizing', 'fixed')} sizing): min {tokens['min']}, mean {tokens['mean']}, "
                     f"max {tokens['max']}" + (f" (fixed size: mean {tokens['fixed_size']['mean']})" if "fixed_size" in tokens else ""))
    lines.extend(f"  warning: {w}" for w in manifest.get("warnings", []))
    return "\n".join(lines)


STEPS = ("plan", "part", "finalize")


def make_step_parser(step: str) -> argparse.ArgumentParser:
    """The fanned-out shape, one subcommand per step (the pipeline's ParallelFor runs the same three)."""
    parser = argparse.ArgumentParser(
        prog=f"vlmtune prepare-data {step}",
        description={
            "plan": "List the work items (row ranges) of a source into a plan file; decodes no image.",
            "part": "Prepare one plan item into a part folder (part.json written last).",
            "finalize": "Merge every item's part into the dataset (dedup, rejects, statistics; manifest last).",
        }[step],
    )
    parser.add_argument("--plan", required=True, help="The plan file (JSON): local path, file:// or gs:// URI.")
    if step == "plan":
        parser.add_argument("--source", required=True, help="Source folder or file: local path, file:// or gs:// URI.")
        parser.add_argument("--shards", type=int, required=True, help="Number of work items (1 = one container).")
        add_config_arguments(parser, PrepareDataConfig, skip=("progress",))
    elif step == "part":
        parser.add_argument("--item", type=int, required=True, help="The plan item to prepare (0-based).")
        parser.add_argument("--output", required=True, help="The item's part folder.")
    else:
        parser.add_argument("--parts", nargs="+", required=True, help="Every item's part folder (any order).")
        parser.add_argument("--output", required=True, help="Output dataset folder.")
    return parser


def step_main(step: str, argv: list[str]) -> int:
    args = make_step_parser(step).parse_args(argv)
    from components.prepare_data import core
    from components.prepare_data.sources import SourceError

    def body() -> None:
        if step == "plan":
            config = config_from_args(args, PrepareDataConfig, extra={"progress": False})
            plan = core.plan(config, args.source, args.plan, shards=args.shards)
            print(f"plan {plan['plan_id']}: {len(plan['items'])} item(s) over {plan['total_rows']} rows, "
                  f"written to {args.plan}")
        elif step == "part":
            m = core.part(args.plan, args.item, args.output)
            print(f"item {m['item']}: rows {m['start']}..{m['stop'] - 1}, {m['counts']['rows_out']} written, "
                  f"{m['counts']['rejected']} rejected; part at {args.output}")
        else:
            manifest = core.finalize(args.plan, args.parts, args.output)
            print(summarize(manifest))
            print(f"dataset written to {args.output} (manifest.json, content hash {manifest['content_hash'][:12]})")

    return run_main(body, prefix=f"prepare-data {step}", rules=(
        ErrorRule((core.TooManyInvalidRowsError,), 3, lambda e: f"{e}\nNo manifest was written."),
        ErrorRule((core.FanoutError,), 2),
        ErrorRule((SourceError, FileNotFoundError), 2, lambda e: f"cannot read the source: {e}"),
        ErrorRule((StorageError, IncompleteArtifactError), 2, lambda e: f"storage error: {e}"),
    ))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STEPS:
        return step_main(argv[0], argv[1:])
    args = make_parser().parse_args(argv)
    # Imported here, not at module level: `--help` and the `vlmtune` dispatcher stay light.
    from components.prepare_data import core
    from components.prepare_data.sources import SourceError

    def body() -> None:
        config = config_from_args(args, PrepareDataConfig, extra={"progress": False if args.no_progress else None})
        manifest = core.run(config, args.source, args.output)
        print(summarize(manifest))
        if manifest["counts"]["rejected"]:
            print(f"every rejected row, with its source line and what was wrong: "
                  f"{storage.join(args.output, manifest['rejects_file'])}")
        print(f"dataset written to {args.output} (manifest.json, content hash {manifest['content_hash'][:12]})")

    return run_main(body, prefix="prepare-data", rules=(
        ErrorRule((core.TooManyInvalidRowsError,), 3, lambda e: f"{e}\nNo manifest was written to {args.output!r}."),
        ErrorRule((SourceError, FileNotFoundError), 2, lambda e: f"cannot read --source {args.source!r}: {e}"),
        ErrorRule((StorageError, IncompleteArtifactError), 2,
                  lambda e: f"storage error (--source {args.source!r}, --output {args.output!r}): {e}"),
    ))


if __name__ == "__main__":
    sys.exit(main())
