"""Step container images: their names, building and pushing them, and running one step in its container.

Every step runs from one of two images (docker/Dockerfile.cpu, docker/Dockerfile.cuda); both hold the whole
project and the `vlmtune` entry point, so a step in a container is `vlmtune <step> <args>` exactly as on the host.
Image references come from one place, `image_for(step, registry_prefix, tag)`, which the pipeline, the
CLI and the runners all call.

    vlmtune images build [--kind cpu|cuda] [--registry-prefix us-central1-docker.pkg.dev/PROJECT/vlmtune] [--tag T]
    vlmtune images push  [--kind ...] --registry-prefix ... [--tag T]
    vlmtune step prepare-data --docker [--engine podman] -- --source ./data --output ./out

docker or podman is used, whichever is there (`--engine` to choose); both take the same arguments here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

#: Which image each step runs in. Training and evaluation want a GPU; data preparation and registration do not.
STEP_IMAGE_KIND: dict[str, str] = {
    "prepare_data": "cpu",
    "sft": "cuda",
    "dpo": "cuda",
    "evaluate": "cuda",
    "register": "cpu",
}
#: Dockerfile (relative to the repository root, which is the build context) and image name of each kind.
DOCKERFILES: dict[str, str] = {"cpu": "docker/Dockerfile.cpu", "cuda": "docker/Dockerfile.cuda"}
IMAGE_NAMES: dict[str, str] = {"cpu": "vlmtune-cpu", "cuda": "vlmtune-cuda"}

#: `localhost/...` is what podman calls a locally built image; docker accepts the same name, so one default serves both.
DEFAULT_REGISTRY_PREFIX = "localhost"
ENV_REGISTRY_PREFIX = "VLMTUNE_IMAGE_PREFIX"
ENV_TAG = "VLMTUNE_IMAGE_TAG"
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


def step_key(step: str) -> str:
    """`prepare-data` (CLI spelling) or `prepare_data` (Python spelling) -> `prepare_data`; unknown steps fail."""
    key = step.replace("-", "_")
    if key not in STEP_IMAGE_KIND:
        raise ValueError(f"unknown step {step!r}: expected one of {', '.join(sorted(STEP_IMAGE_KIND))}")
    return key


def step_command(step: str) -> str:
    """The `vlmtune` subcommand of a step: `prepare_data` -> `prepare-data`."""
    return step_key(step).replace("_", "-")


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


# --------------------------------------------------------------------------------------------------- CLI


def _kinds(values: list[str] | None) -> list[str]:
    kinds = values or ["all"]
    return list(IMAGE_NAMES) if "all" in kinds else kinds


def _cmd_images(args: argparse.Namespace) -> int:
    kinds = _kinds(args.kind)
    if args.images_command == "build":
        options = BuildOptions(
            base_image=args.base_image,
            build_args=dict(kv.split("=", 1) for kv in args.build_arg),
            build_volumes=args.build_volume,
            isolation=args.isolation,
            network=args.network,
        )
        if args.host_pip_config:
            options = host_pip_build_options(options)
        refs = build_images(kinds, args.registry_prefix, args.tag, args.engine, options, dry_run=args.dry_run)
    else:
        refs = push_images(kinds, args.registry_prefix, args.tag, args.engine, dry_run=args.dry_run)
    print("\n".join(refs))
    return 0


def _add_step_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--docker", action="store_true", help="run inside the step's container image")
    parser.add_argument("--engine", choices=["docker", "podman"], help="container CLI (default: detect)")
    parser.add_argument("--image", help="image to use (default: image_for(step) with prefix and tag from "
                                        f"${ENV_REGISTRY_PREFIX} / ${ENV_TAG})")
    parser.add_argument("--gpus", help="GPUs for the container: all, a count, or ids like 0,1")
    parser.add_argument("--mount", action="append", metavar="SRC[:DST[:MODE]]",
                        help="extra volume, beyond the local paths found in ARGS (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the container command without running it")


def _split_step_args(args: argparse.Namespace) -> list[str]:
    """argparse gives everything after NAME to `step_args` (REMAINDER). Our own options may sit there before `--`:
    parse them out; the rest, and everything after `--`, belongs to the step."""
    rest = list(args.step_args)
    cut = rest.index("--") if "--" in rest else len(rest)
    own = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add_step_options(own)
    parsed, unknown = own.parse_known_args(rest[:cut])
    for key, value in vars(parsed).items():
        setattr(args, key, (getattr(args, key) or []) + value if key == "mount" else value)
    return unknown + rest[cut + 1:]


def _cmd_step(args: argparse.Namespace) -> int:
    step_args = _split_step_args(args)
    if args.docker:
        return run_step_in_container(args.name, step_args, image=args.image, engine=args.engine, gpus=args.gpus,
                                     mounts=args.mount or [], dry_run=args.dry_run)
    from pipelines.cli import main  # in-process: exactly `vlmtune <step> <args>`

    return main([step_command(args.name), *step_args]) or 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `vlmtune images build|push` and `vlmtune step NAME [--docker] -- ARGS...`. Each parser sets
    `func(args) -> int`."""
    images = subparsers.add_parser("images", help="build or push the step container images")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    for name, help_text in (("build", "build the images from docker/"), ("push", "push built images to a registry")):
        p = images_sub.add_parser(name, help=help_text)
        p.add_argument("--kind", action="append", choices=[*IMAGE_NAMES, "all"],
                       help="image kind (repeatable; default all: cpu and cuda)")
        p.add_argument("--registry-prefix", default=None,
                       help=f"registry path before the image name, e.g. REGION-docker.pkg.dev/PROJECT/REPO "
                            f"(default ${ENV_REGISTRY_PREFIX} or '{DEFAULT_REGISTRY_PREFIX}')")
        p.add_argument("--tag", default=None, help=f"image tag (default ${ENV_TAG} or the project version)")
        p.add_argument("--engine", choices=["docker", "podman"], default=None, help="container CLI (default: detect)")
        p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
        if name == "build":
            p.add_argument("--base-image", default=None,
                           help="BASE_IMAGE build arg, e.g. localhost/vlmtune-base:bookworm from docker/build_local_base.sh")
            p.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                           help="extra build arg, e.g. PIP_INDEX_URL=https://mirror/simple or TORCH_INDEX_URL=")
            p.add_argument("--build-volume", action="append", default=[], metavar="SRC:DST[:ro]",
                           help="podman only: mount a host folder into build steps (e.g. a wheel directory)")
            p.add_argument("--isolation", default=None, help="podman/buildah isolation, e.g. chroot")
            p.add_argument("--network", default=None, help="network for RUN steps, e.g. host")
            p.add_argument("--host-pip-config", action="store_true",
                           help="podman only: carry this machine's pip index/find-links/CA settings into the build")
        p.set_defaults(func=_cmd_images)

    step = subparsers.add_parser(
        "step", help="run one pipeline step, in-process or in its container",
        usage="vlmtune step NAME [--docker] [--engine docker|podman] [--image IMG] [--gpus G] [--mount M] -- ARGS...",
        description="Run `vlmtune NAME ARGS...`; with --docker inside the step's image, local paths in ARGS mounted.",
    )
    _add_step_options(step)
    step.add_argument("name", choices=sorted({*STEP_IMAGE_KIND, *map(step_command, STEP_IMAGE_KIND)}),
                      help="step name")
    step.add_argument("step_args", nargs=argparse.REMAINDER, help="arguments of the step, after --")
    step.set_defaults(func=_cmd_step)
