"""Compile the pipeline once per target, from one reviewed settings file per target.

    vlmtune compile --target vertex   --output vlmtune-vertex.yaml     # pipelines/configs/vertex.yaml
    vlmtune compile --target kubeflow --output vlmtune-kubeflow.yaml   # pipelines/configs/kubeflow.yaml

Why two compilations: Vertex AI takes a single-document spec (`aiplatform.PipelineJob` refuses a second YAML
document), and GPU resources there are named like `NVIDIA_L4`. Kubeflow wants `nvidia.com/gpu` plus the
Kubernetes-only settings that kfp-kubernetes writes into a second document (the platform spec): node
selectors and tolerations for the GPU nodes, and secrets exposed as environment variables (e.g. the hub token
as HF_TOKEN: the spec names the secret and key, never the value).

The Kubeflow settings file may carry a `kubernetes:` section (see pipelines/configs/kubeflow.yaml):

    kubernetes:
      gpu_node_selector: {cloud.google.com/gke-accelerator: nvidia-l4}   # steps that ask for a GPU
      gpu_tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      node_selector: {}                 # every step
      tolerations: []                   # every step
      secret_env:                       # Kubernetes secrets as env vars
        - {secret: hf-token, key: token, env: HF_TOKEN, optional: true, steps: [prepare_data, sft, dpo, evaluate]}
      image_pull_secrets: []            # every step
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines import configs
from pipelines.pipeline import PipelineSettings, build_pipeline
from pipelines.steps import STEPS

TARGETS = ("vertex", "kubeflow")
GPU_RESOURCE = "nvidia.com/gpu"
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
SECRET_ENV_KEYS = {"secret", "key", "env", "optional", "steps"}


@dataclass
class KubernetesSettings:
    """The Kubeflow-only task settings, applied through kfp-kubernetes (pipeline settings' `task_hook`)."""

    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: list[dict] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    secret_env: list[dict] = field(default_factory=list)
    image_pull_secrets: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: dict, where: str = "kubernetes") -> "KubernetesSettings":
        """Validate everything and report every problem at once."""
        values = dict(values or {})
        problems: list[str] = []
        known = set(cls.__dataclass_fields__)
        for key in sorted(set(values) - known):
            problems.append(f"{where}.{key}: unknown setting; known: {', '.join(sorted(known))}")
        for key in ("gpu_node_selector", "node_selector"):
            selector = values.get(key) or {}
            if not isinstance(selector, dict) or not all(isinstance(v, str) for v in selector.values()):
                problems.append(f"{where}.{key}: must map label keys to string values (quote numbers and booleans)")
        for key in ("gpu_tolerations", "tolerations"):
            for i, tol in enumerate(values.get(key) or []):
                problems += _toleration_problems(tol, f"{where}.{key}[{i}]")
        for i, entry in enumerate(values.get("secret_env") or []):
            problems += _secret_env_problems(entry, f"{where}.secret_env[{i}]")
        pulls = values.get("image_pull_secrets") or []
        if not isinstance(pulls, list) or not all(isinstance(p, str) and p for p in pulls):
            problems.append(f"{where}.image_pull_secrets: must be a list of secret names")
        if problems:
            raise ValueError("invalid Kubernetes settings:\n  " + "\n  ".join(problems))
        return cls(**{k: v for k, v in values.items() if v is not None})

    def apply(self, task, step: str, settings: PipelineSettings) -> None:
        try:
            from kfp import kubernetes
        except ImportError as e:
            raise RuntimeError("the kubeflow target's `kubernetes:` settings need kfp-kubernetes: "
                               "pip install 'vlmtune[kubernetes]' (or kfp-kubernetes)") from e

        res = settings.resources.get(step)
        wants_gpu = bool(res and res.accelerator_count)
        selector = {**self.node_selector, **(self.gpu_node_selector if wants_gpu else {})}
        for label, value in sorted(selector.items()):
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for tol in self.tolerations + (self.gpu_tolerations if wants_gpu else []):
            kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator"), value=tol.get("value"),
                                      effect=tol.get("effect"), toleration_seconds=tol.get("toleration_seconds"))
        for entry in self.secret_env:
            if step in (entry.get("steps") or STEPS):
                kubernetes.use_secret_as_env(task, secret_name=entry["secret"], secret_key_to_env={entry["key"]: entry["env"]},
                                             optional=bool(entry.get("optional", False)))
        if self.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(self.image_pull_secrets))


