"""Compiled pipeline specs, per target, against reviewed golden files (tests/pipelines/golden/<target>.yaml).

When the pipeline, a component interface or a shipped settings file (pipelines/configs/<target>.yaml, whose keys
tests/pipelines/test_configs.py checks) changes, the golden test fails with a diff; review it, then regenerate:

    VLMTUNE_UPDATE_GOLDEN=1 pytest tests/pipelines/test_compile.py      # or: python -m tests.pipelines.test_compile --update-golden

Normalised away before comparing: the kfp SDK version (``sdkVersion``) and the component function sources that
kfp embeds in every executor's command (they change with every edit of a component body, which is reviewed in
that file; the interface they implement stays in the golden file as inputDefinitions/outputDefinitions).
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

GOLDEN = Path(__file__).parent / "golden"
UPDATE_ENV = "VLMTUNE_UPDATE_GOLDEN"
GPU_EXECUTORS = {"exec-sft", "exec-dpo", "exec-evaluate"}
CPU_EXECUTORS = {"exec-prepare-data", "exec-prepare-data-2", "exec-register"}
FUNCTION_RE = re.compile(r"^def (\w+)\(", re.MULTILINE)


def compile_docs(target: str, tmp: Path) -> list[dict]:
    from pipelines.compile import compile_pipeline

    path = compile_pipeline(target, tmp / f"{target}.yaml")
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def normalise(docs: list[dict]) -> list[dict]:
    docs = copy.deepcopy(docs)
    spec = docs[0]
    spec["sdkVersion"] = "kfp-<version>"
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor.get("container", {})
        command = container.get("command", [])
        for i, part in enumerate(command):
            names = FUNCTION_RE.findall(part) if isinstance(part, str) else []
            if names and "import kfp" in part:
                command[i] = f"<source of component function {names[-1]}>"
    return docs


def _dump(docs: list[dict]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=True, width=120) for d in docs)


def write_golden(target: str, tmp: Path) -> Path:
    GOLDEN.mkdir(exist_ok=True)
    path = GOLDEN / f"{target}.yaml"
    header = (f"# Golden {target} spec, normalised (see tests/pipelines/test_compile.py). Regenerate after reviewing the diff:\n"
              f"#   {UPDATE_ENV}=1 pytest tests/pipelines/test_compile.py\n")
    path.write_text(header + _dump(normalise(compile_docs(target, tmp))))
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("specs")
    return {target: compile_docs(target, tmp) for target in ("vertex", "kubeflow")}


@pytest.mark.parametrize("target", ["vertex", "kubeflow"])
def test_compiled_spec_matches_golden(target, compiled, tmp_path):
    if os.environ.get(UPDATE_ENV):
        write_golden(target, tmp_path)
    golden_path = GOLDEN / f"{target}.yaml"
    assert golden_path.exists(), f"no golden file; create it with {UPDATE_ENV}=1 pytest tests/pipelines/test_compile.py"
    golden = [d for d in yaml.safe_load_all(golden_path.read_text()) if d is not None]
    actual = normalise(compiled[target])
    if actual != golden:
        diff = "".join(difflib.unified_diff(_dump(golden).splitlines(True), _dump(actual).splitlines(True),
                                            f"golden/{target}.yaml", f"compiled {target}", n=2))
        pytest.fail(f"the compiled {target} spec differs from tests/pipelines/golden/{target}.yaml; review, then run "
                    f"{UPDATE_ENV}=1 pytest tests/pipelines/test_compile.py\n{diff[:6000]}")


def test_normalisation_keeps_everything_but_volatile_fields(compiled):
    docs = normalise(compiled["kubeflow"])
    assert docs[0]["sdkVersion"] == "kfp-<version>"
    commands = [e["container"]["command"] for e in docs[0]["deploymentSpec"]["executors"].values()]
    assert {c[-1] for c in commands} == {f"<source of component function {f}>"
                                         for f in ("prepare_data", "sft", "dpo", "evaluate", "register")}
    # The raw spec still embeds each function, importing its step's core.
    raw = compiled["kubeflow"][0]["deploymentSpec"]["executors"]
    assert re.search(r"from components\.sft\.core import .*\brun\b", raw["exec-sft"]["container"]["command"][-1])


@pytest.mark.parametrize("target", ["vertex", "kubeflow"])
def test_specs_parse_as_pipeline_spec_protos(target, compiled):
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    docs = compiled[target]
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "vlmtune"
    assert set(spec.root.input_definitions.parameters) >= {"sft_source", "preference_source", "base_model", "registry",
                                                          "sft_checkpoint_uri", "dpo_checkpoint_uri"}
    if target == "vertex":
        assert len(docs) == 1, "Vertex AI takes a single-document spec"
    else:
        from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2

        assert len(docs) == 2, "Kubeflow: pipeline spec + kfp-kubernetes platform spec"
        platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
        executors = json_format.MessageToDict(platform.platforms["kubernetes"])["deploymentSpec"]["executors"]
        for name, config in executors.items():
            json_format.ParseDict(config, k8s_pb2.KubernetesExecutorConfig())


def _resources(docs: list[dict]) -> dict[str, dict]:
    return {name: e["container"].get("resources", {}) for name, e in docs[0]["deploymentSpec"]["executors"].items()}


def test_vertex_spec_names_vertex_accelerators_and_no_kubernetes(compiled):
    resources = _resources(compiled["vertex"])
    for name in GPU_EXECUTORS:
        assert resources[name]["accelerator"]["resourceType"] == "NVIDIA_L4", name
        assert resources[name]["accelerator"]["resourceCount"] == "1"
    for name in CPU_EXECUTORS:
        assert "accelerator" not in resources[name], name
    assert "platforms" not in yaml.safe_dump(compiled["vertex"])
    images = {e["container"]["image"] for e in compiled["vertex"][0]["deploymentSpec"]["executors"].values()}
    assert images == {"us-central1-docker.pkg.dev/YOUR_PROJECT/vlmtune/vlmtune-cuda:0.1.0",
                      "us-central1-docker.pkg.dev/YOUR_PROJECT/vlmtune/vlmtune-cpu:0.1.0"}
    tasks = compiled["vertex"][0]["root"]["dag"]["tasks"]
    assert tasks["sft"]["retryPolicy"]["maxRetryCount"] == 3
    assert tasks["sft"]["cachingOptions"]["enableCache"] is True


def test_vertex_spec_loads_into_pipeline_job_offline(compiled, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform

    path = tmp_path / "vertex.yaml"
    path.write_text(yaml.safe_dump(compiled["vertex"][0]))
    params = {"sft_source": "gs://b/data/sft", "preference_source": "gs://b/data/pref", "base_model": "gs://b/models/base",
              "registry": "gs://b/registry", "sft_config": {"learning_rate": 1e-4}}
    job = aiplatform.PipelineJob(display_name="golden", template_path=str(path), pipeline_root="gs://b/root",
                                 parameter_values=params, project="my-project", location="us-central1",
                                 credentials=AnonymousCredentials())
    runtime = job._gca_resource.runtime_config
    assert runtime.gcs_output_directory == "gs://b/root"
    assert runtime.parameter_values["sft_source"] == "gs://b/data/sft"
    assert dict(runtime.parameter_values["sft_config"]) == {"learning_rate": 1e-4}
    with pytest.raises(ValueError):  # aiplatform checks parameter names against the spec, offline
        aiplatform.PipelineJob(display_name="golden", template_path=str(path), pipeline_root="gs://b/root",
                               parameter_values={**params, "nope": 1}, project="my-project", location="us-central1",
                               credentials=AnonymousCredentials())


def test_kubeflow_spec_carries_gpu_settings(compiled):
    docs = compiled["kubeflow"]
    resources = _resources(docs)
    for name in GPU_EXECUTORS:
        assert resources[name]["accelerator"]["resourceType"] == "nvidia.com/gpu", name
        assert resources[name]["accelerator"]["resourceCount"] == "1"
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for name in GPU_EXECUTORS:
        assert executors[name]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert executors[name]["tolerations"] == [toleration]
    for name in CPU_EXECUTORS:
        assert "nodeSelector" not in executors.get(name, {}) and "tolerations" not in executors.get(name, {}), name
    # The hub token: secret name and key only, for every step but register.
    for name in GPU_EXECUTORS | {"exec-prepare-data", "exec-prepare-data-2"}:
        (secret,) = executors[name]["secretAsEnv"]
        assert secret["secretName"] == "vlmtune-hub-token" and secret["optional"] is True
        assert secret["keyToEnv"] == [{"secretKey": "HF_TOKEN", "envVar": "HF_TOKEN"}]
    assert "secretAsEnv" not in executors.get("exec-register", {})
    assert "hf_" not in yaml.safe_dump(docs)


def _settings_file(tmp_path: Path, target: str, extra: dict) -> str:
    values = yaml.safe_load((Path(__file__).resolve().parents[2] / "pipelines" / "configs" / f"{target}.yaml").read_text())
    values.update(extra)
    path = tmp_path / f"{target}-settings.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_vertex_refuses_kubernetes_settings(tmp_path):
    from pipelines.compile import compile_pipeline, target_settings

    with pytest.raises(ValueError, match="Kubeflow-only"):
        target_settings("vertex", _settings_file(tmp_path, "vertex", {"kubernetes": {"gpu_node_selector": {"a": "b"}}}))
    kubeflow = target_settings("kubeflow")
    with pytest.raises(ValueError, match="single-document"):
        compile_pipeline("vertex", tmp_path / "v.yaml", kubeflow)


def test_accelerator_names_checked_per_target(tmp_path):
    from pipelines.compile import target_settings

    gpu = {"sft": {"accelerator_type": "nvidia.com/gpu", "accelerator_count": 1}}
    with pytest.raises(ValueError, match="NVIDIA_L4"):
        target_settings("vertex", _settings_file(tmp_path, "vertex", {"resources": gpu}))
    with pytest.raises(ValueError, match="nvidia.com/gpu"):
        target_settings("kubeflow", _settings_file(tmp_path, "kubeflow", {"resources": {
            "sft": {"accelerator_type": "NVIDIA_L4", "accelerator_count": 1}}}))


def test_kubernetes_settings_report_every_problem():
    from pipelines.compile import KubernetesSettings

    with pytest.raises(ValueError) as e:
        KubernetesSettings.from_dict({
            "gpu_node_selector": {"pool": 1},
            "gpu_tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe", "effect": "NoSchedule"}],
            "secret_env": [{"secret": "hf-token", "env": "HF_TOKEN", "steps": ["train"]}, {"secret": "s", "key": "k", "env": "E", "value": "hf_x"}],
            "colour": "blue",
        })
    message = str(e.value)
    for expected in ("kubernetes.colour: unknown setting", "gpu_node_selector: must map label keys to string values",
                     "gpu_tolerations[0].operator: 'Maybe'", "secret_env[0].key: required",
                     "secret_env[0].steps: unknown steps ['train']", "secret_env[1]: name the secret, never its value"):
        assert expected in message, (expected, message)


def test_compile_cli_writes_each_target(tmp_path):
    from pipelines.cli import main

    assert main(["compile", "--target", "kubeflow", "--output", str(tmp_path / "k.yaml"), "--image-tag", "9.9.9"]) == 0
    docs = list(yaml.safe_load_all((tmp_path / "k.yaml").read_text()))
    assert len(docs) == 2
    images = {e["container"]["image"] for e in docs[0]["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/YOUR_ORG/vlmtune/vlmtune-cuda:9.9.9", "ghcr.io/YOUR_ORG/vlmtune/vlmtune-cpu:9.9.9"}


if __name__ == "__main__":  # python -m tests.pipelines.test_compile --update-golden
    import tempfile

    if "--update-golden" not in sys.argv[1:]:
        sys.exit("usage: python -m tests.pipelines.test_compile --update-golden")
    with tempfile.TemporaryDirectory() as tmp:
        for target in ("vertex", "kubeflow"):
            print(f"wrote {write_golden(target, Path(tmp))}")


@pytest.mark.parametrize("target", ["vertex", "kubeflow"])
def test_only_the_training_steps_get_the_targets_launch_settings(target, tmp_path):
    """Multi-node sft/dpo learn their engine from $VLMTUNE_LAUNCH, which compile sets from the target's `launch:`."""
    import json

    from components.common.launch import LAUNCH_ENV, LaunchSettings

    (spec, *_) = compile_docs(target, tmp_path)
    launch = {}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        if LAUNCH_ENV in env:
            launch[name] = LaunchSettings.from_dict(json.loads(env[LAUNCH_ENV]))
    assert sorted(launch) == ["exec-dpo", "exec-sft"]
    for settings in launch.values():
        assert settings.launcher == target
        assert settings.image == executor_image(spec, "exec-sft")
        assert settings.accelerator_type == ("NVIDIA_L4" if target == "vertex" else "nvidia.com/gpu")
        assert settings.problems() == []
    if target == "kubeflow":
        assert launch["exec-sft"].runtime == "vlmtune-torch-distributed"
        assert launch["exec-sft"].hub_token_secret == "vlmtune-hub-token"


def executor_image(spec: dict, name: str) -> str:
    return spec["deploymentSpec"]["executors"][name]["container"]["image"]


def test_a_launch_section_naming_another_engine_is_refused(tmp_path):
    from pipelines.compile import target_settings

    settings = tmp_path / "vertex.yaml"
    settings.write_text("launch: {launcher: kubeflow}\n")
    with pytest.raises(ValueError, match="launch.launcher: 'kubeflow' in the vertex settings; leave it out"):
        target_settings("vertex", str(settings))
    settings.write_text("launch: {machine: x}\n")
    with pytest.raises(ValueError, match=r"unknown settings \['machine'\]"):
        target_settings("vertex", str(settings))
