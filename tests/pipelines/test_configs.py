"""Every shipped config (pipelines/configs/) loads into what reads it, and its header names the command that uses it.

torchtune's tests/recipes/test_configs.py habit: a config that drifts from its dataclass (a renamed field, a typo)
fails here, not in the middle of a run. Each file is checked by the loader that reads it for real:
``load_config`` against PrepareDataConfig for the prepare-data configs, ``build_config`` against each step's
dataclass for the *_config sections of the run defaults (demo.yaml), and ``pipelines.compile.target_settings``
for the Vertex/Kubeflow settings. ``test_a_misspelt_key_is_refused`` shows those checks have teeth: a copy of
each file with one key misspelt, at every depth where keys name settings, must be refused.

Run: pytest tests/pipelines/test_configs.py -q
"""
from __future__ import annotations

import glob
import shlex
import tomllib
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from components.common.config import build_config, load_config
from components.dpo.config import DPOStepConfig
from components.evaluate.config import EvaluateConfig
from components.prepare_data.config import PRESETS, PrepareDataConfig
from components.sft.config import SFTStepConfig
from pipelines import configs

REPO = Path(__file__).resolve().parents[2]
FOLDER = REPO / "pipelines" / "configs"
ON_DISK = sorted(str(p.relative_to(FOLDER)) for p in FOLDER.rglob("*.yaml"))

# The keys `vlmtune run --config FILE` takes besides the sections (pipelines/cli.py _cmd_run, demo.default_params).
RUN_KEYS = {"base_model", "sft_source", "preference_source", "registry", "registry_name"}
# Each section of a run config feeds one step's dataclass, with what the step's KFP component adds itself
# (components/*/component.py: prepare-data sets task and processor, SFT its base_model).
RUN_SECTIONS: dict[str, tuple[type, list[dict[str, Any]]]] = {
    "prepare_config": (PrepareDataConfig, [{"task": "sft", "processor": None}, {"task": "preference", "processor": None}]),
    "sft_config": (SFTStepConfig, [{"base_model": "HuggingFaceTB/SmolVLM-256M-Instruct"}]),
    "dpo_config": (DPOStepConfig, [{}]),
    "eval_config": (EvaluateConfig, [{}]),
}
# Mappings whose keys are free-form (Kubernetes label -> value): no key there can be misspelt.
FREE_FORM = {("kubernetes", "gpu_node_selector"), ("kubernetes", "node_selector")}


def check_prepare_data(path: Path) -> None:
    """What `vlmtune prepare-data --config PATH` does with it, plus: no value its preset already gives."""
    config = load_config(PrepareDataConfig, str(path))
    assert config.resolved().validate() == []
    values = yaml.safe_load(path.read_text())
    preset = PRESETS[config.preset or "default"]
    repeated = sorted(k for k, v in preset.items() if k in values and values[k] == v)
    assert not repeated, f"{path.name} repeats {repeated}, which PRESETS[{config.preset!r}] already sets"


def check_run_config(path: Path) -> None:
    values = yaml.safe_load(path.read_text()) or {}
    unknown = set(values) - RUN_KEYS - set(RUN_SECTIONS)
    assert not unknown, f"unknown run config keys {sorted(unknown)}; known: {sorted(RUN_KEYS | set(RUN_SECTIONS))}"
    for section, (cls, added_by_component) in RUN_SECTIONS.items():
        for added in added_by_component:
            build_config(cls, {**(values.get(section) or {}), **added})


def check_settings(target: str) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        from pipelines.compile import target_settings

        target_settings(target, str(path))

    return check


def checker(name: str) -> Callable[[Path], None]:
    """The check of a shipped file, by name. A new file needs a line here (and a header command, below)."""
    if name.startswith("prepare_data/"):
        return check_prepare_data
    return {"demo.yaml": check_run_config, "vertex.yaml": check_settings("vertex"),
            "kubeflow.yaml": check_settings("kubeflow")}[name]


def header_command(path: Path) -> list[str]:
    """The `vlmtune ...` command in the file's leading comment block (a trailing backslash continues it)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    for i, line in enumerate(header):
        if line.startswith("vlmtune "):
            command = line
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + header[i]
            return shlex.split(command)
    raise AssertionError(f"{path}: its header (leading # lines) names no `vlmtune ...` command")


def misspellings(values: Any, where: tuple = ()):
    """(where, copy of values with the key at `where` misspelt), for every key that names a setting."""
    if isinstance(values, dict) and where not in FREE_FORM:
        for key, value in values.items():
            yield ".".join(map(str, where + (key,))), {(f"{k}x" if k == key else k): v for k, v in values.items()}
            for spot, inner in misspellings(value, where + (key,)):
                yield spot, {**values, key: inner}
    elif isinstance(values, list):
        for i, item in enumerate(values):
            for spot, inner in misspellings(item, where + (i,)):
                yield spot, [*values[:i], inner, *values[i + 1:]]


def test_the_folder_lists_every_file_and_each_is_package_data():
    assert ON_DISK and configs.names() == ON_DISK
    # The step images install the project non-editable: only files matching package-data are there.
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipelines.configs"]
    packaged = {f for pattern in patterns for f in glob.glob(pattern, root_dir=FOLDER)}
    assert set(ON_DISK) <= packaged, f"not package data: {sorted(set(ON_DISK) - packaged)}; add a pattern in pyproject.toml"


@pytest.mark.parametrize("name", ON_DISK)
def test_every_shipped_config_loads(name):
    path = FOLDER / name
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    checker(name)(path)


@pytest.mark.parametrize("name", ON_DISK)
def test_header_names_the_command_that_uses_it(name):
    argv = header_command(FOLDER / name)
    assert argv[0] == "vlmtune", argv
    if name.startswith("prepare_data/"):
        from components.prepare_data.cli import make_parser

        assert argv[1] == "prepare-data", argv
        args = make_parser().parse_args(argv[2:])
        # The command runs from the repository root and names this very file.
        assert args.config == f"pipelines/configs/{name}" and (REPO / args.config).is_file()
        return
    from pipelines import cli

    if name == "demo.yaml":  # vlmtune demo (and run) read it by name: pipelines.demo.demo_config
        assert argv[1] == "demo", argv
        cli.demo_parser().parse_args(argv[2:])
    else:  # compile reads pipelines/configs/<target>.yaml unless --settings names another file
        assert argv[1] == "compile", argv
        args = cli.compile_parser().parse_args(argv[2:])
        assert (args.target, args.settings) == (Path(name).stem, None), argv


def test_readers_find_the_shipped_files_by_name():
    from pipelines.compile import target_settings
    from pipelines.demo import demo_config

    assert demo_config() == yaml.safe_load((FOLDER / "demo.yaml").read_text())
    for target in ("vertex", "kubeflow"):
        assert target_settings(target) == target_settings(target, str(FOLDER / f"{target}.yaml"))


@pytest.mark.parametrize("name", ON_DISK)
def test_a_misspelt_key_is_refused(name, tmp_path):
    values = yaml.safe_load((FOLDER / name).read_text())
    variants = list(misspellings(values))
    assert variants
    for where, bad in variants:
        path = tmp_path / Path(name).name
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises((ValueError, TypeError, AssertionError)):
            checker(name)(path)
            pytest.fail(f"{name}: misspelling {where!r} went unnoticed")
