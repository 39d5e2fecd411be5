"""Every YAML file vlmtune ships, in this one folder, each headed by the exact command that uses it.

    demo.yaml               vlmtune demo / vlmtune run: the run's defaults (registry name, *_config sections)
    vertex.yaml             vlmtune compile --target vertex: pipeline settings (images, resources, retries)
    kubeflow.yaml           vlmtune compile --target kubeflow: the same, plus the `kubernetes:` section
    prepare_data/NAME.yaml  vlmtune prepare-data --config pipelines/configs/prepare_data/NAME.yaml: one dataset
                            layout's settings (`tests/pipelines/test_configs.py` checks every file against what reads it)

Why a folder inside `pipelines` (package data, read through :func:`read_text`) and not a top-level `configs/`:
the step images install the project non-editable (`pip install /tmp/build/src` in docker/Dockerfile.*, with a
build context that `.dockerignore` limits to components/ and pipelines/), so only files inside an installed
package are found there; `vlmtune demo` and `vlmtune compile` read theirs by name. `pipelines` is the top
layer (the `vlmtune` CLI) and the only reader, so nothing below has to reach up for a file; a top-level package
named `configs` would also clash with any other distribution's `configs`.

The prepare-data step never reads this folder. Its presets (the column layouts of common datasets: VQAv2,
ChartQA, ...) are written once, in ``components/prepare_data/config.py`` (``PRESETS``): the step resolves a
preset inside its own container and a step takes code and data only from its own package and
``components/common``. A ``prepare_data/*.yaml`` here names its preset (``preset: vqav2``) and adds what is
particular to that dataset (image size, encoding); it never repeats a value its preset already gives.
"""
from __future__ import annotations

from importlib import resources
from typing import Any

import yaml


def read_text(name: str) -> str:
    """The text of a shipped config, by its name inside this folder (e.g. ``"vertex.yaml"``)."""
    return resources.files(__name__).joinpath(name).read_text()


def load(name: str) -> dict[str, Any]:
    """A shipped config, parsed (an empty file is an empty mapping)."""
    return yaml.safe_load(read_text(name)) or {}


def names() -> list[str]:
    """Every shipped config's name, e.g. ``["demo.yaml", ..., "prepare_data/vqav2.yaml", "vertex.yaml"]``."""
    found = []

    def walk(folder, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml"):
                found.append(prefix + entry.name)

    walk(resources.files(__name__), "")
    return sorted(found)
