"""Submit one pipeline run to Vertex AI Pipelines or Kubeflow Pipelines.

    vlmtune submit --target vertex --project P --region us-central1 --pipeline-root gs://BUCKET/pipeline-root \\
        --params run.yaml [--set base_model=HuggingFaceTB/SmolVLM-256M-Instruct --set sft_config.learning_rate=1e-4] \\
        [--service-account SA@P.iam.gserviceaccount.com] [--network projects/N/global/networks/VPC] \\
        [--label team=vision] [--experiment vlmtune] [--no-cache] [--run-name NAME] [--wait]

    vlmtune submit --target kubeflow --host https://KFP_HOST --namespace NS --pipeline-root gs://BUCKET/root \\
        --params run.yaml [--experiment vlmtune] [--service-account KSA] [--wait]

The spec is compiled for the target from pipelines/configs/<target>.yaml (`--settings`, `--registry-prefix`,
`--image-tag` as for `vlmtune compile`), or taken as is with `--template spec.yaml`.

Parameters are the pipeline function's own (sft_source, preference_source, base_model, registry,
registry_name, prepare_config, sft_config, dpo_config, eval_config, sft_checkpoint_uri, dpo_checkpoint_uri).
`--params FILE` is a YAML mapping of them; `--set KEY=VALUE` wins over it (`--set sft_config.KEY=VALUE` sets
one field of a config section). Everything is checked before anything is sent, and every problem is reported
at once: unknown or missing parameters, wrong types, config fields the steps do not know, and, since steps run
on remote machines, sources/registry/pipeline root that are local paths (Vertex wants gs:// throughout).

Checkpoints: unless given, each run gets ``sft_checkpoint_uri``/``dpo_checkpoint_uri`` =
``{pipeline_root}/checkpoints/{run_name}/{sft,dpo}``, so a step that `set_retry` restarts after a preemption
resumes from its last checkpoint instead of from step 0.

Secrets never travel as parameters (the spec and the run's parameters are visible to everyone who can read
the run): hub tokens come from a Kubernetes secret (kubeflow settings' `secret_env`) or the service account.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys

import yaml

from components.common.cli import EXIT_BUG, EXIT_INPUT, input_error_types
from pipelines.kubeflow import submit_kubeflow
from pipelines.params import CHECKPOINT_PARAMS, with_checkpoints
from pipelines.targets import add_target_arguments, checked_inputs, pipeline_template
from pipelines.vertex import submit_vertex
from pipelines.waiting import POLL_SECONDS, RunFailed


def default_run_name(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("vlmtune-%Y%m%d-%H%M%S")


def _cmd_submit(args: argparse.Namespace) -> int:
    try:
        run_name = args.run_name or default_run_name()
        with pipeline_template(args.target, args.template, args.settings, args.registry_prefix, args.image_tag) as template:
            options, params = checked_inputs(args, template)
            params = with_checkpoints(params, options.pipeline_root, run_name)
            if not all(params.get(k) for k in CHECKPOINT_PARAMS):
                print("note: no gs:// --pipeline-root, so no per-run checkpoint URIs: a step retried after a "
                      "preemption restarts from step 0", file=sys.stderr)
            if args.dry_run:
                print(yaml.safe_dump({"target": args.target, "run_name": run_name, "parameters": params}, sort_keys=False))
                return 0
            if args.target == "vertex":
                submit_vertex(template, params, run_name, options, wait=args.wait, poll_s=args.poll_seconds)
            else:
                submit_kubeflow(template, params, run_name, options, wait=args.wait, poll_s=args.poll_seconds)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUG
    except input_error_types() as e:  # SubmitError, and a settings or template file that is wrong
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(p)
    p.add_argument("--run-name", help="run name / Vertex job id (default vlmtune-YYYYMMDD-HHMMSS, UTC)")
    p.add_argument("--wait", action="store_true", help="stream the run's state until it ends; exit 1 unless it succeeded")
    p.add_argument("--poll-seconds", type=float, default=POLL_SECONDS, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="validate and print the parameters; submit nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    """`vlmtune submit ...`: 0 when submitted (and, with --wait, succeeded), 2 on bad input (nothing is sent),
    1 when the run it waited for failed (its logs say why) or on a bug."""
    return _cmd_submit(make_parser().parse_args(argv))
