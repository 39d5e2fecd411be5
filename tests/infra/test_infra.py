"""Images and infrastructure, checked without a container engine or a cloud: image names (pipelines/images.py) and
container command lines (pipelines/containers.py, pipelines/container_cli.py), the image pins, hadolint over every Dockerfile, checkov over infra/ and docker/,
the Terraform variables/outputs, and the kustomize overlay rendered by `kubectl kustomize` where kubectl exists.

hadolint and checkov come from requirements-lint.txt, installed in a venv of their own (checkov's pins clash with
the project's): put its bin/ on PATH or set VLMTUNE_LINT_BIN; the lint tests skip, saying so, when they are missing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipelines import container_cli, containers, images

REPO = Path(__file__).resolve().parents[2]
TERRAFORM = REPO / "infra/terraform/gcp"
KUBEFLOW = REPO / "infra/kubeflow"
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))


def _lint_tool(name: str) -> str:
    """Path of hadolint/checkov: $VLMTUNE_LINT_BIN/NAME, else NAME on PATH; skip the test when neither exists."""
    lint_bin = os.environ.get("VLMTUNE_LINT_BIN")
    if lint_bin and (Path(lint_bin) / name).exists():
        return str(Path(lint_bin) / name)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed: python3 -m venv /opt/vlmtune-lint && /opt/vlmtune-lint/bin/pip install "
                    f"-r requirements-lint.txt, then VLMTUNE_LINT_BIN=/opt/vlmtune-lint/bin")
    return found


# --------------------------------------------------------------------------------------------------- image names


def test_each_step_maps_to_its_image_kind():
    prefix = "us-central1-docker.pkg.dev/p/vlmtune-images"
    assert {step: images.image_for(step, prefix, "0.1.0") for step in images.STEP_IMAGE_KIND} == {
        "prepare_data": f"{prefix}/vlmtune-cpu:0.1.0",
        "sft": f"{prefix}/vlmtune-cuda:0.1.0",
        "dpo": f"{prefix}/vlmtune-cuda:0.1.0",
        "evaluate": f"{prefix}/vlmtune-cuda:0.1.0",
        "register": f"{prefix}/vlmtune-cpu:0.1.0",
    }
    assert images.image_for("prepare-data", "localhost/", "t") == "localhost/vlmtune-cpu:t"
    assert images.image_for("sft", "", "t", gpu=False) == "vlmtune-cpu:t"
    with pytest.raises(ValueError, match="unknown step 'train'"):
        images.image_for("train", "x", "t")


def test_every_image_kind_has_a_dockerfile():
    assert {p.name for p in DOCKERFILES} >= {Path(f).name for f in containers.DOCKERFILES.values()}
    assert set(images.STEP_IMAGE_KIND.values()) <= set(containers.DOCKERFILES)


# --------------------------------------------------------------------------------------------------- run a step


def test_step_command_mounts_local_paths_at_the_same_place_and_passes_env(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    creds = tmp_path.parent / f"{tmp_path.name}-key.json"
    creds.write_text("{}")
    monkeypatch.chdir(tmp_path)
    env = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443", "GOOGLE_APPLICATION_CREDENTIALS": str(creds),
           "HF_TOKEN": "secret-value", "UNRELATED": "x"}
    cmd = containers.run_step_command(
        "prepare_data", ["--source", "./src", f"--output={tmp_path}/out/ds", "--config", "gs://b/c.yaml", "--num-workers", "2"],
        "img:1", "podman", env=env, user="1000:1000")
    assert cmd[:2] == ["podman", "run"]
    assert cmd[cmd.index("img:1") + 1:] == [
        "prepare-data", "--source", f"{tmp_path}/src", f"--output={tmp_path}/out/ds", "--config", "gs://b/c.yaml",
        "--num-workers", "2"]
    volumes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-v"]
    # src and the not-yet-existing output both live under tmp_path: one mount covers them.
    assert volumes == [f"{tmp_path}:{tmp_path}", f"{creds}:{creds}:ro"]
    passed = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-e"]
    assert passed == ["STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN"]
    assert "secret-value" not in " ".join(cmd)  # values come from the environment, never the command line
    assert cmd[cmd.index("--network") + 1] == "host"  # the emulator listens on the caller's loopback
    assert cmd[cmd.index("--user") + 1] == "1000:1000"


def test_gpu_flags_per_engine():
    docker = containers.run_step_command("sft", [], "img", "docker", gpus="all", env={}, user="0:0")
    podman = containers.run_step_command("sft", [], "img", "podman", gpus="0,1", env={}, user="0:0")
    assert docker[docker.index("--gpus") + 1] == "all"
    assert [podman[i + 1] for i, a in enumerate(podman) if a == "--device"] == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
    assert docker[docker.index("--shm-size") + 1] == containers.DEFAULT_SHM_SIZE


def test_refuses_to_mount_the_root_folder():
    with pytest.raises(ValueError, match="bind-mount /"):
        containers.run_step_command("register", ["--output", "/nonexistent-top-level"], "img", "docker", env={})


def test_docker_runner_kwargs_are_ones_kfp_accepts(tmp_path):
    from kfp.local.config import DockerRunner

    kwargs = containers.docker_runner_kwargs(gpus="all", mounts=[tmp_path / "data", tmp_path],
                                             env={"STORAGE_EMULATOR_HOST": "http://localhost:9023"})
    assert set(kwargs) <= DockerRunner.DOCKER_CONTAINER_RUN_ARGS - {"image", "command", "volumes"}
    assert kwargs["device_requests"] == [{"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}]
    assert kwargs["shm_size"] == containers.DEFAULT_SHM_SIZE
    assert kwargs["mounts"] == [{"Target": str(tmp_path), "Source": str(tmp_path), "Type": "bind", "ReadOnly": False}]
    assert kwargs["environment"] == {"STORAGE_EMULATOR_HOST": "http://localhost:9023"}
    assert kwargs["network_mode"] == "host"
    assert kwargs["entrypoint"] == ["/usr/bin/env"]
    assert "device_requests" not in containers.docker_runner_kwargs(env={})


# --------------------------------------------------------------------------------------------------- CLI




def test_cli_step_docker_dry_run_prints_the_container_command(tmp_path, capsys):
    assert container_cli.step_main(["prepare-data", "--docker", "--engine", "podman", "--image", "img:t",
                                    "--dry-run", "--", "--source", str(tmp_path), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().err
    assert f"img:t prepare-data --source {tmp_path} --output {tmp_path}/out" in printed
    assert f"-v {tmp_path}:{tmp_path}" in printed
    # Options before NAME work too; without `--`, unknown options belong to the step.
    assert container_cli.step_main(["--dry-run", "--docker", "sft", "--engine", "docker", "--image", "i",
                                    "--gpus", "all", "--epochs", "3"]) == 0
    printed = capsys.readouterr().err
    assert "--gpus all" in printed and printed.rstrip().endswith("i sft --epochs 3")


def test_cli_images_build_and_push_dry_run(capsys):
    assert container_cli.images_main(["build", "--kind", "cpu", "--engine", "docker", "--registry-prefix", "r/p",
                                      "--tag", "1.2", "--base-image", "my/base:1", "--build-arg", "TORCH_INDEX_URL=",
                                      "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == ["r/p/vlmtune-cpu:1.2"]
    assert (f"docker build -f {REPO}/docker/Dockerfile.cpu -t r/p/vlmtune-cpu:1.2 --build-arg BASE_IMAGE=my/base:1 "
            f"--build-arg TORCH_INDEX_URL= {REPO}") in out.err
    assert container_cli.images_main(["push", "--engine", "docker", "--registry-prefix", "r/p", "--tag", "1.2",
                                      "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["r/p/vlmtune-cpu:1.2", "r/p/vlmtune-cuda:1.2"]
    with pytest.raises(ValueError, match="pushing needs a registry"):
        container_cli.images_main(["push", "--engine", "docker", "--registry-prefix", "localhost", "--dry-run"])


def test_host_pip_settings_are_carried_into_the_build(monkeypatch, tmp_path):
    wheels, index = tmp_path / "wheels", tmp_path / "pypi" / "simple"
    wheels.mkdir()
    index.mkdir(parents=True)
    cert = tmp_path / "ca.crt"
    cert.write_text("x")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"file://{index} https://mirror.example/simple")
    monkeypatch.setenv("PIP_CERT", str(cert))
    options = containers.host_pip_build_options(containers.BuildOptions(build_args={"TORCH_INDEX_URL": ""}))
    assert options.build_args["PIP_FIND_LINKS"] == str(wheels)
    assert options.build_args["PIP_EXTRA_INDEX_URL"] == f"file://{index} https://mirror.example/simple"
    assert options.build_args["PIP_CERT"] == "/etc/ssl/certs/vlmtune-build-ca.crt"
    assert options.build_args["TORCH_INDEX_URL"] == ""
    assert options.build_volumes == [f"{wheels}:{wheels}:ro", f"{index.parent}:{index.parent}:ro",
                                     f"{cert}:/etc/ssl/certs/vlmtune-build-ca.crt:ro"]
    assert options.network == "host"


# --------------------------------------------------------------------------------------------------- image contents


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (REPO / "docker/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} has no pin in docker/constraints.txt: run docker/lock_constraints.py"
        assert dep.specifier.contains(pins[name], prereleases=True), f"pin {name}=={pins[name]} is outside {dep}"
    assert pins["torch"] == "2.13.0"


def test_dockerfiles_share_the_runtime_contract():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), dockerfile.name
        assert "FROM ${BASE_IMAGE}" in text
        assert re.search(r"^USER 10001", text, re.M)
        assert text.count("pip install --no-cache-dir --no-deps /tmp/build/src") == 1  # the project, once
        assert 'ENTRYPOINT ["vlmtune"]' in text
        for var in ("HF_HOME=/tmp", "XDG_CACHE_HOME=/tmp", "MPLCONFIGDIR=/tmp", "TRITON_CACHE_DIR=/tmp", "HOME=/tmp"):
            assert var in text, f"{dockerfile.name} lacks {var}"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:] and {"!components/", "!pipelines/", "!pyproject.toml"} <= set(ignore)


# --------------------------------------------------------------------------------------------------- linters


def test_hadolint_finds_nothing_in_any_dockerfile():
    hadolint = _lint_tool("hadolint")
    assert DOCKERFILES
    run = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_checkov_passes_infra_and_docker_with_every_skip_explained():
    checkov = _lint_tool("checkov")
    run = subprocess.run(
        [checkov, "-d", "infra", "-d", "docker", "--skip-download", "--output", "json", "--compact"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    # One JSON document per -d folder, each a report or a list of reports (one per framework).
    reports, decoder, text, at = [], json.JSONDecoder(), run.stdout.strip(), 0
    while at < len(text):
        doc, at = decoder.raw_decode(text, at)
        reports += doc if isinstance(doc, list) else [doc]
        at = len(text) - len(text[at:].lstrip())
    assert reports, run.stdout + run.stderr
    by_framework = {r["check_type"]: r for r in reports}
    # Each kind of file is really scanned (a parse failure would otherwise pass as "nothing found").
    assert {"terraform", "kubernetes", "dockerfile"} <= set(by_framework), sorted(by_framework)
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
        assert report["summary"]["passed"] > 0, report["check_type"]
        failed = report["results"]["failed_checks"]
        # Without a Prisma API key checkov gives no severities, so no failure at all is allowed (only explicit skips).
        assert not failed, [(c["check_id"], c["resource"], c.get("severity")) for c in failed]
        for skipped in report["results"]["skipped_checks"]:
            reason = skipped.get("suppress_comment") or skipped.get("check_result", {}).get("suppress_comment") or ""
            assert len(reason.strip()) > 15 and "No comment" not in reason, (skipped["check_id"], skipped["resource"])


# --------------------------------------------------------------------------------------------------- terraform


def _blocks(kind: str) -> dict[str, str]:
    text = "\n".join(p.read_text() for p in TERRAFORM.glob("*.tf"))
    return dict(re.findall(rf'^{kind} "([a-z0-9_]+)" \{{(.*?)^\}}', text, re.M | re.S))


def test_terraform_variables_and_outputs_are_declared_and_documented():
    variables, outputs = _blocks("variable"), _blocks("output")
    used = set(re.findall(r"\bvar\.([a-z0-9_]+)", "\n".join(p.read_text() for p in TERRAFORM.glob("*.tf"))))
    assert used <= set(variables), f"undeclared: {used - set(variables)}"
    assert set(variables) <= used, f"declared but unused: {set(variables) - used}"
    for name, body in {**variables, **outputs}.items():
        assert re.search(r'description\s*=\s*"[^"]{20,}', body), f"{name} has no real description"
    required = [name for name, body in variables.items() if "default" not in body]
    assert required == ["project_id"]
    assert {"bucket_name", "pipeline_root", "image_registry_prefix", "template_registry_url",
            "service_account_email"} <= set(outputs)
    readme = (REPO / "infra/README.md").read_text()
    for name in [*variables, *outputs]:
        assert name in readme, f"infra/README.md does not mention {name}"


def test_terraform_grants_only_the_narrow_roles():
    text = (TERRAFORM / "main.tf").read_text()
    roles = re.findall(r'role\s*=\s*"([^"]+)"', text)
    assert sorted(set(roles)) == ["roles/aiplatform.user", "roles/artifactregistry.reader",
                                  "roles/artifactregistry.writer", "roles/iam.serviceAccountUser",
                                  "roles/secretmanager.secretAccessor", "roles/storage.objectAdmin"]
    # Multi-node training: the pipeline account submits CustomJobs that run as itself (actAs on itself only), and
    # reads the one hub-token secret when one is named.
    acts_as_itself = re.search(r'resource "google_service_account_iam_member" "pipeline_acts_as_itself" \{(.*?)^\}', text, re.M | re.S)
    assert acts_as_itself and "service_account_id = google_service_account.pipeline.name" in acts_as_itself.group(1)
    assert "member             = google_service_account.pipeline.member" in acts_as_itself.group(1)
    secret = re.search(r'resource "google_secret_manager_secret_iam_member" "pipeline_reads_hub_token" \{(.*?)^\}', text, re.M | re.S)
    assert secret and 'count     = var.hub_token_secret_id != "" ? 1 : 0' in secret.group(1)
    # Project-wide grants: only Vertex AI use (no resource-level role exists for it).
    project_grants = re.findall(r'resource "google_project_iam_member".*?role\s*=\s*"([^"]+)"', text, re.S)
    assert project_grants == ["roles/aiplatform.user"]
    assert "uniform_bucket_level_access = true" in text and 'public_access_prevention    = "enforced"' in text
    assert re.search(r"versioning \{\s*enabled = true", text) and "lifecycle_rule" in text
    assert 'format        = "KFP"' in text and 'format        = "DOCKER"' in text


# --------------------------------------------------------------------------------------------------- kubeflow


def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def test_kustomize_files_exist_and_the_secret_is_only_a_template():
    for folder in (KUBEFLOW / "base", KUBEFLOW / "overlays/gke-gpu"):
        k = _kustomization(folder)
        for rel in k.get("resources", []) + [p["path"] for p in k.get("patches", [])]:
            assert (folder / rel).exists(), f"{folder}/{rel}"
    secret = yaml.safe_load((KUBEFLOW / "base/hub-token-secret.yaml").read_text())
    assert secret["kind"] == "Secret" and all(v == "" for v in secret["stringData"].values())


def test_overlay_renders_with_kubectl_kustomize():
    kubectl = shutil.which("kubectl") or shutil.which("kustomize")
    if not kubectl:
        pytest.skip("neither kubectl nor kustomize is installed")
    cmd = [kubectl, "kustomize" if kubectl.endswith("kubectl") else "build", str(KUBEFLOW / "overlays/gke-gpu")]
    docs = list(yaml.safe_load_all(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding", "Secret", "PodDefault", "TrainingRuntime",
                            "ClusterRole", "ClusterRoleBinding"}
    namespace = _kustomization(KUBEFLOW / "overlays/gke-gpu")["namespace"]
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] not in cluster_scoped} == {namespace}
    assert not any("namespace" in d["metadata"] for d in docs if d["kind"] in cluster_scoped)
    assert by_kind["RoleBinding"]["subjects"][0]["namespace"] == namespace
    assert by_kind["ClusterRoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": "vlmtune-pipeline",
                                                          "namespace": namespace}]
    # Multi-node training: the pipeline runner creates/follows/deletes TrainJobs and reads runtimes, nothing wider.
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in by_kind["Role"]["rules"]}
    assert rules[("trainer.kubeflow.org",), ("trainjobs",)] == {"create", "get", "list", "watch", "delete"}
    assert rules[("trainer.kubeflow.org",), ("trainingruntimes",)] == {"get", "list"}
    assert "list" in rules[("",), ("pods",)]  # the SDK lists a TrainJob's pods by label
    assert by_kind["ClusterRole"]["rules"] == [{"apiGroups": ["trainer.kubeflow.org"],
                                                "resources": ["clustertrainingruntimes"], "verbs": ["get", "list"]}]
    runtime = by_kind["TrainingRuntime"]
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert [j["name"] for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]] == ["node"]
    assert "iam.gke.io/gcp-service-account" in by_kind["ServiceAccount"]["metadata"]["annotations"]
    for rule in by_kind["Role"]["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        if "secrets" in rule["resources"]:
            assert rule["resourceNames"] == ["vlmtune-hub-token"] and rule["verbs"] == ["get"]
    gpu = by_kind["PodDefault"]["spec"]
    assert gpu["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]


def test_bare_words_are_paths_only_after_path_flags(tmp_path, monkeypatch):
    (tmp_path / "sft").mkdir()
    monkeypatch.chdir(tmp_path)
    args, mounts = containers.resolve_path_args(["--source", "sft", "--task", "sft", "--output=out", "--seed", "3"])
    assert args == ["--source", f"{tmp_path}/sft", "--task", "sft", "--output=out", "--seed", "3"]
    assert mounts == [tmp_path / "sft"]
