"""The pipeline's run parameters: gathered from the run's YAML and ``--set``, and checked before any work starts.

Parameters are the pipeline function's own (sft_source, preference_source, base_model, registry,
registry_name, prepare_config, sft_config, dpo_config, eval_config, sft_checkpoint_uri, dpo_checkpoint_uri,
prepare_shards).
``--set KEY=VALUE`` sets one (``--set sft_config.KEY=VALUE`` one field of a config section).

:func:`resolve_params` is the one validation pass of every entry point that starts a pipeline: ``vlmtune run``
and ``vlmtune demo`` (target ``local``), ``vlmtune submit`` and ``vlmtune schedule create`` (``vertex`` /
``kubeflow``). It merges the layers (shipped defaults, the YAML file, then every ``--set`` in order), and
reports every problem at once in one :class:`ParamsError`, each naming its key path and where the value came
from (the file name or ``--set``): unknown parameters and config fields (with a did-you-mean), wrong types,
bad values (each ``*_config`` section is checked by the step's own config class with
``components.common.config.config_problems``, the check the step's CLI and KFP component run too), missing
files, secrets, and the target's location rules (Vertex wants gs:// throughout; a local run wants the local
paths to exist).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from components.common.config import ConfigError, Problem, format_problems, unknown_key_problem

SOURCE_PARAMS = ("sft_source", "preference_source")
CHECKPOINT_PARAMS = {"sft_checkpoint_uri": "sft", "dpo_checkpoint_uri": "dpo"}
REGISTRY_SCHEMES = ("gs://", "vertex://", "kubeflow://")
TARGETS = ("local", "vertex", "kubeflow")
#: Pipeline parameter -> the step config class that reads it, to check config sections up front.
CONFIG_SECTIONS = {
    "prepare_config": ("components.prepare_data.config", "PrepareDataConfig"),
    "sft_config": ("components.sft.config", "SFTStepConfig"),
    "dpo_config": ("components.dpo.config", "DPOStepConfig"),
    "eval_config": ("components.evaluate.config", "EvaluateConfig"),
}
#: Config fields the pipeline sets itself from other parameters: a value in the section would be overridden.
INJECTED_FIELDS = {
    "prepare_config": {"task": "the pipeline prepares sft_source with task sft and preference_source with task preference",
                       "processor": "the pipeline uses base_model's processor; set base_model instead"},
    "sft_config": {"base_model": "the pipeline trains base_model; set the base_model parameter instead"},
}
#: Key names that look like secrets ("tokens" is left out: max_new_tokens counts tokens, it holds none).
SECRET_WORDS = re.compile(r"(token(?!s)|secret|password|passwd|api_?key|credential)", re.IGNORECASE)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


class ParamsError(ValueError):
    """Bad run parameters; the message lists every problem (``.problems``), each with its key and source."""

    def __init__(self, message: str | None = None, problems: Sequence[Problem] | None = None,
                 title: str = "invalid pipeline parameters"):
        self.problems = list(problems or ([Problem("", message)] if message else []))
        super().__init__(message if message and not problems else format_problems(title, self.problems))


#: The name `vlmtune submit`/`schedule` used for it; the same class.
SubmitError = ParamsError


@dataclass
class RunParams:
    """Parameters being gathered: the merged values, where each key path was set, and problems met so far
    (unreadable files, malformed --set)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def layer(self, values: Mapping[str, Any], source: str | None) -> None:
        """A mapping of parameters on top (a config section in it replaces the whole section below)."""
        for key, value in values.items():
            self.values[key] = value
            for path in [p for p in self.sources if p == key or p.startswith(f"{key}.")]:
                del self.sources[path]
            if source:
                self.sources[key] = source

    def set(self, pair: str) -> None:
        """One ``--set KEY=VALUE`` or ``--set section.field=VALUE``; a malformed one becomes a problem."""
        from components.common.config import parse_override

        try:
            key, value = parse_override(pair)
        except ConfigError as e:
            self.problems.append(Problem("", str(e)))
            return
        section, _, name = key.partition(".")
        if name:
            current = self.values.get(section)
            if current is None:
                current = {}
                self.sources[section] = "--set"  # a section only --set names: the --set is where it came from
            if not isinstance(current, dict):
                self.problems.append(Problem(section, f"--set {pair}: {section} is not a config section (a mapping)"))
                return
            self.values[section] = {**current, name: value}
        else:
            self.values[key] = value
        self.sources[key] = "--set"


