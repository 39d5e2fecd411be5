"""Step container image names: which image each step runs in, and its full reference.

Every step runs from one of two images (docker/Dockerfile.cpu, docker/Dockerfile.cuda); both hold the whole
project and the `vlmtune` entry point, so a step in a container is `vlmtune <step> <args>` exactly as on the host.
Image references come from one place, `image_for(step, registry_prefix, tag)`, which the pipeline, the
CLI and the runners all call. Building, pushing and running the images is pipelines/containers.py.
"""
from __future__ import annotations

import os

from pipelines.steps import step_key

#: Which image each step runs in. Training and evaluation want a GPU; data preparation and registration do not.
STEP_IMAGE_KIND: dict[str, str] = {
    "prepare_data": "cpu",
    "sft": "cuda",
    "dpo": "cuda",
    "evaluate": "cuda",
    "register": "cpu",
}
#: Image name of each kind (docker/Dockerfile.<kind> builds it).
IMAGE_NAMES: dict[str, str] = {"cpu": "vlmtune-cpu", "cuda": "vlmtune-cuda"}

#: `localhost/...` is what podman calls a locally built image; docker accepts the same name, so one default serves both.
DEFAULT_REGISTRY_PREFIX = "localhost"
ENV_REGISTRY_PREFIX = "VLMTUNE_IMAGE_PREFIX"
ENV_TAG = "VLMTUNE_IMAGE_TAG"


def default_tag() -> str:
    """`$VLMTUNE_IMAGE_TAG`, else the installed project version, else `dev` (never `latest`: a run must name
    exactly the image it used)."""
    if os.environ.get(ENV_TAG):
        return os.environ[ENV_TAG]
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("vlmtune")
    except PackageNotFoundError:
        return "dev"


def default_registry_prefix() -> str:
    return os.environ.get(ENV_REGISTRY_PREFIX) or DEFAULT_REGISTRY_PREFIX


def image_ref(kind: str, registry_prefix: str, tag: str) -> str:
    if kind not in IMAGE_NAMES:
        raise ValueError(f"unknown image kind {kind!r}: expected one of {', '.join(IMAGE_NAMES)}")
    prefix = registry_prefix.rstrip("/")
    name = f"{prefix}/{IMAGE_NAMES[kind]}" if prefix else IMAGE_NAMES[kind]
    return f"{name}:{tag}"


def image_for(step: str, registry_prefix: str, tag: str, *, gpu: bool = True) -> str:
    """The image a step runs in, e.g. `image_for("sft", "us-central1-docker.pkg.dev/p/vlmtune", "0.1.0")` ->
    `us-central1-docker.pkg.dev/p/vlmtune/vlmtune-cuda:0.1.0`.

    `gpu=False` maps the CUDA steps onto the CPU image (the CPU variant of the training image: same project,
    same pins, CPU torch), for local runs without a GPU.
    """
    kind = STEP_IMAGE_KIND[step_key(step)]
    if kind == "cuda" and not gpu:
        kind = "cpu"
    return image_ref(kind, registry_prefix, tag)
