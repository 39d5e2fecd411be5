"""Step container images: building and pushing them, and running one step in its container.

Image names come from pipelines/images.py; the `vlmtune images` and `vlmtune step` commands that drive this
module are pipelines/container_cli.py.

docker or podman is used, whichever is there (`--engine` to choose); both take the same arguments here.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence

from pipelines.images import (
    DEFAULT_REGISTRY_PREFIX,
    ENV_REGISTRY_PREFIX,
    default_registry_prefix,
    default_tag,
    image_for,
    image_ref,
)
from pipelines.steps import step_command

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

#: Dockerfile of each image kind (pipelines/images.py names the kinds), relative to the repository root, which is
#: the build context.
DOCKERFILES: dict[str, str] = {"cpu": "docker/Dockerfile.cpu", "cuda": "docker/Dockerfile.cuda"}

ENV_ENGINE = "VLMTUNE_CONTAINER_ENGINE"

#: Passed from the caller's environment into a step container by name only (`-e NAME`), so no value, such as a
#: token, ever appears on a command line.
PASSTHROUGH_ENV = (
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "HF_TOKEN",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
)
#: PyTorch data loader workers share tensors through /dev/shm; docker's default 64 MB makes them crash.
DEFAULT_SHM_SIZE = "8g"


# --------------------------------------------------------------------------------------------------- engines


def detect_engine(preferred: str | None = None) -> str:
    """The container CLI to use: `preferred`, else `$VLMTUNE_CONTAINER_ENGINE`, else docker when its daemon looks
    reachable, else podman, else docker. A docker CLI without a daemon (as on this project's CI) is skipped in
    favour of podman."""
    choice = preferred or os.environ.get(ENV_ENGINE)
    if choice:
        if not shutil.which(choice):
            raise RuntimeError(f"container engine {choice!r} is not on PATH; install it or pass --engine docker|podman")
        return choice
    docker_daemon = bool(os.environ.get("DOCKER_HOST")) or pathlib.Path("/var/run/docker.sock").exists()
    if shutil.which("docker") and docker_daemon:
        return "docker"
    if shutil.which("podman"):
        return "podman"
    if shutil.which("docker"):
        return "docker"
    raise RuntimeError("neither docker nor podman is on PATH: install one of them (or pass --engine)")


def _run(cmd: Sequence[str], dry_run: bool) -> None:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    if not dry_run:
        subprocess.run(list(cmd), check=True)


# --------------------------------------------------------------------------------------------------- build/push


@dataclasses.dataclass
class BuildOptions:
    """How to build the images. The defaults build from public images and indexes; an air-gapped builder sets
    `base_image` (e.g. from docker/build_local_base.sh) and pip's index settings via `build_args`."""

    base_image: str | None = None
    build_args: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Host paths mounted into every build step (podman/buildah `-v`), e.g. a local wheel directory.
    build_volumes: list[str] = dataclasses.field(default_factory=list)
    #: `chroot` for podman/buildah inside an unprivileged container or VM without nested namespaces.
    isolation: str | None = None
    network: str | None = None
    extra_args: list[str] = dataclasses.field(default_factory=list)


def host_pip_build_options(base: BuildOptions | None = None) -> BuildOptions:
    """Carry this machine's pip settings into a podman/buildah image build, for builders behind a mirror, a local
    wheel folder or a TLS-intercepting proxy: local `find-links` folders and `file://` indexes are mounted
    read-only at the same path and passed as PIP_FIND_LINKS / PIP_INDEX_URL / PIP_EXTRA_INDEX_URL build args,
    pip's CA bundle becomes PIP_CERT, and RUN steps share the host's network. (pip's `constraint` setting is not
    carried: the images pin with docker/constraints.txt.)"""
    base = base or BuildOptions()
    options = dataclasses.replace(base, build_args=dict(base.build_args), build_volumes=list(base.build_volumes))
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=False).stdout
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            # `global.find-links='/opt/wheels'` and `:env:.find-links=...`: the environment wins, as in pip.
            name = key.rsplit(".", 1)[-1]
            if key.startswith(":env:") or name not in settings:
                settings[name] = value.strip().strip("'\"")
    volumes: list[str] = []

    def carry(value: str) -> str:
        for item in value.split():
            path = item[len("file://"):] if item.startswith("file://") else item
            if "://" in path or not os.path.isabs(path) or not os.path.exists(path):
                continue
            # A PEP 503 index folder `X/simple` links to its files as `../../files/...`: mount X.
            folder = pathlib.Path(path)
            folder = folder.parent if folder.name == "simple" else folder
            volumes.append(f"{folder}:{folder}:ro")
        return value

    for name, arg in (("find-links", "PIP_FIND_LINKS"), ("index-url", "PIP_INDEX_URL"),
                      ("extra-index-url", "PIP_EXTRA_INDEX_URL")):
        if settings.get(name):
            options.build_args.setdefault(arg, carry(settings[name]))
    cert = settings.get("cert")
    if cert and os.path.isfile(cert):
        volumes.append(f"{cert}:/etc/ssl/certs/vlmtune-build-ca.crt:ro")
        options.build_args.setdefault("PIP_CERT", "/etc/ssl/certs/vlmtune-build-ca.crt")
    options.build_volumes = [*options.build_volumes, *dict.fromkeys(volumes)]
    options.network = options.network or "host"
    return options


