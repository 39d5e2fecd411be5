"""``vlmtune sft``: QLoRA SFT on a prepared dataset.

    vlmtune sft --dataset ./data/sft --output ./models/sft --base-model HuggingFaceTB/SmolVLM-256M-Instruct \
        [--checkpoint-uri gs://bucket/ckpt/run-1/sft] [--config sft.yaml] [--learning-rate 1e-4 ...]
"""
from __future__ import annotations

import argparse
import json

from components.common.cli import add_config_arguments, config_from_args, run_main
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

    def body():
        from components.sft.core import run

        config = config_from_args(args, SFTStepConfig)
        manifest = run(config, args.dataset, args.output, args.checkpoint_uri)
        print(json.dumps(manifest["metrics"], indent=2))
        print(f"SFT model written to {args.output}")

    return run_main(body)