def _toleration_problems(tol, where: str) -> list[str]:
    if not isinstance(tol, dict):
        return [f"{where}: must be a mapping like {{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}}"]
    problems = []
    unknown = set(tol) - {"key", "operator", "value", "effect", "toleration_seconds"}
    if unknown:
        problems.append(f"{where}: unknown fields {sorted(unknown)}")
    if tol.get("operator") not in (None, *TOLERATION_OPERATORS):
        problems.append(f"{where}.operator: {tol['operator']!r} is not one of {TOLERATION_OPERATORS}")
    if tol.get("effect") not in (None, *TOLERATION_EFFECTS):
        problems.append(f"{where}.effect: {tol['effect']!r} is not one of {TOLERATION_EFFECTS}")
    if tol.get("operator") == "Exists" and tol.get("value") is not None:
        problems.append(f"{where}: operator Exists takes no value")
    return problems


def _secret_env_problems(entry, where: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where}: must be a mapping like {{secret: hf-token, key: token, env: HF_TOKEN}}"]
    problems = [f"{where}.{k}: required (the Kubernetes secret's name, its key, and the env var to set)"
                for k in ("secret", "key", "env") if not entry.get(k)]
    unknown = set(entry) - SECRET_ENV_KEYS
    if unknown:
        problems.append(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(SECRET_ENV_KEYS)}")
    bad_steps = set(entry.get("steps") or []) - set(STEPS)
    if bad_steps:
        problems.append(f"{where}.steps: unknown steps {sorted(bad_steps)}; steps are {', '.join(STEPS)}")
    if "value" in entry or "token" in entry:
        problems.append(f"{where}: name the secret, never its value")
    return problems


def target_settings(target: str, settings_file: str | None = None, overrides: dict | None = None) -> PipelineSettings:
    """The pipeline settings of a target from its YAML (default `pipelines/configs/<target>.yaml`). A
    `kubernetes:` section becomes the settings' `task_hook`; it is refused for Vertex."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    text = Path(settings_file).read_text() if settings_file else configs.read_text(f"{target}.yaml")
    values = yaml.safe_load(text) or {}
    values.update(overrides or {})
    kube = values.pop("kubernetes", None)
    launch = values.pop("launch", None) or {}
    if launch.get("launcher", target) != target:
        raise ValueError(f"launch.launcher: {launch['launcher']!r} in the {target} settings; leave it out, compile sets it "
                         f"to the target ({target})")
    if launch:
        from components.common.launch import LaunchSettings

        LaunchSettings.from_dict(launch)  # unknown keys refused now, not when a run reaches sft
    settings = PipelineSettings.from_dict(values)
    settings.launch = {**launch, "launcher": target}
    if target == "vertex":
        if kube:
            raise ValueError("a `kubernetes:` section is Kubeflow-only: Vertex AI takes a single-document spec "
                             "without a Kubernetes platform spec; move it to the kubeflow settings file")
        _check_vertex_accelerators(settings)
    else:
        _check_kubeflow_accelerators(settings)
        if kube:
            k8s = KubernetesSettings.from_dict(kube)
            settings.task_hook = lambda task, step: k8s.apply(task, step, settings)
    return settings


def _check_vertex_accelerators(settings: PipelineSettings) -> None:
    for step, res in settings.resources.items():
        if res.accelerator_type and not res.accelerator_type.replace("_", "").isalnum():
            raise ValueError(f"resources.{step}.accelerator_type: {res.accelerator_type!r} is not a Vertex AI accelerator "
                             f"name; use e.g. NVIDIA_L4, NVIDIA_TESLA_T4, NVIDIA_A100_80GB")


def _check_kubeflow_accelerators(settings: PipelineSettings) -> None:
    for step, res in settings.resources.items():
        if res.accelerator_type and "/" not in res.accelerator_type:
            raise ValueError(f"resources.{step}.accelerator_type: {res.accelerator_type!r} is not a Kubernetes resource "
                             f"name; on Kubeflow use {GPU_RESOURCE}")


def compile_pipeline(target: str, output: str | Path, settings: PipelineSettings | None = None) -> Path:
    from kfp import compiler

    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    settings = settings or target_settings(target)
    if target == "vertex" and settings.task_hook is not None:
        raise ValueError("Vertex AI takes a single-document spec: compile it without a task_hook (no kfp-kubernetes)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), str(output))
    if target == "vertex":
        documents = [d for d in yaml.safe_load_all(output.read_text()) if d is not None]
        if len(documents) != 1:  # aiplatform.PipelineJob would fail later with "expected a single document"
            raise RuntimeError(f"the Vertex spec {output} has {len(documents)} YAML documents, expected 1")
    return output
