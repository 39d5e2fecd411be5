"""``vlmtune dpo``: DPO on a prepared preference dataset, starting from an SFT model.

    vlmtune dpo --dataset ./data/preference --sft-model ./models/sft --output ./models/dpo [--beta 0.1]

The config, --dataset and --sft-model are checked before any model is loaded. Exit status (as for every
vlmtune command): 0 done, 2 bad input, 3 too many pairs over the token budget, 1 a bug.
"""
from __future__ import annotations

import argparse
import json

from components.common.cli import EXIT_DATA, ErrorRule, add_config_arguments, run_main, step_inputs
from components.common.schema import DATASET_KIND, MODEL_KIND
from components.dpo.config import DPOStepConfig


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune dpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="Prepared preference dataset (prepare-data --task preference).")
    parser.add_argument("--sft-model", required=True, help="The SFT step's output folder.")
    parser.add_argument("--sft-dataset", help="Prepared SFT dataset: with pairs_from_sft_mistakes=true the pairs are the "
                                              "SFT model's wrong answers on its train split (--dataset then gives the eval loss).")
    parser.add_argument("--output", required=True, help="Where the DPO adapter goes (path or gs://).")
    parser.add_argument("--checkpoint-uri", help="Checkpoints every save_steps and on SIGTERM; a restart resumes from the latest.")
    add_config_arguments(parser, DPOStepConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    def body():
        inputs = [("--dataset", args.dataset, DATASET_KIND), ("--sft-model", args.sft_model, MODEL_KIND)]
        if args.sft_dataset:
            inputs.append(("--sft-dataset", args.sft_dataset, DATASET_KIND))
        config = step_inputs(args, DPOStepConfig, artifacts=inputs)
        from components.dpo.core import run

        manifest = run(config, args.dataset, args.sft_model, args.output, args.checkpoint_uri, args.sft_dataset)
        print(json.dumps(manifest["metrics"], indent=2))
        print(f"DPO model written to {args.output}")

    from components.common.training.collator import TooManyRowsOverBudgetError

    return run_main(body, rules=(ErrorRule((TooManyRowsOverBudgetError,), EXIT_DATA),))
