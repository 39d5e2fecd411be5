"""``vlmtune dpo``: DPO on a prepared preference dataset, starting from an SFT model.

    vlmtune dpo --dataset ./data/preference --sft-model ./models/sft --output ./models/dpo [--beta 0.1]
"""
from __future__ import annotations

import argparse
import json

from components.common.cli import add_config_arguments, config_from_args, run_main
from components.dpo.config import DPOStepConfig


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune dpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="Prepared preference dataset (prepare-data --task preference).")
    parser.add_argument("--sft-model", required=True, help="The SFT step's output folder.")
    parser.add_argument("--output", required=True, help="Where the DPO adapter goes (path or gs://).")
    parser.add_argument("--checkpoint-uri", help="Checkpoints every save_steps and on SIGTERM; a restart resumes from the latest.")
    add_config_arguments(parser, DPOStepConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    def body():
        from components.dpo.core import run

        manifest = run(config_from_args(args, DPOStepConfig), args.dataset, args.sft_model, args.output, args.checkpoint_uri)
        print(json.dumps(manifest["metrics"], indent=2))
        print(f"DPO model written to {args.output}")

    return run_main(body)
