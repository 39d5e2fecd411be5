"""The ``vlmtune`` command: the demo, the pipeline runners, and every step's own CLI.

    vlmtune demo --workdir ./demo                      # the whole job on this machine (kfp.local)
    vlmtune run [--config run.yaml] [--set sft_config.learning_rate=1e-4 ...] [--verbose]
    vlmtune compile --target vertex|kubeflow --output spec.yaml
    vlmtune tiny-model --output DIR | demo-data --output DIR
    vlmtune prepare-data | sft | dpo | evaluate | register ...   # one step, as its container runs it

Exit status, the same for every command: 0 done, 2 the input is wrong (a message says what and how to fix it),
3 the data is over an invalid-row limit, 1 a bug (a traceback is printed; please report it).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import sys
from pathlib import Path
from typing import Callable

from pipelines.steps import STEPS, run_step, step_command

Command = Callable[[list[str]], int]

EXIT_STATUSES = """exit status: 0 done; 2 the input is wrong (nothing was started); 3 a step's data is over its invalid-row
limit; 1 a bug (see the log). A failed step's own status is passed on."""


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
    p = argparse.ArgumentParser(prog="vlmtune demo", description=COMMANDS["demo"][1],
                                epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="./demo-workdir")
    p.add_argument("--no-cache", action="store_true", help="Re-run every step even if kfp's cache has it.")
    p.add_argument("--verbose", action="store_true", help="Stream every step's full output (kfp's own view), not one line per step.")
    p.add_argument("--write-readme", metavar="README.md",
                   help="Run the demo twice in a new --workdir (first run, then from kfp's cache) and write its table "
                        "between the demo markers of this file.")
    return p


def _demo(argv: list[str]) -> int:
    args = demo_parser().parse_args(argv)
    from components.common.cli import EXIT_BUG, EXIT_INPUT
    from pipelines.demo import demo_for_readme, run_demo
    from pipelines.params import ParamsError

    try:
        if args.write_readme:
            return demo_for_readme(args.workdir, args.write_readme, verbose=args.verbose)
        status, summary = run_demo(args.workdir, caching=not args.no_cache, verbose=args.verbose)
    except (ParamsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    # The shipped demo not passing its own gate is a vlmtune bug (its settings are tuned to pass).
    return status if status or summary is None else (0 if summary["passed"] else EXIT_BUG)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune run", description=COMMANDS["run"][1],
                                epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="./demo-workdir", help="Pipeline root, registry, logs and defaults live here.")
    p.add_argument("--config", help="YAML of pipeline parameters: base_model, sft_source, preference_source, registry, "
                                    "registry_name, *_config sections (a section replaces demo.yaml's).")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. base_model=HuggingFaceTB/SmolVLM-256M-Instruct or sft_config.learning_rate=1e-4")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess", help="subprocess: in this environment; docker: each step in its image.")
    p.add_argument("--gpus", help="docker runner: GPUs for the steps ('all', a count, or ids).")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--verbose", action="store_true", help="Stream every step's full output (kfp's own view), not one line per step.")
    return p


def _run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    from components.common.cli import EXIT_INPUT
    from pipelines.demo import execute, resolve_run_params
    from pipelines.params import ParamsError

    workdir = Path(args.workdir).absolute()
    try:
        # Everything is checked before anything is built, written or started.
        params, to_build = resolve_run_params(workdir, args.config, args.set)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    workdir.mkdir(parents=True, exist_ok=True)
    status, _ = execute(params, workdir, title=f"vlmtune run ({args.runner} runner)", to_build=to_build,
                        runner=args.runner, caching=not args.no_cache, gpus=args.gpus, verbose=args.verbose)
    return status


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
