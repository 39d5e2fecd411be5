"""``vlmtune evaluate``: score base, trained stages and the registry champion on the held-out split.

    vlmtune evaluate --dataset ./data/sft --model sft=./models/sft --model dpo=./models/dpo --output ./eval \
        [--registry ./registry --registry-name my-model] [--metric vqa --min-delta 0.02]

The last --model is the candidate. The config, --dataset, every --model and --preference-dataset are checked
before any model is loaded. Exit status (as for every vlmtune command): 0 done, whether or not the gate passed
(read `passed` in the output), 2 bad input, 1 a bug.
"""
from __future__ import annotations

import argparse
import json

from components.common.cli import add_config_arguments, run_main, step_inputs
from components.common.schema import DATASET_KIND, MODEL_KIND
from components.evaluate.config import EvaluateConfig


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="Prepared SFT dataset; its eval split is scored.")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=URI", help="A trained model (repeatable; last = candidate).")
    parser.add_argument("--output", required=True, help="Evaluation folder (metrics, predictions, report).")
    parser.add_argument("--base-model", help="Base model to compare with (default: the candidate's base).")
    parser.add_argument("--registry", help="Registry whose champion is also scored.")
    parser.add_argument("--registry-name", help="Model name in the registry.")
    parser.add_argument("--preference-dataset", help="Prepared preference dataset: adds DPO reward accuracy/margin on its eval pairs.")
    add_config_arguments(parser, EvaluateConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    def body():
        models, problems = {}, []
        for item in args.model:
            name, sep, uri = item.partition("=")
            if not sep or not name or not uri:
                problems.append(f"--model {item!r} must be NAME=URI, e.g. --model sft=./models/sft")
            elif name in models:
                problems.append(f"--model {name}=...: given twice; each model needs its own name")
            else:
                models[name] = uri
        config = step_inputs(args, EvaluateConfig, problems=problems, artifacts=[
            ("--dataset", args.dataset, DATASET_KIND),
            *((f"--model {name}", uri, MODEL_KIND) for name, uri in models.items()),
            ("--preference-dataset", args.preference_dataset, DATASET_KIND)])
        from components.evaluate.core import run

        manifest = run(config, args.dataset, models, args.output,
                       base_model=args.base_model, registry=args.registry, registry_name=args.registry_name,
                       preference_uri=args.preference_dataset)
        print(json.dumps({k: manifest[k] for k in ("passed", "reasons", "metrics")}, indent=2))

    return run_main(body)