def read_params_file(path: str, flag: str) -> tuple[dict[str, Any], list[Problem]]:
    """(the file's mapping, problems): a missing file, bad YAML or a non-mapping is a problem naming ``flag``."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        return {}, [Problem("", f"{flag} {path!r}: no such file")]
    except IsADirectoryError:
        return {}, [Problem("", f"{flag} {path!r} is a folder; expected a YAML file of parameters")]
    except yaml.YAMLError as e:
        return {}, [Problem("", f"{flag} {path!r} is not valid YAML: {e}")]
    if loaded is None:
        return {}, []
    if not isinstance(loaded, dict):
        return {}, [Problem("", f"{flag} {path!r} must be a mapping of parameter names to values, "
                                f"not a {type(loaded).__name__}")]
    return loaded, []


def gather_params(layers: Iterable[tuple[Mapping[str, Any], str | None]] = (), params_file: str | None = None,
                  sets: Sequence[str] | None = None, *, flag: str = "--params") -> RunParams:
    """``layers`` ((mapping, source) pairs, e.g. the shipped defaults), then ``params_file``, then each --set."""
    run = RunParams()
    for values, source in layers:
        run.layer(values, source)
    if params_file:
        loaded, problems = read_params_file(params_file, flag)
        run.problems += problems
        run.layer(loaded, params_file)
    for pair in sets or []:
        run.set(pair)
    return run


def resolve_params(spec_params: dict[str, dict], target: str, *, layers: Iterable[tuple[Mapping[str, Any], str | None]] = (),
                   params_file: str | None = None, sets: Sequence[str] | None = None, flag: str = "--params",
                   scheduled: bool = False, will_exist: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The run's parameters, merged and checked: the one validation pass of run, demo, submit and schedule.
    Raises :class:`ParamsError` with every problem. ``will_exist``: parameter -> the local path the caller
    creates before running if the parameter still has that value (the demo's tiny model and data), so that
    value is not checked for existence."""
    run = gather_params(layers, params_file, sets, flag=flag)
    return check_params(run, spec_params, target, scheduled=scheduled, will_exist=will_exist)


def pipeline_parameters(scheduled: bool = False) -> dict[str, dict]:
    """The pipeline's parameters as a compiled spec lists them, straight from the pipeline function (no file)."""
    from google.protobuf import json_format

    from pipelines.pipeline import PipelineSettings, build_pipeline

    pipeline = build_pipeline(PipelineSettings(skip_unchanged_data=scheduled))
    return dict(json_format.MessageToDict(pipeline.pipeline_spec.root.input_definitions)["parameters"])


def template_parameters(template: str | Path) -> dict[str, dict]:
    """The pipeline's parameters from a compiled spec: name -> {parameterType, defaultValue?, isOptional?}."""
    first = next(yaml.safe_load_all(Path(template).read_text()))
    return dict(first["root"]["inputDefinitions"]["parameters"])


def merge_overrides(params: dict[str, Any], sets: list[str] | None, *, only_known: bool = False) -> dict[str, Any]:
    """``params`` with ``--set KEY=VALUE`` (a whole parameter) and ``--set section.field=VALUE`` (one field of a
    config section) applied in order (the rule :class:`RunParams` applies). ``only_known``: a whole parameter
    must already be in ``params``. Raises on the first problem; :func:`resolve_params` reports them all."""
    from components.common.config import parse_overrides

    params = dict(params)
    for key, value in parse_overrides(sets).items():
        section, _, name = key.partition(".")
        if name:
            current = params.get(section) or {}
            if not isinstance(current, dict):
                raise ParamsError(f"--set {key}=...: {section} is not a config section (a mapping)")
            params[section] = {**current, name: value}
        elif only_known and section not in params:
            raise ParamsError(f"unknown pipeline parameter {section!r}; known: {', '.join(sorted(params))}")
        else:
            params[section] = value
    return params


