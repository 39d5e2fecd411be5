"""The console view of a kfp.local run (pipelines/console.py), fed kfp.local's own output format: one line per
step with its figures, cached and skipped steps, a failed step's status and last lines, the full log on disk.
The real kfp output is read by tests/pipelines/test_local.py, which runs the pipeline through the console.

Run: pytest tests/pipelines/test_console.py -q
"""
from __future__ import annotations

import io
import logging
import sys

import pytest

from pipelines.console import StepConsole, failure_tail

CYAN, GREEN, RED, RESET = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"


def kfp_record(text: str) -> str:
    return f"13:31:19.272 - INFO - {text}\n"


def task_output(name: str, *lines: str, status: str = "SUCCESS", outputs: list[str] | None = None) -> str:
    """What kfp.local prints for one task (task_dispatcher.run_single_task_implementation)."""
    text = kfp_record(f"Executing task {CYAN}'{name}'{RESET}") + kfp_record("Streamed logs:\n")
    text += "".join(f"    {line}\n" for line in lines) + "\n\n"
    colour = GREEN if status == "SUCCESS" else RED
    text += kfp_record(f"Task {CYAN}'{name}'{RESET} finished with status {colour}{status}{RESET}")
    if status == "SUCCESS":
        text += kfp_record(f"Task {CYAN}'{name}'{RESET} outputs:\n" + "\n".join(outputs or []))
        text += "-" * 80 + "\n"
    return text


@pytest.fixture
def console(tmp_path):
    out = io.StringIO()
    figures = lambda task, outputs: f"figures of {task}: {sorted(outputs.items())}"  # noqa: E731
    c = StepConsole(tmp_path / "logs" / "run.log", out=out, interactive=False, figures=figures,
                    hints={"sft": {"epochs": 2.0, "max_steps": -1, "logging_steps": 1}})
    c.labels = {"prepare-data": "prepare SFT data", "sft": "SFT (QLoRA)", "register": "register"}
    c.conditions, c.condition_names, c.total = {"condition-1": ["register"]}, {"condition-1": "passed-gate"}, 3
    return c, out


def test_one_line_per_step_with_its_figures_and_everything_in_the_log(console, tmp_path):
    c, out = console
    with c.capture():
        print("building the tiny model", file=sys.stderr)
        sys.stdout.write(task_output("prepare-data", "prepare-data:  50%|#####     | 24/48 [00:00<00:00, 373.98row/s]",
                                     outputs=["    dataset: Dataset( name='dataset',",
                                              "                      uri='/root/run/prepare-data/dataset',",
                                              "                      metadata={'train_rows': '39'} )"]))
        sys.stdout.write(task_output("sft", "{'loss': '6.446', 'grad_norm': '4.6', 'epoch': '0.5'}",
                                     "{'loss': '5.475', 'grad_norm': '5.2', 'epoch': '1'}",
                                     outputs=["    model: Model( name='model',", "                  uri='/root/run/sft/model',",
                                              "                  metadata={} )"]))
        logging.getLogger().info("Skipping conditional task condition-1 (condition evaluated to False)")
    lines = out.getvalue().splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["[1/3]", "prepare", "SFT", "data"], ["[1/3]", "prepare", "SFT", "data"],
        ["[2/3]", "SFT", "(QLoRA)", "started"], ["[2/3]", "SFT", "(QLoRA)", "ok"],
        ["[3/3]", "register", "skipped", "the"]]
    assert lines[1].split()[4] == "ok"
    assert lines[1].endswith("figures of prepare-data: [('dataset', '/root/run/prepare-data/dataset')]")
    assert lines[3].endswith("figures of sft: [('model', '/root/run/sft/model')]")
    assert lines[4].split()[2] == "skipped" and lines[4].endswith("  the evaluation gate did not pass")
    assert c.tasks["sft"].progress == "epoch 1/2, loss 5.47" and c.tasks["sft"].fraction == 0.5
    assert c.tasks["prepare-data"].progress == "24/48 rows"
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "building the tiny model" in log and "{'loss': '5.475'" in log and "\x1b[" not in log


