"""The ``vlmtune`` command: the demo, the pipeline runners, and every step's own CLI.

    vlmtune demo --workdir ./demo                      # the whole job on this machine (kfp.local)
    vlmtune run [--config run.yaml] [--set sft_config.learning_rate=1e-4 ...]
    vlmtune compile --target vertex|kubeflow --output spec.yaml
    vlmtune tiny-model --output DIR | demo-data --output DIR
    vlmtune prepare-data | sft | dpo | evaluate | register ...   # one step, as its container runs it
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Step sub-commands delegate to the step's own CLI module (its make_parser()/main(argv)).
STEP_COMMANDS = {
    "prepare-data": "components.prepare_data.cli",
    "sft": "components.sft.cli",
    "dpo": "components.dpo.cli",
    "evaluate": "components.evaluate.cli",
    "register": "components.register.cli",
}
OPTIONAL_COMMANDS = {  # modules that add their own sub-commands via register_cli(subparsers)
    "pipelines.containers": "images/step",
    "pipelines.submit": "submit",
    "pipelines.schedule": "schedule",
    "pipelines.predict_cli": "predict",
    "components.register.cli": "registry",
}


def _cmd_tiny_model(args) -> int:
    from components.common.tiny_model import build_tiny_model

    print(f"tiny model written to {build_tiny_model(args.output, seed=args.seed)}")
    return 0


def _cmd_demo_data(args) -> int:
    from components.common.demo_data import write_demo_data

    print(f"demo data written to {write_demo_data(args.output, rows=args.rows, preference_rows=args.preference_rows, seed=args.seed)}")
    return 0


def _cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    summary = run_demo(args.workdir, caching=not args.no_cache)
    return 0 if summary["passed"] else 1


def _cmd_run(args) -> int:
    import yaml

    from components.common.config import parse_overrides
    from pipelines.demo import default_params, demo_config, print_summary, summarize
    from pipelines.local import run_local

    workdir = Path(args.workdir).absolute()
    config = demo_config()
    if args.config:
        config.update(yaml.safe_load(Path(args.config).read_text()) or {})
    params = default_params(workdir, config)
    for key in ("base_model", "sft_source", "preference_source", "registry", "registry_name"):
        if config.get(key):
            params[key] = config[key]
    for key, value in parse_overrides(args.set).items():
        section, _, field = key.partition(".")
        if field:
            params[section] = {**params.get(section, {}), field: value}
        elif section in params:
            params[section] = value
        else:
            raise SystemExit(f"error: unknown pipeline parameter {section!r}; known: {', '.join(sorted(params))}")
    for key in ("base_model", "sft_source", "preference_source", "registry"):
        # Steps run in subprocesses: hand them absolute paths (hub ids and gs:// URIs pass through).
        value = params.get(key)
        if isinstance(value, str) and "://" not in value and (Path(value).exists() or key == "registry"):
            params[key] = str(Path(params[key]).absolute())
    import time

    started = time.time()
    outputs = run_local(params, workdir / "pipeline-root", runner=args.runner, caching=not args.no_cache, gpus=args.gpus)
    summary = summarize(outputs, params, time.time() - started)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return 0


def _cmd_compile(args) -> int:
    from pipelines.compile import compile_pipeline, target_settings

    overrides = {k: v for k, v in {"registry_prefix": args.registry_prefix, "image_tag": args.image_tag}.items() if v}
    if args.scheduled:
        overrides["skip_unchanged_data"] = True
    path = compile_pipeline(args.target, args.output, target_settings(args.target, args.settings, overrides))
    print(f"{args.target} pipeline spec written to {path}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="Build the tiny model and demo data, run the pipeline locally, write summary.json.")
    p.add_argument("--workdir", default="./demo-workdir")
    p.add_argument("--no-cache", action="store_true", help="Re-run every step even if kfp's cache has it.")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="Run the pipeline on this machine (kfp.local). Defaults: tiny model + demo data.")
    p.add_argument("--workdir", default="./demo-workdir", help="Pipeline root, registry and defaults live here.")
    p.add_argument("--config", help="YAML with base_model, sft_source, preference_source, registry, registry_name, *_config sections.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. base_model=HuggingFaceTB/SmolVLM-256M-Instruct or sft_config.learning_rate=1e-4")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess", help="subprocess: in this environment; docker: each step in its image.")
    p.add_argument("--gpus", help="docker runner: GPUs for the steps ('all', a count, or ids).")
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("compile", help="Write the pipeline spec for Vertex AI or Kubeflow.")
    p.add_argument("--target", choices=["vertex", "kubeflow"], required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--settings", help="Pipeline settings YAML (default: pipelines/configs/<target>.yaml).")
    p.add_argument("--registry-prefix", help="Image registry prefix, e.g. us-central1-docker.pkg.dev/PROJECT/vlmtune")
    p.add_argument("--image-tag")
    p.add_argument("--scheduled", action="store_true", help="The retraining variant: skip training when the data equals the champion's.")
    p.set_defaults(func=_cmd_compile)

    p = sub.add_parser("tiny-model", help="Write the tiny SmolVLM-architecture model (the embedded default base).")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("demo-data", help="Write the synthetic shapes dataset (images + JSONL, and preference pairs).")
    p.add_argument("--output", required=True)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--preference-rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo_data)

    for name in STEP_COMMANDS:
        p = sub.add_parser(name, help=f"Run the {name} step (see `vlmtune {name} --help`).", add_help=False)
        p.set_defaults(step=name)

    for module_name in OPTIONAL_COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STEP_COMMANDS:
        return importlib.import_module(STEP_COMMANDS[argv[0]]).main(argv[1:])
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