def load_params(params_file: str | None, sets: list[str] | None) -> dict[str, Any]:
    """``--params FILE`` (YAML mapping) merged with ``--set KEY=VALUE`` / ``--set section.field=VALUE``."""
    run = gather_params((), params_file, sets)
    if run.problems:
        raise ParamsError(problems=run.problems)
    return run.values


def is_local(uri: str) -> bool:
    """True for a path on this machine (plain or file://), which a remote step cannot read."""
    return "://" not in uri or uri.startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()


def check_config_section(name: str, values: dict, params: dict) -> tuple[list[Problem], dict]:
    """(problems keyed within the section, values typed as the step will read them) for one *_config section,
    checked with the step's own config class, so a typo or a bad value fails here rather than after the GPU is
    up. Typing matters because `--set sft_config.learning_rate=2e-4` arrives as the string '2e-4' (YAML 1.1)."""
    import dataclasses
    import importlib

    from components.common.config import config_problems

    module_name, class_name = CONFIG_SECTIONS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    injected_by_pipeline = INJECTED_FIELDS.get(name, {})
    problems = [Problem(k, f"{k} is set by the pipeline ({why}); remove it from {name}")
                for k, why in injected_by_pipeline.items() if k in values]
    injected = {"prepare_config": {"task": "sft", "processor": params.get("base_model") or None},
                "sft_config": {"base_model": params.get("base_model") or "base-model"}}.get(name, {})
    known = {f.name for f in dataclasses.fields(cls)}
    found, config = config_problems(cls, {**values, **{k: v for k, v in injected.items() if k in known}})
    problems += found
    if config is None:
        return problems, values
    typed = {k: getattr(config, k) for k in values}
    plain = all(isinstance(v, (str, int, float, bool, list, dict, type(None))) for v in typed.values())
    return problems, typed if plain else values


def _config_fields(section: str) -> set[str]:
    """The fields of the step config a section feeds (none of them holds a secret), or none for other sections."""
    import dataclasses
    import importlib

    if section not in CONFIG_SECTIONS:
        return set()
    module_name, class_name = CONFIG_SECTIONS[section]
    return {f.name for f in dataclasses.fields(getattr(importlib.import_module(module_name), class_name))}


def _location_problems(name: str, value: str, target: str, will_exist: Mapping[str, str]) -> list[str]:
    """What is wrong with where a source, base model or registry lies, for ``target``."""
    if target == "local":
        if will_exist.get(name) == value:
            return []
        if "://" in value and not value.startswith("file://"):
            if name in SOURCE_PARAMS and not value.startswith("gs://"):
                return [f"{value!r}: sources are local paths or gs:// URIs, not other schemes"]
            if name == "registry" and not value.startswith(REGISTRY_SCHEMES):
                return [f"{value!r}: a registry is a folder, gs://BUCKET/PREFIX, vertex://projects/P/locations/L or "
                        f"kubeflow://HOST:PORT"]
            return []
        if name == "registry" or _local_path(value).exists():
            return []  # a local registry folder is created by the first registration
        if name == "base_model" and HUB_ID.match(value) and not value.startswith((".", "~")):
            return []  # a hub id (org/name); the hub is asked when the steps start
        what = "a model folder or a hub id (org/name)" if name == "base_model" else "the source folder or file"
        return [f"{value!r} does not exist; expected {what}"]
    if name == "registry":
        if not value.startswith(REGISTRY_SCHEMES):
            return [f"{value!r} is on this machine, which the pipeline's steps cannot see; use a gs://BUCKET/registry "
                    f"folder or vertex://projects/P/locations/L (or kubeflow://HOST:PORT)"]
        return []
    if name == "base_model":
        if value.startswith(("/", "./", "../", "~", "file://")):
            return [f"{value!r} is a local path; upload the model folder to gs:// or name a hub id"]
        return []
    if target == "vertex" and not value.startswith("gs://"):
        return [f"{value!r} must be a gs:// URI on Vertex AI (steps run on Google's machines); upload it with "
                f"`gcloud storage cp -r DIR gs://BUCKET/data/`"]
    if is_local(value):
        return [f"{value!r} is a local path the cluster cannot see; use a gs:// URI"]
    if not value.startswith("gs://"):
        return [f"{value!r}: steps read sources from gs:// (or a local path), not other schemes"]
    return []


