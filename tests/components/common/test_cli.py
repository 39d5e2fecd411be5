"""The CLI plumbing every step shares (components/common/cli.py): exit statuses, the failure line a KFP component
prints for `vlmtune run`, and third-party notices silenced by their exact text only.

Run: pytest tests/components/common/test_cli.py -q
"""
from __future__ import annotations

import logging
import warnings

import pytest

from components.common.cli import (
    EXIT_DATA,
    ErrorRule,
    exit_status,
    parse_failure_marker,
    quiet_known_notices,
    reported_failure,
    run_main,
)
from components.common.config import ConfigError


class OverLimit(RuntimeError):
    pass


def test_run_main_statuses(capsys):
    def bad_config():
        raise ConfigError("invalid X: lr: expected a number")

    assert run_main(bad_config, prefix="vlmtune x") == 2
    assert capsys.readouterr().err == "vlmtune x: invalid X: lr: expected a number\n"

    def over():
        raise OverLimit("12 of 100 rows are invalid")

    assert run_main(over, rules=(ErrorRule((OverLimit,), EXIT_DATA),)) == 3
    assert run_main(lambda: None) == 0

    def bug():
        raise KeyError("oops")

    with pytest.raises(KeyError):  # a bug is not dressed up as bad input
        run_main(bug)


def test_reported_failure_prints_one_parsable_line_and_reraises(capsys):
    with pytest.raises(OverLimit):
        with reported_failure(rules=(ErrorRule((OverLimit,), EXIT_DATA),)):
            raise OverLimit("too many\nbad rows")
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and parse_failure_marker("    " + line) == (3, "too many\nbad rows")
    with pytest.raises(ZeroDivisionError):
        with reported_failure():
            1 / 0
    assert parse_failure_marker(capsys.readouterr().err) == (1, "ZeroDivisionError: division by zero")
    assert parse_failure_marker("vlmtune-step-failed is mentioned here") is None
    assert exit_status(FileNotFoundError()) == 2 and exit_status(OverLimit()) == 1


def test_known_notices_are_silenced_by_exact_text_only(caplog):
    quiet_known_notices()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    tf = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", ImportError("No module named 'kernels'"))
        bnb.warning("Failed to load CPU gemm_4bit_forward: something else")
        tf.warning("`Idefics3ImageProcessor` requires torchvision (not installed); falling back to "
                   "`Idefics3ImageProcessorPil` for backward compatibility. Install torchvision to use the default "
                   "backend, or import `Idefics3ImageProcessorPil` directly to silence this warning.")
        tf.warning("`Idefics3ImageProcessor` requires torchvision (not installed); and something new happened.")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load CPU gemm_4bit_forward: something else",
        "`Idefics3ImageProcessor` requires torchvision (not installed); and something new happened."]

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_notices()  # after simplefilter: the filters go in front of it
        warnings.warn("Task 'sft': settings ['display_name'] have no effect in the current local runner and will be "
                      "ignored.", UserWarning)
        warnings.warn("Task 'sft': settings ['accelerator', 'display_name'] have no effect in the current local "
                      "runner and will be ignored.", UserWarning)
        warnings.warn('You may be attemping to run a task that uses custom or non-Python base image "x/y:1" in a '
                      'Python environment. This may result in incorrect dependencies and/or incorrect behavior. '
                      'Consider using the "DockerRunner" to run this task in a container.', RuntimeWarning)
    assert [str(w.message) for w in seen] == [
        "Task 'sft': settings ['accelerator', 'display_name'] have no effect in the current local runner and will be "
        "ignored."]
