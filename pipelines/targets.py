"""What ``vlmtune submit`` and ``vlmtune schedule create`` share: the target's command-line options, the spec to
send, and the options and parameters checked together.

The spec is compiled for the target from pipelines/configs/<target>.yaml (``--settings``, ``--registry-prefix``,
``--image-tag`` as for ``vlmtune compile``), or taken as is with ``--template spec.yaml``.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import yaml

from pipelines.kubeflow import KubeflowOptions
from pipelines.params import SubmitError, parse_labels, resolve_params, template_parameters
from pipelines.vertex import VertexOptions

TARGETS = ("vertex", "kubeflow")


@contextlib.contextmanager
def pipeline_template(target: str, template: str | None = None, settings_file: str | None = None,
                      registry_prefix: str | None = None, image_tag: str | None = None,
                      scheduled: bool = False) -> Iterator[Path]:
    """The spec to submit: ``template`` as given, or compiled for ``target`` into a temporary folder that is
    removed afterwards. ``scheduled`` compiles the retraining variant that skips training on unchanged data."""
    if template:
        path = Path(template)
        if not path.is_file():
            raise SubmitError(f"--template {template!r}: no such file; compile one with `vlmtune compile --target {target}`")
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        if target == "vertex" and len(docs) != 1:
            raise SubmitError(f"--template {template!r} has {len(docs)} YAML documents (a Kubeflow spec?); Vertex AI "
                              f"takes a single-document spec: `vlmtune compile --target vertex`")
        yield path
        return
    from pipelines.compile import compile_pipeline, target_settings

    overrides = {k: v for k, v in {"registry_prefix": registry_prefix, "image_tag": image_tag}.items() if v}
    if scheduled:
        overrides["skip_unchanged_data"] = True
    with tempfile.TemporaryDirectory(prefix="vlmtune-submit-") as tmp:
        yield compile_pipeline(target, Path(tmp) / f"vlmtune-{target}.yaml", target_settings(target, settings_file, overrides))


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `submit` and `schedule create`."""
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--params", help="YAML mapping of pipeline parameters (sft_source, base_model, sft_config, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter (base_model=...) or one config field (sft_config.learning_rate=1e-4); wins over --params")
    p.add_argument("--template", help="a compiled spec to submit (default: compile for --target now)")
    p.add_argument("--settings", help="pipeline settings YAML when compiling (default pipelines/configs/<target>.yaml)")
    p.add_argument("--registry-prefix", help="image registry prefix when compiling")
    p.add_argument("--image-tag", help="image tag when compiling")
    p.add_argument("--pipeline-root", help="gs://BUCKET/pipeline-root: artifacts and checkpoints (Vertex: required)")
    p.add_argument("--service-account", help="Vertex: the runs' service account email; Kubeflow: a Kubernetes service account")
    p.add_argument("--experiment", help="Vertex AI experiment / Kubeflow experiment (Kubeflow default: vlmtune)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--cache", dest="enable_caching", action="store_true", default=None,
                       help="force step caching on (default: as compiled)")
    cache.add_argument("--no-cache", dest="enable_caching", action="store_false", help="re-run every step")
    g = p.add_argument_group("Vertex AI")
    g.add_argument("--project", help="Google Cloud project id")
    g.add_argument("--region", help="e.g. us-central1")
    g.add_argument("--network", help="VPC to peer: projects/PROJECT_NUMBER/global/networks/NAME")
    g.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="job label (repeatable)")
    g = p.add_argument_group("Kubeflow")
    g.add_argument("--host", help="KFP API endpoint (default $KF_PIPELINES_ENDPOINT); a bearer token is read from $KFP_TOKEN")
    g.add_argument("--namespace", help="the Kubeflow profile namespace (multi-user deployments)")


def target_options(args: argparse.Namespace) -> VertexOptions | KubeflowOptions:
    """The target's options from the command line; every problem in one SubmitError."""
    label_problems: list[str] = []
    if args.target == "vertex":
        try:
            labels = parse_labels(args.label)
        except SubmitError as e:
            labels, label_problems = {}, str(e).splitlines()[1:]
        options = VertexOptions(project=args.project, region=args.region, pipeline_root=args.pipeline_root,
                                service_account=args.service_account, network=args.network,
                                labels=labels, experiment=args.experiment, enable_caching=args.enable_caching)
    else:
        ignored = [flag for flag, value in (("--project", args.project), ("--region", args.region),
                                            ("--network", args.network), ("--label", args.label)) if value]
        if ignored:
            raise SubmitError(f"{', '.join(ignored)}: Vertex AI options; Kubeflow runs take --host/--namespace")
        options = KubeflowOptions.from_environment(args.host, args.namespace, experiment=args.experiment or "vlmtune",
                                                   pipeline_root=args.pipeline_root,
                                                   service_account=args.service_account,
                                                   enable_caching=args.enable_caching)
    problems = options.problems() + [p.strip() for p in label_problems]
    if problems:
        raise SubmitError(f"invalid {args.target} options:\n  " + "\n  ".join(problems))
    return options


def checked_inputs(args: argparse.Namespace, template: Path, *, scheduled: bool = False):
    """(options, params) for the target, with the problems of both reported in one error. The parameters go
    through :func:`pipelines.params.resolve_params`, the validation pass `vlmtune run` uses too."""
    errors, options, params = [], None, {}
    try:
        options = target_options(args)
    except SubmitError as e:
        errors.append(str(e))
    try:
        params = resolve_params(template_parameters(template), args.target, params_file=args.params, sets=args.set,
                                scheduled=scheduled)
    except SubmitError as e:
        errors.append(str(e))
    if errors:
        raise SubmitError("\n".join(errors))
    return options, params