def build_command(kind: str, ref: str, engine: str, options: BuildOptions, context: pathlib.Path = REPO_ROOT) -> list[str]:
    cmd = [engine, "build", "-f", str(context / DOCKERFILES[kind]), "-t", ref]
    if options.base_image:
        cmd += ["--build-arg", f"BASE_IMAGE={options.base_image}"]
    for key, value in options.build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if options.build_volumes:
        if engine == "docker":
            raise ValueError("build volumes need podman/buildah; docker build has no -v (use --build-arg and a mirror)")
        for volume in options.build_volumes:
            cmd += ["-v", volume]
    if options.isolation:
        cmd += ["--isolation", options.isolation]
    if options.network:
        cmd += ["--network", options.network]
    return cmd + list(options.extra_args) + [str(context)]


def build_images(
    kinds: Iterable[str] = ("cpu", "cuda"),
    registry_prefix: str | None = None,
    tag: str | None = None,
    engine: str | None = None,
    options: BuildOptions | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Build the images of `kinds` from the repository root; returns their references."""
    engine = engine if dry_run and engine else detect_engine(engine)
    prefix = default_registry_prefix() if registry_prefix is None else registry_prefix
    tag = tag or default_tag()
    refs = []
    for kind in kinds:
        ref = image_ref(kind, prefix, tag)
        _run(build_command(kind, ref, engine, options or BuildOptions()), dry_run)
        refs.append(ref)
    return refs


def push_images(
    kinds: Iterable[str] = ("cpu", "cuda"),
    registry_prefix: str | None = None,
    tag: str | None = None,
    engine: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Push the images of `kinds` (built with the same prefix and tag). For Artifact Registry run
    `gcloud auth configure-docker REGION-docker.pkg.dev` first (podman: `gcloud auth print-access-token |
    podman login -u oauth2accesstoken --password-stdin REGION-docker.pkg.dev`)."""
    engine = engine if dry_run and engine else detect_engine(engine)
    prefix = default_registry_prefix() if registry_prefix is None else registry_prefix
    if prefix.rstrip("/") in ("", DEFAULT_REGISTRY_PREFIX):
        raise ValueError("pushing needs a registry: pass --registry-prefix REGION-docker.pkg.dev/PROJECT/REPO "
                         f"(or set ${ENV_REGISTRY_PREFIX})")
    tag = tag or default_tag()
    refs = []
    for kind in kinds:
        ref = image_ref(kind, prefix, tag)
        _run([engine, "push", ref], dry_run)
        refs.append(ref)
    return refs


# --------------------------------------------------------------------------------------------------- run a step


#: A bare word (`data`, `sft`) is a path only after a flag whose name says so; otherwise `--task sft` would turn
#: into a mount whenever a folder named `sft` happens to sit in the working directory.
PATH_FLAG_WORDS = ("source", "output", "input", "config", "dir", "path", "file", "data", "model", "adapter",
                   "checkpoint", "registry", "workdir", "root")


def _looks_like_local_path(value: str, flag: str = "") -> bool:
    if value.startswith("file://"):
        return True
    if "://" in value:
        return False  # gs://, http://, hf://: nothing to mount
    if value.startswith(("/", "./", "../", "~")):
        return True
    return os.path.exists(value) and any(word in flag for word in PATH_FLAG_WORDS)


def _to_local_path(value: str) -> pathlib.Path:
    if value.startswith("file://"):
        value = value[len("file://"):]
    return pathlib.Path(value).expanduser().absolute()


def _mount_point(path: pathlib.Path) -> pathlib.Path:
    """What to bind-mount so `path` is usable inside the container: the path itself when it exists, else (an
    output still to be created) its nearest existing ancestor, so the step can create it."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def resolve_path_args(args: Sequence[str]) -> tuple[list[str], list[pathlib.Path]]:
    """Make every local path in `args` absolute (the container's working directory differs) and list what has to
    be mounted for them. Handles `--flag PATH` and `--flag=PATH`; a path is absolute, `./`/`../`/`~`-relative,
    `file://`, or an existing name after a path-like flag (PATH_FLAG_WORDS); `gs://` stays as is."""
    rewritten: list[str] = []
    mounts: list[pathlib.Path] = []
    previous = ""
    for arg in args:
        flag, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        owner, previous = (flag or previous), arg
        if value.startswith("-") or not value or not _looks_like_local_path(value, owner):
            rewritten.append(arg)
            continue
        path = _to_local_path(value)
        mounts.append(_mount_point(path))
        rewritten.append(f"{flag}{eq}{path}")
    return rewritten, _without_nested(mounts)


def _without_nested(paths: Iterable[pathlib.Path]) -> list[pathlib.Path]:
    """Drop duplicates and paths inside another listed path (mounting the outer one covers them)."""
    unique = sorted(set(paths), key=lambda p: len(p.parts))
    kept: list[pathlib.Path] = []
    for path in unique:
        if path == pathlib.Path("/"):
            raise ValueError("refusing to bind-mount / into a step container; pass paths below a project folder")
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return kept


def _gpu_args(engine: str, gpus: str | int | None) -> list[str]:
    if gpus in (None, "", 0, "0", "none"):
        return []
    if engine == "podman":
        # podman reaches NVIDIA GPUs through CDI (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`).
        devices = ["all"] if str(gpus) == "all" else str(gpus).split(",")
        return [arg for d in devices for arg in ("--device", f"nvidia.com/gpu={d}")]
    if str(gpus) == "all" or str(gpus).isdigit():
        return ["--gpus", str(gpus)]
    return ["--gpus", f'"device={gpus}"']


def run_step_command(
    step: str,
    args: Sequence[str],
    image: str,
    engine: str,
    gpus: str | int | None = None,
    mounts: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    shm_size: str = DEFAULT_SHM_SIZE,
    user: str | None = None,
) -> list[str]:
    """The `docker|podman run` command line that runs `vlmtune <step> <args>` in `image`.

    Local paths in `args` are mounted at the same absolute path, so the step's arguments need no rewriting beyond
    becoming absolute; `mounts` adds `SRC[:DST[:MODE]]` volumes. The container runs as the caller's uid/gid so
    what it writes into those folders belongs to the caller (the image keeps its caches under /tmp for any uid).
    """
    step_args, paths = resolve_path_args(args)
    cmd = [engine, "run", "--rm", "--shm-size", shm_size]
    if user is None and hasattr(os, "getuid"):
        user = f"{os.getuid()}:{os.getgid()}"
    if user:
        cmd += ["--user", user]
    cmd += _gpu_args(engine, gpus)
    for path in paths:
        cmd += ["-v", f"{path}:{path}"]
    for volume in mounts:
        cmd += ["-v", volume if ":" in volume else f"{volume}:{volume}"]
    environ = os.environ if env is None else env
    for name in PASSTHROUGH_ENV:
        if name in environ:
            cmd += ["-e", name]
    credentials = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if credentials and not any(pathlib.Path(credentials).absolute().is_relative_to(p) for p in paths):
        cmd += ["-v", f"{pathlib.Path(credentials).absolute()}:{pathlib.Path(credentials).absolute()}:ro"]
    emulator = environ.get("STORAGE_EMULATOR_HOST", "")
    if any(host in emulator for host in ("localhost", "127.0.0.1", "[::1]")):
        # A GCS emulator on the caller's loopback is reachable only from the host's network namespace.
        cmd += ["--network", "host"]
    return cmd + [image, step_command(step), *step_args]


def run_step_in_container(
    step: str,
    args: Sequence[str],
    image: str | None = None,
    engine: str | None = None,
    gpus: str | int | None = None,
    mounts: Sequence[str] = (),
    dry_run: bool = False,
) -> int:
    """Run `vlmtune <step> <args>` inside the step's image (default: `image_for(step, prefix, tag)`, the CPU image
    when no GPUs are asked for). Returns the container's exit status."""
    engine = engine if dry_run and engine else detect_engine(engine)
    image = image or image_for(step, default_registry_prefix(), default_tag(), gpu=bool(gpus))
    cmd = run_step_command(step, args, image, engine, gpus=gpus, mounts=mounts)
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    return subprocess.run(cmd, check=False).returncode


# --------------------------------------------------------------------------------------------------- kfp.local


def docker_runner_kwargs(
    gpus: str | int | None = None,
    shm_size: str = DEFAULT_SHM_SIZE,
    mounts: Sequence[str | os.PathLike] = (),
    env: Mapping[str, str] | None = None,
) -> dict:
    """Keyword arguments for `kfp.local.DockerRunner(**kwargs)` (kfp 2.17 passes them to docker-py's
    `containers.run`).

    - `entrypoint`: kfp gives its command (`sh -c ... python3 -m kfp.dsl.executor_main`) as the container's
      *command*, which docker appends to the image's ENTRYPOINT (`vlmtune`); `/usr/bin/env` runs it unchanged.
    - `user`: kfp bind-mounts the pipeline root; writing into it as the image's uid 10001 would fail on a folder
      owned by the caller, so the container runs as the caller.
    - `device_requests`: GPUs (`gpus="all"`, a count, or `"0,1"`), as `docker run --gpus` does.
    - `mounts`: kfp mounts only the pipeline root (its `volumes` argument is reserved), so input folders outside
      it are bind-mounted here, at the same path, as docker-py Mount dicts.
    - `environment`: the passthrough variables set now. kfp replaces it when a task sets its own env vars.
    """
    kwargs: dict = {"entrypoint": ["/usr/bin/env"], "shm_size": shm_size}
    if hasattr(os, "getuid"):
        kwargs["user"] = f"{os.getuid()}:{os.getgid()}"
    if gpus not in (None, "", 0, "0", "none"):
        if str(gpus) == "all":
            request = {"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}
        elif str(gpus).isdigit():
            request = {"Driver": "nvidia", "Count": int(gpus), "Capabilities": [["gpu"]]}
        else:
            request = {"Driver": "nvidia", "DeviceIDs": str(gpus).split(","), "Capabilities": [["gpu"]]}
        kwargs["device_requests"] = [request]
    paths = _without_nested(_mount_point(pathlib.Path(p).absolute()) for p in mounts)
    if paths:
        kwargs["mounts"] = [{"Target": str(p), "Source": str(p), "Type": "bind", "ReadOnly": False} for p in paths]
    environ = os.environ if env is None else env
    passthrough = {name: environ[name] for name in PASSTHROUGH_ENV if name in environ}
    if passthrough:
        kwargs["environment"] = passthrough
    emulator = passthrough.get("STORAGE_EMULATOR_HOST", "")
    if any(host in emulator for host in ("localhost", "127.0.0.1", "[::1]")):
        kwargs["network_mode"] = "host"
    return kwargs
