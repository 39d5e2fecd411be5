"""The pipeline's five steps by name, and the one table from a step to its command line.

Each step's CLI is ``components/<step>/cli.py`` with ``make_parser()`` and ``main(argv) -> exit status``.
``vlmtune <step> ...`` (pipelines/cli.py) and ``vlmtune step NAME`` (pipelines/container_cli.py) both run a step
through :func:`run_step`; inside a step's image the ``vlmtune`` entry point does the same. So a runner never
calls back up into the top-level CLI, and a step's CLI module is imported only when that step runs.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence

#: Step (the Python spelling the pipeline and the images use) -> the module of its CLI, in pipeline order.
STEP_CLIS: dict[str, str] = {
    "prepare_data": "components.prepare_data.cli",
    "sft": "components.sft.cli",
    "dpo": "components.dpo.cli",
    "evaluate": "components.evaluate.cli",
    "register": "components.register.cli",
}
STEPS: tuple[str, ...] = tuple(STEP_CLIS)


def step_key(step: str) -> str:
    """`prepare-data` (CLI spelling) or `prepare_data` (Python spelling) -> `prepare_data`; unknown steps fail."""
    key = step.replace("-", "_")
    if key not in STEP_CLIS:
        raise ValueError(f"unknown step {step!r}: expected one of {', '.join(sorted(STEP_CLIS))}")
    return key


def step_command(step: str) -> str:
    """The `vlmtune` subcommand of a step: `prepare_data` -> `prepare-data`."""
    return step_key(step).replace("_", "-")


def run_step(step: str, argv: Sequence[str]) -> int:
    """Run `vlmtune <step> <argv>` in this process (either spelling of the step); returns its exit status."""
    return importlib.import_module(STEP_CLIS[step_key(step)]).main(list(argv))
