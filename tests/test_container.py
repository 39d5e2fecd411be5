"""The CPU step image, built and run for real with podman on a base image made by debootstrap.

    pytest -m container tests/test_container.py -s     # as root; -s shows the build and the timings

No public image can be pulled here, so docker/build_local_base.sh makes the base from Debian's mirror (the rootfs
tarball is cached in $VLMTUNE_CACHE_DIR, default /var/cache/vlmtune). The image is then built from docker/ with
this machine's pip settings carried in (local wheels and indexes, the proxy's CA), exactly as
`vlmtune images build --kind cpu --engine podman --base-image localhost/vlmtune-base:bookworm --host-pip-config
--build-arg TORCH_INDEX_URL=` does, and prepare-data runs inside it on a small dataset; its output must be the
same as the in-process run's.

Measured on the 2-core dev machine: ~7.5 min cold (debootstrap 1.5 min, image build 6 min), ~1 min warm (base
imported from the cached tarball, image layers cached but the project layer, which is always rebuilt).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import containers

REPO = Path(__file__).resolve().parent.parent
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


@pytest.mark.skipif(not (REPO / "pipelines/cli.py").exists(), reason="the vlmtune CLI (pipelines/cli.py) is not there yet")
def test_vlmtune_entry_point_lists_the_steps(cpu_image):
    out = _podman("run", "--rm", cpu_image, "--help")
    for step in ("prepare-data", "sft", "dpo", "evaluate", "register"):
        assert step in out.stdout


def _small_source(root: Path) -> Path:
    """40 images with question/answer rows, plus one row whose image is missing (must be rejected, not lost)."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(40):
        x = np.linspace(0, 255, 8 + i % 7, dtype=np.uint8)[None, :].repeat(8, 0)
        Image.fromarray(np.stack([x, x[:, ::-1], np.full_like(x, i * 6)], -1), "RGB").save(root / f"images/{i}.png")
        rows.append({"id": f"row-{i}", "image": f"images/{i}.png", "question": "What colour dominates?",
                     "answer": f"answer {i}", "category": "colour" if i % 2 else "shape"})
    rows.append({"id": "no-image", "image": "images/missing.png", "question": "?", "answer": "x", "category": "bad"})
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _container_command(cpu_image: str, args: list[str]) -> list[str]:
    cmd = containers.run_step_command("prepare_data", args, cpu_image, "podman")
    if not (REPO / "pipelines/cli.py").exists():
        # Until the `vlmtune` entry point exists, run the step's own CLI module with the same arguments.
        at = cmd.index(cpu_image)
        cmd = [*cmd[:at], "--entrypoint", "python3", cpu_image, "-m", "components.prepare_data.cli", *cmd[at + 2:]]
    return cmd


def test_prepare_data_in_container_matches_in_process_run(cpu_image, tmp_path):
    from components.prepare_data.cli import main as prepare_data

    source = _small_source(tmp_path / "source")
    common = ["--source", str(source), "--no-progress", "--max-invalid-fraction", "0.1"]
    assert prepare_data([*common, "--output", str(tmp_path / "in_process")]) == 0

    cmd = _container_command(cpu_image, [*common, "--output", str(tmp_path / "in_container")])
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout}\n{run.stderr}"

    def manifest(folder: str) -> dict:
        data = json.loads((tmp_path / folder / "manifest.json").read_text())
        for volatile in ("created_at", "seconds"):
            data.pop(volatile)
        return data

    local, inside = manifest("in_process"), manifest("in_container")
    assert inside == local
    assert inside["counts"]["rows_out"] == 40 and inside["rejects"]["missing_image"]["count"] == 1
    files = sorted(f for split in inside["splits"].values() for f in split["files"])
    assert files
    for rel in files:
        assert (tmp_path / "in_container" / rel).read_bytes() == (tmp_path / "in_process" / rel).read_bytes(), rel
