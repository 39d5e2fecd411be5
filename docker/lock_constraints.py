"""Regenerate docker/constraints.txt: exact pins for every package the images install.

The images install the project with `pip install -c constraints.txt`, so they get the versions the test suite ran
against (pyproject.toml only gives ranges). The pins are the dependency closure of pyproject's `dependencies` and its
`kubeflow` extra as installed in the current environment:

    . .venv/bin/activate && python docker/lock_constraints.py

Local version labels are dropped (`torch==2.13.0`, not `2.13.0+cpu`), so one file serves the CPU build
(+cpu wheel) and the CUDA build (the default PyPI wheel) alike.
"""
import importlib.metadata as md
import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = """\
# Exact versions for the step images (see docker/lock_constraints.py; regenerate after changing pyproject deps).
# Applies to CPU and CUDA images alike; CUDA-only packages (nvidia-*, triton) follow torch's own pins.
"""


def dependency_closure(requirements: list[str]) -> dict[str, str]:
    """Installed version of every package `requirements` pull in (extras and foreign markers skipped)."""
    pins: dict[str, str] = {}
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in pins:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError as e:
            raise SystemExit(f"{req.name} is required but not installed here; install the project first") from e
        pins[name] = dist.version.split("+")[0]
        stack.extend(Requirement(r) for r in dist.requires or [])
    return pins


def main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # What the images install: the dependencies and the `kubeflow` extra (see the Dockerfiles).
    deps = project["dependencies"] + project["optional-dependencies"]["kubeflow"]
    pins = dependency_closure(deps)
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    (ROOT / "docker" / "constraints.txt").write_text(HEADER + body)
    print(f"pinned {len(pins)} packages in docker/constraints.txt")


if __name__ == "__main__":
    main()
