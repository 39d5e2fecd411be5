"""The CPU step image, built and run for real with podman on a base image made by debootstrap.

    pytest -m container tests/pipelines/test_containers.py -s     # as root; -s shows the build and the timings

No public image can be pulled here, so docker/build_local_base.sh makes the base from Debian's mirror (the rootfs
tarball is cached in $VLMTUNE_CACHE_DIR, default /var/cache/vlmtune). The image is then built from docker/ with
this machine's pip settings carried in (local wheels and indexes, the proxy's CA), exactly as
`vlmtune images build --kind cpu --engine podman --base-image localhost/vlmtune-base:bookworm --host-pip-config
--build-arg TORCH_INDEX_URL=` does. Then `vlmtune prepare-data` runs inside it on demo data (SFT and preference);
its output must be byte-for-byte the in-process run's; and kfp's DockerRunner, pointed at podman's Docker API,
runs a lightweight component in the image with `containers.docker_runner_kwargs()`.

Measured on the 2-core dev machine (shared with other work): cold 6.7-8.5 min (debootstrap 1.5-2.3 min, image
build 4-6.5 min, the runs ~40 s); warm 35-55 s (base image kept, dependency layers cached, only the project
layer rebuilt). A change to pyproject.toml or docker/constraints.txt rebuilds the dependency layer: ~4-6 min.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import containers

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("VLMTUNE_CACHE_DIR", "/var/cache/vlmtune"))
BASE_IMAGE = "localhost/vlmtune-base:bookworm"
TAG = "container-test"


def _missing() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: podman runs rootful here, and debootstrap needs root"
    tools = ["podman", "runc"]
    if not (CACHE_DIR / "rootfs-bookworm.tar").exists():
        tools.append("debootstrap")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        return f"needs {', '.join(missing)}: apt-get install -y podman buildah debootstrap runc"
    return None


pytestmark = [pytest.mark.container]
if _missing():
    pytestmark.append(pytest.mark.skip(reason=_missing()))


@pytest.fixture(scope="module", autouse=True)
def podman_settings():
    """Point podman at the settings that work on these machines (runc, ulimits, overlay) without touching /etc."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONTAINERS_CONF", str(REPO / "docker/podman/containers.conf"))
        mp.setenv("CONTAINERS_STORAGE_CONF", str(REPO / "docker/podman/storage.conf"))
        yield


def _timed(label: str, timings: dict, fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    timings[label] = round(time.monotonic() - start, 1)
    return result


@pytest.fixture(scope="module")
def cpu_image(podman_settings) -> str:
    timings: dict[str, float] = {}
    _timed("base image", timings, subprocess.run,
           [str(REPO / "docker/build_local_base.sh"), "--engine", "podman", "--cache-dir", str(CACHE_DIR),
            "--tag", BASE_IMAGE], check=True)
    options = containers.host_pip_build_options(
        containers.BuildOptions(base_image=BASE_IMAGE, build_args={"TORCH_INDEX_URL": ""}))
    [ref] = _timed("cpu image build", timings, containers.build_images,
                   ["cpu"], registry_prefix="localhost", tag=TAG, engine="podman", options=options)
    print(f"\ncontainer test timings (s): {json.dumps(timings)}", file=sys.stderr)
    return ref


def _podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check)


