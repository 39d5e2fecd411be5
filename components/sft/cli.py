"""``vlmtune sft``: QLoRA SFT on a prepared dataset.

    vlmtune sft --dataset ./data/sft --output ./models/sft --base-model HuggingFaceTB/SmolVLM-256M-Instruct \
        [--checkpoint-uri gs://bucket/ckpt/run-1/sft] [--config sft.yaml] [--learning-rate 1e-4 ...]

The config and --dataset are checked before the model is loaded. Exit status (as for every vlmtune command):
0 done, 2 bad input (config, flags, a --dataset that is not a prepared SFT dataset), 3 more rows over
max_length than max_too_long_fraction allows, 1 a bug.
"""
from __future__ import annotations

import argparse
import json

from components.common.cli import EXIT_DATA, ErrorRule, add_config_arguments, run_main, step_inputs
from components.common.schema import DATASET_KIND
from components.sft.config import SFTStepConfig


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="Prepared SFT dataset folder (prepare-data --task sft).")
    parser.add_argument("--output", required=True, help="Where the adapter, processor, config and metrics go (path or gs://).")
    parser.add_argument("--checkpoint-uri", help="Checkpoints every save_steps and on SIGTERM; a restart resumes from the latest.")
    add_config_arguments(parser, SFTStepConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from components.sft import core

    def body():
        config = step_inputs(args, SFTStepConfig, artifacts=[("--dataset", args.dataset, DATASET_KIND)])
        manifest = core.run(config, args.dataset, args.output, args.checkpoint_uri)
        print(json.dumps(manifest["metrics"], indent=2))
        print(f"SFT model written to {args.output}")

    from components.common.training.collator import TooManyRowsOverBudgetError

    return run_main(body, rules=(ErrorRule((TooManyRowsOverBudgetError,), EXIT_DATA),))
