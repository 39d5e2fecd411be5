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
import contextlib
import datetime as dt
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

TARGETS = ("vertex", "kubeflow")
SOURCE_PARAMS = ("sft_source", "preference_source")
CHECKPOINT_PARAMS = {"sft_checkpoint_uri": "sft", "dpo_checkpoint_uri": "dpo"}
REGISTRY_SCHEMES = ("gs://", "vertex://", "kubeflow://")
#: Pipeline parameter -> (config dataclass, values the component injects), to check config sections up front.
CONFIG_SECTIONS = {
    "prepare_config": ("components.prepare_data.config", "PrepareDataConfig"),
    "sft_config": ("components.sft.config", "SFTStepConfig"),
    "dpo_config": ("components.dpo.config", "DPOStepConfig"),
    "eval_config": ("components.evaluate.config", "EvaluateConfig"),
}
SECRET_WORDS = re.compile(r"(token|secret|password|passwd|api_?key|credential)", re.IGNORECASE)
VERTEX_RUN_NAME = re.compile(r"^[a-z][a-z0-9-]{0,127}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
POLL_SECONDS = 30.0


class SubmitError(ValueError):
    """Bad submission input; the message lists every problem and its fix."""


# ------------------------------------------------------------------------------------------- parameters

def template_parameters(template: str | Path) -> dict[str, dict]:
    """The pipeline's parameters from a compiled spec: name -> {parameterType, defaultValue?, isOptional?}."""
    first = next(yaml.safe_load_all(Path(template).read_text()))
    return dict(first["root"]["inputDefinitions"]["parameters"])


def load_params(params_file: str | None, sets: list[str] | None) -> dict[str, Any]:
    """``--params FILE`` (YAML mapping) merged with ``--set KEY=VALUE`` / ``--set section.field=VALUE``."""
    from components.common.config import parse_overrides

    params: dict[str, Any] = {}
    if params_file:
        try:
            loaded = yaml.safe_load(Path(params_file).read_text()) or {}
        except FileNotFoundError as e:
            raise SubmitError(f"--params {params_file!r}: no such file") from e
        except yaml.YAMLError as e:
            raise SubmitError(f"--params {params_file!r} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise SubmitError(f"--params {params_file!r} must be a mapping of parameter names to values")
        params.update(loaded)
    for key, value in parse_overrides(sets).items():
        section, _, name = key.partition(".")
        if name:
            current = params.get(section) or {}
            if not isinstance(current, dict):
                raise SubmitError(f"--set {key}=...: {section} is not a config section (a mapping)")
            params[section] = {**current, name: value}
        else:
            params[section] = value
    return params


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def check_config_section(name: str, values: dict, params: dict) -> tuple[list[str], dict]:
    """(problems, values typed as the step will read them) for one *_config section, checked with the step's own
    config class, so a typo or a bad value fails here rather than after the GPU is up. Typing matters because
    `--set sft_config.learning_rate=2e-4` arrives as the string '2e-4' (YAML 1.1)."""
    import dataclasses
    import importlib

    from components.common.config import ConfigError, build_config

    module_name, class_name = CONFIG_SECTIONS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    injected = {"prepare_config": {"task": "sft", "processor": params.get("base_model") or None},
                "sft_config": {"base_model": params.get("base_model")},
                "dpo_config": {}, "eval_config": {}}[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        return [f"{name}: unknown fields {unknown}; {class_name} has: {', '.join(sorted(known))}"], values
    try:
        config = build_config(cls, {**values, **{k: v for k, v in injected.items() if k in known}})
    except ConfigError as e:
        lines = [line.strip().lstrip("- ") for line in str(e).splitlines() if line.strip()]
        return [f"{name}: {line}" for line in lines if not line.endswith(":")] or [f"{name}: {e}"], values
    except OSError:  # a check that needs the machine the step runs on: let the step decide
        return [], values
    typed = {k: getattr(config, k) for k in values}
    plain = all(isinstance(v, (str, int, float, bool, list, dict, type(None))) for v in typed.values())
    return [], typed if plain else values


def validate_params(params: dict[str, Any], spec_params: dict[str, dict], target: str, *,
                    check_configs: bool = True, scheduled: bool = False) -> dict[str, Any]:
    """Check ``params`` against the pipeline's parameters and the target's rules; all problems in one error.
    Returns the parameters with config sections typed."""
    problems: list[str] = []
    typed = dict(params)
    unknown = sorted(set(params) - set(spec_params))
    if unknown:
        problems.append(f"unknown parameters {unknown}; the pipeline takes: {', '.join(sorted(spec_params))}")
    for name, spec in spec_params.items():
        if name not in params and not spec.get("isOptional") and "defaultValue" not in spec:
            problems.append(f"{name}: required (put it in --params FILE or pass --set {name}=...)")
    for name, value in params.items():
        if name not in spec_params:
            continue
        kind = spec_params[name].get("parameterType")
        if kind == "STRING" and not isinstance(value, str):
            problems.append(f"{name}: expected a string, got {type(value).__name__} {value!r}")
        elif kind == "STRUCT":
            if not isinstance(value, dict):
                problems.append(f"{name}: expected a mapping of config fields, got {type(value).__name__}")
                continue
            secretive = sorted(k for k in value if SECRET_WORDS.search(k))
            if secretive:
                problems.append(f"{name}: {secretive} look like secrets; pipeline parameters are readable by anyone "
                                f"who can see the run. Use a Kubernetes secret (kubeflow settings' secret_env) or the "
                                f"service account instead")
            elif check_configs and name in CONFIG_SECTIONS:
                found, typed[name] = check_config_section(name, value, params)
                problems += found
    for name in (*SOURCE_PARAMS, "registry", "base_model"):
        value = params.get(name)
        if not isinstance(value, str) or not value:
            continue
        if name == "registry":
            if not value.startswith(REGISTRY_SCHEMES):
                problems.append(f"registry: {value!r} is on this machine, which the pipeline's steps cannot see; use a "
                                f"gs://BUCKET/registry folder or vertex://projects/P/locations/L (or kubeflow://HOST:PORT)")
        elif name == "base_model":
            if value.startswith(("/", "./", "../", "file://")):
                problems.append(f"base_model: {value!r} is a local path; upload the model folder to gs:// or name a hub id")
        elif target == "vertex" and not value.startswith("gs://"):
            problems.append(f"{name}: {value!r} must be a gs:// URI on Vertex AI (steps run on Google's machines); "
                            f"upload it with `gcloud storage cp -r DIR gs://BUCKET/data/`")
        elif _is_local(value):
            problems.append(f"{name}: {value!r} is a local path the cluster cannot see; use a gs:// URI")
        elif not value.startswith("gs://"):
            problems.append(f"{name}: {value!r}: steps read sources from gs:// (or a local path), not other schemes")
    if scheduled:
        fixed = [k for k in CHECKPOINT_PARAMS if params.get(k)]
        if fixed:
            problems.append(f"{fixed}: a schedule sends the same parameters to every run, so a fixed checkpoint URI "
                            f"would make each run resume the previous one; leave them out of scheduled runs")
    if problems:
        raise SubmitError("invalid pipeline parameters:\n  " + "\n  ".join(problems))
    return typed


def default_run_name(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("vlmtune-%Y%m%d-%H%M%S")


def with_checkpoints(params: dict[str, Any], pipeline_root: str | None, run_name: str) -> dict[str, Any]:
    """Per-run checkpoint URIs under the pipeline root (gs:// only: a pod's local disk does not survive the
    preemption the checkpoint is for). Values the user set are kept."""
    out = dict(params)
    if pipeline_root and pipeline_root.startswith("gs://"):
        for name, stage in CHECKPOINT_PARAMS.items():
            if not out.get(name):
                out[name] = f"{pipeline_root.rstrip('/')}/checkpoints/{run_name}/{stage}"
    return out


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    labels, problems = {}, []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            problems.append(f"--label {pair!r}: expected KEY=VALUE")
        elif not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
            problems.append(f"--label {pair!r}: keys start with a lowercase letter; keys and values hold only "
                            f"lowercase letters, digits, '_' and '-', at most 63 characters")
        else:
            labels[key] = value
    if problems:
        raise SubmitError("invalid labels:\n  " + "\n  ".join(problems))
    return labels


# ------------------------------------------------------------------------------------------- templates

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


# ------------------------------------------------------------------------------------------- waiting

def stream_state(get_state: Callable[[], str], terminal: set[str], *, poll_s: float = POLL_SECONDS,
                 out=None, sleep: Callable[[float], None] = time.sleep) -> str:
    """Print each state change until a terminal state; return it."""
    out = out or sys.stdout
    last = None
    while True:
        state = get_state()
        if state != last:
            print(f"{dt.datetime.now(dt.timezone.utc):%H:%M:%S} state: {state}", file=out, flush=True)
            last = state
        if state in terminal:
            return state
        sleep(poll_s)


# ------------------------------------------------------------------------------------------- Vertex AI

VERTEX_SUCCESS = "PIPELINE_STATE_SUCCEEDED"
VERTEX_TERMINAL = {"PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED"}


@dataclass
class VertexOptions:
    project: str
    region: str
    pipeline_root: str
    service_account: str | None = None
    network: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    experiment: str | None = None
    enable_caching: bool | None = None
    credentials: Any = None  # google.auth credentials; None: application default credentials

    def problems(self) -> list[str]:
        out = []
        if not self.project:
            out.append("--project: required for Vertex AI")
        if not self.region:
            out.append("--region: required for Vertex AI (e.g. us-central1)")
        if not (self.pipeline_root or "").startswith("gs://"):
            out.append(f"--pipeline-root: {self.pipeline_root!r} must be a gs:// URI on Vertex AI")
        if self.service_account and "@" not in self.service_account:
            out.append(f"--service-account: {self.service_account!r} is not an email (NAME@PROJECT.iam.gserviceaccount.com)")
        if self.network and not re.match(r"^projects/[^/]+/global/networks/[^/]+$", self.network):
            out.append(f"--network: {self.network!r} must look like projects/PROJECT_NUMBER/global/networks/NAME")
        return out


def vertex_job(template: Path, params: dict, run_name: str, options: VertexOptions, *, job_id: str | None = None):
    """An unsubmitted ``aiplatform.PipelineJob`` (aiplatform checks the parameters against the spec offline)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJob(
        display_name=run_name, template_path=str(template), job_id=job_id, pipeline_root=options.pipeline_root,
        parameter_values=params, enable_caching=options.enable_caching, labels=options.labels or None,
        project=options.project, location=options.region, credentials=options.credentials,
    )


def submit_vertex(template: Path, params: dict, run_name: str, options: VertexOptions, *, wait: bool = False,
                  poll_s: float = POLL_SECONDS, out=None):
    if not VERTEX_RUN_NAME.match(run_name):
        raise SubmitError(f"--run-name {run_name!r}: Vertex job ids are lowercase letters, digits and '-', starting with a letter")
    out = out or sys.stdout
    job = vertex_job(template, params, run_name, options, job_id=run_name)
    job.submit(service_account=options.service_account, network=options.network, experiment=options.experiment)
    print(f"submitted Vertex AI pipeline job {job.resource_name}", file=out)
    if wait:
        state = stream_state(lambda: job.state.name, VERTEX_TERMINAL, poll_s=poll_s, out=out)
        if state != VERTEX_SUCCESS:
            raise RunFailed(f"pipeline job {job.resource_name} ended {state}")
    return job


# ------------------------------------------------------------------------------------------- Kubeflow

KFP_SUCCESS = "SUCCEEDED"
KFP_TERMINAL = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED"}


@dataclass
class KubeflowOptions:
    host: str | None
    namespace: str | None = None
    experiment: str = "vlmtune"
    pipeline_root: str | None = None
    service_account: str | None = None
    enable_caching: bool | None = None
    existing_token: str | None = None  # never printed; from $KFP_TOKEN, not a flag

    def problems(self) -> list[str]:
        out = []
        if not self.host:
            out.append("--host: required for Kubeflow (e.g. http://localhost:8080 after "
                       "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`), or set KF_PIPELINES_ENDPOINT")
        if self.pipeline_root and _is_local(self.pipeline_root):
            out.append(f"--pipeline-root: {self.pipeline_root!r} is a local path; use gs:// (or minio:// / s3://)")
        return out

    def client(self):
        import kfp

        # A namespace also spares the constructor its /healthz call (PITFALLS).
        return kfp.Client(host=self.host, namespace=self.namespace or "kubeflow", existing_token=self.existing_token)


def submit_kubeflow(template: Path, params: dict, run_name: str, options: KubeflowOptions, *, wait: bool = False,
                    poll_s: float = POLL_SECONDS, client=None, out=None):
    out = out or sys.stdout
    client = client or options.client()
    result = client.create_run_from_pipeline_package(
        str(template), arguments=params, run_name=run_name, experiment_name=options.experiment,
        namespace=options.namespace, pipeline_root=options.pipeline_root, enable_caching=options.enable_caching,
        service_account=options.service_account,
    )
    print(f"submitted Kubeflow run {result.run_id} ({run_name}) in experiment {options.experiment!r}", file=out)
    if wait:
        state = stream_state(lambda: str(client.get_run(result.run_id).state), KFP_TERMINAL, poll_s=poll_s, out=out)
        if state != KFP_SUCCESS:
            raise RunFailed(f"Kubeflow run {result.run_id} ended {state}")
    return result


class RunFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- CLI

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
    import os

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
        options = KubeflowOptions(host=args.host or os.environ.get("KF_PIPELINES_ENDPOINT"), namespace=args.namespace,
                                  experiment=args.experiment or "vlmtune", pipeline_root=args.pipeline_root,
                                  service_account=args.service_account, enable_caching=args.enable_caching,
                                  existing_token=os.environ.get("KFP_TOKEN") or None)
    problems = options.problems() + [p.strip() for p in label_problems]
    if problems:
        raise SubmitError(f"invalid {args.target} options:\n  " + "\n  ".join(problems))
    return options


def checked_inputs(args: argparse.Namespace, template: Path, *, scheduled: bool = False):
    """(options, params) for the target, with the problems of both reported in one error."""
    errors, options, params = [], None, {}
    try:
        options = target_options(args)
    except SubmitError as e:
        errors.append(str(e))
    try:
        params = validate_params(load_params(args.params, args.set), template_parameters(template), args.target,
                                 scheduled=scheduled)
    except SubmitError as e:
        errors.append(str(e))
    if errors:
        raise SubmitError("\n".join(errors))
    return options, params


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
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="Run the pipeline on Vertex AI Pipelines or Kubeflow Pipelines.",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(p)
    p.add_argument("--run-name", help="run name / Vertex job id (default vlmtune-YYYYMMDD-HHMMSS, UTC)")
    p.add_argument("--wait", action="store_true", help="stream the run's state until it ends; exit 1 unless it succeeded")
    p.add_argument("--poll-seconds", type=float, default=POLL_SECONDS, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="validate and print the parameters; submit nothing")
    p.set_defaults(func=_cmd_submit)