def _pins() -> dict[str, str]:
    lines = (REPO / "docker/constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_image_has_pinned_project_and_runs_read_only_as_non_root(cpu_image):
    probe = (
        "import json, os, pathlib, components, pipelines, torch, transformers, kfp, peft, trl;"
        "pathlib.Path(os.environ['HF_HOME']).mkdir(parents=True);"
        "import matplotlib.pyplot;"  # writes its cache to MPLCONFIGDIR: fails if that is read-only
        "print(json.dumps({'uid': os.getuid(), 'torch': torch.__version__, 'transformers': transformers.__version__,"
        " 'kfp': kfp.__version__, 'peft': peft.__version__, 'trl': trl.__version__, 'cuda': torch.cuda.is_available()}))"
    )
    out = _podman("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--entrypoint", "python3", cpu_image, "-c", probe)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    pins = _pins()
    assert info["uid"] == 10001
    assert info["torch"].split("+")[0] == pins["torch"] and info["torch"].endswith("+cpu")
    assert [info[name] for name in ("transformers", "kfp", "peft", "trl")] == [
        pins[name] for name in ("transformers", "kfp", "peft", "trl")]
    assert info["cuda"] is False
    config = json.loads(_podman("image", "inspect", cpu_image).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["vlmtune"]
    assert config["User"] == "10001:10001"


def test_vlmtune_entry_point_lists_the_steps(cpu_image):
    out = _podman("run", "--rm", cpu_image, "--help")
    for step in ("prepare-data", "sft", "dpo", "evaluate", "register", "images", "step"):
        assert step in out.stdout


@pytest.fixture(scope="module")
def demo_sources(tmp_path_factory) -> Path:
    """`vlmtune demo-data` output (small), plus one SFT row whose image is missing: it must be rejected, not lost."""
    from components.common.demo_data import write_demo_data

    root = write_demo_data(tmp_path_factory.mktemp("demo") / "data", rows=120, preference_rows=40, seed=3)
    with open(root / "sft/rows.jsonl", "a") as f:
        f.write(json.dumps({"id": "no-image", "image": "images/missing.png", "question": "?", "answer": "x"}) + "\n")
    return root


@pytest.mark.parametrize("task", ["sft", "preference"])
def test_prepare_data_in_container_matches_in_process_run(cpu_image, demo_sources, task, tmp_path):
    from pipelines.cli import main as vlmtune

    common = ["--source", str(demo_sources / task), "--task", task, "--no-progress", "--max-invalid-fraction", "0.1"]
    assert vlmtune(["prepare-data", *common, "--output", str(tmp_path / "in_process")]) == 0

    # `vlmtune prepare-data ...` in the image, as `vlmtune step prepare-data --docker -- ...` runs it.
    cmd = containers.run_step_command("prepare_data", [*common, "--output", str(tmp_path / "in_container")],
                                      cpu_image, "podman")
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout}\n{run.stderr}"

    def manifest(folder: str) -> dict:
        data = json.loads((tmp_path / folder / "manifest.json").read_text())
        for volatile in ("created_at", "seconds"):
            data.pop(volatile)
        return data

    local, inside = manifest("in_process"), manifest("in_container")
    assert inside == local
    assert inside["counts"]["rows_out"] == {"sft": 120, "preference": 40}[task]
    assert inside["rejects"] == ({"missing_image": {"count": 1, "examples": ["no-image"]}} if task == "sft" else {})
    files = sorted(f for split in inside["splits"].values() for f in split["files"])
    assert files
    for rel in files:
        assert (tmp_path / "in_container" / rel).read_bytes() == (tmp_path / "in_process" / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def docker_api(podman_settings, tmp_path_factory):
    """podman's Docker-compatible API on a private socket, for kfp's DockerRunner (docker-py)."""
    pytest.importorskip("docker", reason="kfp's DockerRunner needs the `docker` package (pip install docker)")
    sock = tmp_path_factory.mktemp("podman") / "docker.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DOCKER_HOST", f"unix://{sock}")
            yield
    finally:
        service.terminate()
        service.wait(timeout=30)


def test_kfp_docker_runner_runs_a_component_in_the_image(cpu_image, docker_api, tmp_path):
    from kfp import dsl, local

    @dsl.component(base_image=cpu_image, install_kfp_package=False)
    def probe(n: int, out: dsl.Output[dsl.Artifact]) -> str:
        import os

        import components  # noqa: F401  (the project is in the image)
        import torch

        with open(out.path, "w") as f:
            f.write(str(n * 2))
        return f"{torch.__version__} {os.environ['HF_HOME']}"

    local.init(runner=local.DockerRunner(**containers.docker_runner_kwargs(env={})), pipeline_root=str(tmp_path))
    task = probe(n=21)
    assert task.outputs["Output"] == f"{_pins()['torch']}+cpu /tmp/huggingface"
    assert Path(task.outputs["out"].path).read_text() == "42"