def check_params(run: RunParams, spec_params: dict[str, dict], target: str, *, check_configs: bool = True,
                 scheduled: bool = False, will_exist: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check gathered parameters against the pipeline's parameters and the target's rules; every problem in one
    :class:`ParamsError`, each with its key path and source. Returns the parameters with config sections typed."""
    from components.common.registry.types import NAME_RE

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    params, will_exist = run.values, dict(will_exist or {})
    problems: list[Problem] = list(run.problems)
    typed = dict(params)
    for name in params:
        if name not in spec_params:
            problems.append(unknown_key_problem(name, spec_params, noun="parameter"))
    for name, spec in spec_params.items():
        if name not in params and not spec.get("isOptional") and "defaultValue" not in spec:
            problems.append(Problem(name, f"{name}: required (put it in the parameters file or pass --set {name}=...)"))
    for name, value in params.items():
        if name not in spec_params:
            continue
        kind = spec_params[name].get("parameterType")
        if kind == "STRING" and not isinstance(value, str):
            hint = f" (quote it: '{value}')" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            problems.append(Problem(name, f"expected a string, got {type(value).__name__} {value!r}{hint}"))
        elif kind == "NUMBER_INTEGER" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            # Integer parameters are counts (prepare_shards: data-preparation work items; 1 = one container).
            problems.append(Problem(name, f"expected an integer >= 1, got {type(value).__name__} {value!r}"))
        elif kind == "STRUCT":
            if not isinstance(value, dict):
                problems.append(Problem(name, f"expected a mapping of config fields, got {type(value).__name__} {value!r}"))
                continue
            secretive = sorted(k for k in value if SECRET_WORDS.search(k) and k not in _config_fields(name))
            for key in secretive:
                problems.append(Problem(f"{name}.{key}", "looks like a secret; pipeline parameters are readable by "
                                                         "anyone who can see the run. Use a Kubernetes secret (kubeflow "
                                                         "settings' secret_env) or the service account instead"))
            if check_configs and name in CONFIG_SECTIONS:
                rest = {k: v for k, v in value.items() if k not in secretive}
                found, typed[name] = check_config_section(name, rest, params)
                problems += [p.within(name) for p in found]
    for name in (*SOURCE_PARAMS, "registry", "base_model"):
        value = params.get(name)
        if isinstance(value, str) and value:
            problems += [Problem(name, message) for message in _location_problems(name, value, target, will_exist)]
    registry_name = params.get("registry_name")
    if isinstance(registry_name, str) and not NAME_RE.match(registry_name):
        problems.append(Problem("registry_name", f"{registry_name!r} is not a model name: letters, digits, '.', '_' "
                                                 f"and '-', starting with a letter or digit, at most 128 characters"))
    if scheduled:
        fixed = [k for k in CHECKPOINT_PARAMS if params.get(k)]
        if fixed:
            problems.append(Problem("", f"{fixed}: a schedule sends the same parameters to every run, so a fixed "
                                        f"checkpoint URI would make each run resume the previous one; leave them out "
                                        f"of scheduled runs"))
    problems = [p.sourced(run.sources) for p in problems]
    if problems:
        raise ParamsError(problems=problems)
    return typed


def validate_params(params: dict[str, Any], spec_params: dict[str, dict], target: str, *,
                    check_configs: bool = True, scheduled: bool = False) -> dict[str, Any]:
    """:func:`check_params` for parameters already merged (no sources to name)."""
    return check_params(RunParams(values=dict(params)), spec_params, target, check_configs=check_configs,
                        scheduled=scheduled)


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