def test_cached_steps_say_so(console):
    c, out = console
    with c.capture():
        logging.getLogger().info("Task prepare-data cache hit (key=0123456789ab); skipping execution.")
    assert out.getvalue().split() == ["[1/3]", "prepare", "SFT", "data", "cached", "kfp's", "cache", "has", "this",
                                      "step's", "outputs"]


def test_a_failed_step_gives_its_status_message_and_last_lines(console):
    c, out = console
    with c.capture():
        sys.stdout.write(task_output(
            "sft", "[KFP Executor 2026 INFO]: Got executor_input:", "{", '    "inputs": {}', "}", "loading the model",
            "Traceback (most recent call last):", "TooManyRowsOverBudgetError: 39 of 39 rows exceed max_length=20",
            'vlmtune-step-failed: exit status 3: "39 of 39 rows exceed max_length=20"', status="FAILURE"))
    failure = c.failure()
    assert (failure.step, failure.status, failure.message) == ("SFT (QLoRA)", 3, "39 of 39 rows exceed max_length=20")
    assert failure.tail == ["loading the model", "Traceback (most recent call last):",
                            "TooManyRowsOverBudgetError: 39 of 39 rows exceed max_length=20"]
    assert failure.not_run == ["prepare SFT data", "register"] and failure.log_path == c.log_path
    assert out.getvalue().splitlines()[-1].endswith("exit status 3, see below")


def test_a_step_that_dies_without_a_marker_is_a_bug(console):
    c, _ = console
    with c.capture():
        sys.stdout.write(task_output("sft", "Killed", status="FAILURE"))
    failure = c.failure()
    assert failure.status == 1 and "Killed" in failure.message


def test_on_a_terminal_the_running_step_is_redrawn_in_place(tmp_path):
    out = io.StringIO()
    c = StepConsole(tmp_path / "run.log", out=out, interactive=True, hints={"sft": {"epochs": 4.0, "max_steps": -1}})
    c.labels, c.total = {"sft": "SFT (QLoRA)"}, 1
    with c.capture():
        sys.stdout.write(kfp_record("Executing task 'sft'") + "    {'loss': '2.5', 'epoch': '1'}\n")
        c._draw_live(c.current)
        sys.stdout.write(kfp_record("Task 'sft' finished with status SUCCESS") + kfp_record("Task 'sft' has no outputs"))
    text = out.getvalue()
    assert "\r\x1b[K  [1/1] SFT (QLoRA)" in text and "[#####...............]  25%  epoch 1/4, loss 2.5" in text
    assert text.split("\r\x1b[K")[-1].split()[3:5] == ["ok", "0.0"]  # the last redraw: the final status
    assert text.count("\n") == 1  # the redraws share one line


def test_verbose_streams_everything_and_adds_no_step_lines(tmp_path):
    out = io.StringIO()
    c = StepConsole(tmp_path / "run.log", out=out, verbose=True, interactive=False)
    with c.capture():
        sys.stdout.write(task_output("sft", "a step line", outputs=[]))
    assert out.getvalue().count("a step line") == 1 and "started" not in out.getvalue()


def test_failure_tail_drops_the_executor_input_json():
    assert failure_tail(["x", "[KFP] Got executor_input:", "{", "  1", "}", "y"]) == ["x", "y"]


def test_task_labels_come_from_the_real_pipeline_spec():
    from pipelines.console import task_labels
    from pipelines.pipeline import build_pipeline

    labels, inside, names = task_labels(build_pipeline())
    assert labels == {"prepare-data": "prepare SFT data", "prepare-data-2": "prepare preference data",
                      "sft": "SFT", "dpo": "DPO", "evaluate": "evaluate", "register": "register"}
    assert inside == {"condition-1": ["register"]} and names == {"condition-1": "passed-gate"}
