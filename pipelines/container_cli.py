"""``vlmtune images`` and ``vlmtune step``: build or push the step images, and run one step in its container.

    vlmtune images build [--kind cpu|cuda] [--registry-prefix us-central1-docker.pkg.dev/PROJECT/vlmtune] [--tag T]
    vlmtune images push  [--kind ...] --registry-prefix ... [--tag T]
    vlmtune step prepare-data --docker [--engine podman] -- --source ./data --output ./out

Without ``--docker``, ``vlmtune step NAME -- ARGS`` runs the step in this process, exactly as ``vlmtune NAME ARGS``.
The work itself is pipelines/containers.py; image names are pipelines/images.py.
"""
from __future__ import annotations

import argparse

from pipelines.containers import BuildOptions, build_images, host_pip_build_options, push_images, run_step_in_container
from pipelines.images import DEFAULT_REGISTRY_PREFIX, ENV_REGISTRY_PREFIX, ENV_TAG, IMAGE_NAMES
from pipelines.steps import STEPS, run_step, step_command

# --------------------------------------------------------------------------------------------------- images


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


def make_images_parser() -> argparse.ArgumentParser:
    images = argparse.ArgumentParser(prog="vlmtune images", description="Build or push the step container images.")
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
    return images


def images_main(argv: list[str] | None = None) -> int:
    """`vlmtune images build|push ...`."""
    return _cmd_images(make_images_parser().parse_args(argv))


# --------------------------------------------------------------------------------------------------- step


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
    return run_step(args.name, step_args) or 0  # in-process: exactly `vlmtune <step> <args>`


def make_step_parser() -> argparse.ArgumentParser:
    step = argparse.ArgumentParser(
        prog="vlmtune step",
        usage="vlmtune step NAME [--docker] [--engine docker|podman] [--image IMG] [--gpus G] [--mount M] -- ARGS...",
        description="Run `vlmtune NAME ARGS...`; with --docker inside the step's image, local paths in ARGS mounted.",
    )
    _add_step_options(step)
    step.add_argument("name", choices=sorted({*STEPS, *map(step_command, STEPS)}), help="step name")
    step.add_argument("step_args", nargs=argparse.REMAINDER, help="arguments of the step, after --")
    return step


def step_main(argv: list[str] | None = None) -> int:
    """`vlmtune step NAME [--docker] ... -- ARGS...`."""
    return _cmd_step(make_step_parser().parse_args(argv))
