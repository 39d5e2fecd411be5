"""The ``vlmtune`` command: the demo, the pipeline runners, and every step's own CLI.

    vlmtune demo --workdir ./demo                      # the whole job on this machine (kfp.local)
    vlmtune run [--config run.yaml] [--set sft_config.learning_rate=1e-4 ...]
    vlmtune compile --target vertex|kubeflow --output spec.yaml
    vlmtune tiny-model --output DIR | demo-data --output DIR
    vlmtune prepare-data | sft | dpo | evaluate | register ...   # one step, as its container runs it
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from pathlib import Path
from typing import Callable

from pipelines.steps import STEPS, run_step, step_command

Command = Callable[[list[str]], int]


def tiny_model_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune tiny-model", description=COMMANDS["tiny-model"][1])
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    return p


def _tiny_model(argv: list[str]) -> int:
    args = tiny_model_parser().parse_args(argv)
    from components.common.tiny_model import build_tiny_model

    print(f"tiny model written to {build_tiny_model(args.output, seed=args.seed)}")
    return 0


def demo_data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune demo-data", description=COMMANDS["demo-data"][1])
    p.add_argument("--output", required=True)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--preference-rows", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    return p


def _demo_data(argv: list[str]) -> int:
    args = demo_data_parser().parse_args(argv)
    from components.common.demo_data import write_demo_data

    print(f"demo data written to {write_demo_data(args.output, rows=args.rows, preference_rows=args.preference_rows, seed=args.seed)}")
    return 0


def demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune demo", description=COMMANDS["demo"][1])
    p.add_argument("--workdir", default="./demo-workdir")
    p.add_argument("--no-cache", action="store_true", help="Re-run every step even if kfp's cache has it.")
    return p


def _demo(argv: list[str]) -> int:
    args = demo_parser().parse_args(argv)
    from pipelines.demo import run_demo

    summary = run_demo(args.workdir, caching=not args.no_cache)
    return 0 if summary["passed"] else 1


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune run", description=COMMANDS["run"][1])
    p.add_argument("--workdir", default="./demo-workdir", help="Pipeline root, registry and defaults live here.")
    p.add_argument("--config", help="YAML with base_model, sft_source, preference_source, registry, registry_name, *_config sections.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. base_model=HuggingFaceTB/SmolVLM-256M-Instruct or sft_config.learning_rate=1e-4")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess", help="subprocess: in this environment; docker: each step in its image.")
    p.add_argument("--gpus", help="docker runner: GPUs for the steps ('all', a count, or ids).")
    p.add_argument("--no-cache", action="store_true")
    return p


def _run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    import time

    import yaml

    from pipelines.demo import default_params, demo_config, print_summary, summarize
    from pipelines.local import run_local
    from pipelines.params import SubmitError, merge_overrides

    workdir = Path(args.workdir).absolute()
    config = demo_config()
    if args.config:
        config.update(yaml.safe_load(Path(args.config).read_text()) or {})
    params = default_params(workdir, config)
    for key in ("base_model", "sft_source", "preference_source", "registry", "registry_name"):
        if config.get(key):
            params[key] = config[key]
    try:
        params = merge_overrides(params, args.set, only_known=True)
    except SubmitError as e:
        raise SystemExit(f"error: {e}") from e
    for key in ("base_model", "sft_source", "preference_source", "registry"):
        # Steps run in subprocesses: hand them absolute paths (hub ids and gs:// URIs pass through).
        value = params.get(key)
        if isinstance(value, str) and "://" not in value and (Path(value).exists() or key == "registry"):
            params[key] = str(Path(params[key]).absolute())
    started = time.time()
    outputs = run_local(params, workdir / "pipeline-root", runner=args.runner, caching=not args.no_cache, gpus=args.gpus)
    summary = summarize(outputs, params, time.time() - started)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return 0


def compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune compile", description=COMMANDS["compile"][1])
    p.add_argument("--target", choices=["vertex", "kubeflow"], required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--settings", help="Pipeline settings YAML (default: pipelines/configs/<target>.yaml).")
    p.add_argument("--registry-prefix", help="Image registry prefix, e.g. us-central1-docker.pkg.dev/PROJECT/vlmtune")
    p.add_argument("--image-tag")
    p.add_argument("--scheduled", action="store_true", help="The retraining variant: skip training when the data equals the champion's.")
    return p


def _compile(argv: list[str]) -> int:
    args = compile_parser().parse_args(argv)
    from pipelines.compile import compile_pipeline, target_settings

    overrides = {k: v for k, v in {"registry_prefix": args.registry_prefix, "image_tag": args.image_tag}.items() if v}
    if args.scheduled:
        overrides["skip_unchanged_data"] = True
    path = compile_pipeline(args.target, args.output, target_settings(args.target, args.settings, overrides))
    print(f"{args.target} pipeline spec written to {path}")
    return 0


def _entry_point(target: str) -> Command:
    """`"module:function"` -> a command that imports the module only when it runs, so `vlmtune sft` loads neither
    kfp nor the cloud SDKs that `vlmtune submit` needs."""
    module, _, function = target.partition(":")

    def command(argv: list[str]) -> int:
        return getattr(importlib.import_module(module), function)(argv)

    return command


#: Every sub-command: name -> (its `main(argv) -> exit status`, which parses its own arguments; one line of help).
#: The one way a command is added: a function of argv, here or in its own module (`make_parser()` + `main(argv)`).
COMMANDS: dict[str, tuple[Command, str]] = {
    "demo": (_demo, "Build the tiny model and demo data, run the pipeline locally, write summary.json."),
    "run": (_run, "Run the pipeline on this machine (kfp.local). Defaults: tiny model + demo data."),
    "compile": (_compile, "Write the pipeline spec for Vertex AI or Kubeflow."),
    "tiny-model": (_tiny_model, "Write the tiny SmolVLM-architecture model (the embedded default base)."),
    "demo-data": (_demo_data, "Write the synthetic shapes dataset (images + JSONL, and preference pairs)."),
    **{step_command(step): (functools.partial(run_step, step),
                            f"Run the {step_command(step)} step (see `vlmtune {step_command(step)} --help`).")
       for step in STEPS},
    "images": (_entry_point("pipelines.container_cli:images_main"), "build or push the step container images"),
    "step": (_entry_point("pipelines.container_cli:step_main"), "run one pipeline step, in-process or in its container"),
    "submit": (_entry_point("pipelines.submit:main"), "Run the pipeline on Vertex AI Pipelines or Kubeflow Pipelines."),
    "schedule": (_entry_point("pipelines.schedule:main"), "Create, list, pause, resume or delete scheduled pipeline runs."),
    "predict": (_entry_point("pipelines.predict_cli:main"), "Ask a model about images, a batch file (JSONL) or a video."),
    "registry": (_entry_point("components.register.cli:registry_main"), "List, show or promote registered model versions."),
}


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the commands for `vlmtune --help` and rejects unknown ones; each command parses
    its own arguments."""
    parser = argparse.ArgumentParser(prog="vlmtune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    # No command first: the parser prints the help or the error and exits (`vlmtune -- demo` still finds demo).
    args, rest = make_parser().parse_known_args(argv)
    return COMMANDS[args.command][0](rest)


if __name__ == "__main__":
    sys.exit(main())
