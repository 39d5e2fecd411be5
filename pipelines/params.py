"""The pipeline's run parameters: loaded from ``--params FILE`` and ``--set``, and checked before anything is sent.

Parameters are the pipeline function's own (sft_source, preference_source, base_model, registry,
registry_name, prepare_config, sft_config, dpo_config, eval_config, sft_checkpoint_uri, dpo_checkpoint_uri).
``--set KEY=VALUE`` sets one (``--set sft_config.KEY=VALUE`` one field of a config section); :func:`merge_overrides`
is that rule for both ``vlmtune run`` and ``vlmtune submit``/``schedule``. :func:`validate_params` reports every
problem at once: unknown or missing parameters, wrong types, config fields the steps do not know, secrets, and,
since steps run on remote machines, sources/registry that are local paths (Vertex wants gs:// throughout).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

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
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")


class SubmitError(ValueError):
    """Bad submission input; the message lists every problem and its fix."""


def template_parameters(template: str | Path) -> dict[str, dict]:
    """The pipeline's parameters from a compiled spec: name -> {parameterType, defaultValue?, isOptional?}."""
    first = next(yaml.safe_load_all(Path(template).read_text()))
    return dict(first["root"]["inputDefinitions"]["parameters"])


def merge_overrides(params: dict[str, Any], sets: list[str] | None, *, only_known: bool = False) -> dict[str, Any]:
    """``params`` with ``--set KEY=VALUE`` (a whole parameter) and ``--set section.field=VALUE`` (one field of a
    config section) applied in order. ``only_known``: a whole parameter must already be in ``params`` (``vlmtune
    run`` starts from every parameter's value, so a new name is a typo)."""
    from components.common.config import parse_overrides

    params = dict(params)
    for key, value in parse_overrides(sets).items():
        section, _, name = key.partition(".")
        if name:
            current = params.get(section) or {}
            if not isinstance(current, dict):
                raise SubmitError(f"--set {key}=...: {section} is not a config section (a mapping)")
            params[section] = {**current, name: value}
        elif only_known and section not in params:
            raise SubmitError(f"unknown pipeline parameter {section!r}; known: {', '.join(sorted(params))}")
        else:
            params[section] = value
    return params


def load_params(params_file: str | None, sets: list[str] | None) -> dict[str, Any]:
    """``--params FILE`` (YAML mapping) merged with ``--set KEY=VALUE`` / ``--set section.field=VALUE``."""
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
    return merge_overrides(params, sets)


def is_local(uri: str) -> bool:
    """True for a path on this machine (plain or file://), which a remote step cannot read."""
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
        elif is_local(value):
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
