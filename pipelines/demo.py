"""``vlmtune demo`` and ``vlmtune run``: the whole job on one machine with kfp.local.

``vlmtune demo`` builds the tiny model and the synthetic data if absent, runs the pipeline and writes
``WORKDIR/summary.json`` with the held-out accuracies, the gate and the registered version. ``vlmtune run``
does the same with the run's own parameters (``--config FILE``, ``--set``) on top of the same defaults.

Order matters: the parameters are merged and checked first (:func:`resolve_run_params`, through
``pipelines.params.resolve_params``, the check ``vlmtune submit`` runs too), so a typo fails in a second with
nothing built and nothing written; only then are the default inputs built and the pipeline run. While it runs
the console shows one line per step (``pipelines/console.py``) and the full logs go to
``WORKDIR/logs/run-YYYYmmdd-HHMMSS.log``.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from components.common import artifacts
from components.common.cli import EXIT_BUG, EXIT_OK
from pipelines import configs

#: How messages name the shipped defaults (the file in the source tree; installed, it is package data).
DEMO_CONFIG = "pipelines/configs/demo.yaml"
DEMO_ROWS, DEMO_SEED = 1200, 0
# The demo's base model: the tiny Idefics3 with 16 tokens per 64 px tile (scale factor 1: each 16 px patch keeps
# its own token, so shapes and positions survive the connector) and a 4 x 128 text model. Chosen by
# measurement (docs/demo_tuning.md); `vlmtune tiny-model` and the tests keep the smaller default.
DEMO_MODEL = {"scale_factor": 1, "text_layers": 4, "text_hidden_size": 128}
README_START, README_END = "<!-- demo-table:start (written by `vlmtune demo --write-readme`) -->", "<!-- demo-table:end -->"


def demo_config() -> dict[str, Any]:
    """The shipped run defaults, ``pipelines/configs/demo.yaml`` (package data, so an installed copy has it)."""
    return configs.load("demo.yaml")


def default_inputs(workdir: Path) -> dict[str, str]:
    """Where the embedded defaults live in ``workdir`` (built by :func:`ensure_demo_inputs` when needed)."""
    workdir = Path(workdir).absolute()
    return {
        "base_model": str(workdir / "tiny-model"),
        "sft_source": str(workdir / "demo-data" / "sft"),
        "preference_source": str(workdir / "demo-data" / "preference"),
        "registry": str(workdir / "registry"),
    }


def ensure_demo_inputs(workdir: Path, rows: int = DEMO_ROWS, seed: int = DEMO_SEED,
                       needed: tuple[str, ...] = ("base_model", "sft_source", "preference_source")) -> list[str]:
    """Build the tiny model and/or the demo data in ``workdir`` if absent; returns what was built."""
    from components.common.demo_data import write_demo_data
    from components.common.tiny_model import build_tiny_model

    workdir = Path(workdir)
    model_dir, data_dir = workdir / "tiny-model", workdir / "demo-data"
    built = []
    if "base_model" in needed and not (model_dir / "vlmtune_tiny_model.json").exists():
        build_tiny_model(model_dir, seed=seed, **DEMO_MODEL)
        built.append("tiny model")
    if {"sft_source", "preference_source"} & set(needed) and not (data_dir / "DONE").exists():
        write_demo_data(data_dir, rows=rows, preference_rows=max(rows // 3, 40), seed=seed)
        built.append(f"demo data ({rows} + {max(rows // 3, 40)} rows)")
    return built


def default_params(workdir: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's parameters with its inputs built (the Python API's shortcut; the CLI checks first)."""
    config = config or demo_config()
    ensure_demo_inputs(Path(workdir))
    return {**default_inputs(Path(workdir)), "registry_name": config.get("registry_name", "demo-shapes"),
            **{k: config.get(k, {}) for k in ("prepare_config", "sft_config", "dpo_config", "eval_config")}}


def resolve_run_params(workdir: Path, config_file: str | None = None, sets: list[str] | None = None
                       ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(the run's checked parameters, the default inputs still to build). Layers, later wins: demo.yaml, the
    embedded inputs in ``workdir``, ``--config FILE``, each ``--set``. Raises ``ParamsError`` with every problem;
    builds and writes nothing."""
    from pipelines.params import pipeline_parameters, resolve_params

    defaults = default_inputs(workdir)
    params = resolve_params(pipeline_parameters(), "local", layers=[(demo_config(), DEMO_CONFIG), (defaults, None)],
                            params_file=config_file, sets=sets, flag="--config", will_exist=defaults)
    to_build = tuple(k for k in ("base_model", "sft_source", "preference_source") if params.get(k) == defaults[k])
    for key in ("base_model", "sft_source", "preference_source", "registry"):
        # Steps run in subprocesses: hand them absolute paths (hub ids and gs:// URIs pass through).
        value = params.get(key)
        if isinstance(value, str) and "://" not in value and (Path(value).expanduser().exists() or key == "registry"):
            params[key] = str(Path(value).expanduser().absolute())
    return params, to_build


# ------------------------------------------------------------------------------------------ the console

def _manifest(uri: str | None) -> dict[str, Any]:
    try:
        return artifacts.read_manifest(uri) if uri else {}
    except (artifacts.IncompleteArtifactError, OSError):
        return {}


def step_figures(task: str, outputs: dict[str, str], params: dict[str, Any] | None = None) -> str:
    """The key figures of a finished pipeline task, from its outputs (artifact URIs and values)."""
    if task.startswith("prepare-data"):
        m = _manifest(outputs.get("dataset"))
        counts, splits = m.get("counts", {}), m.get("splits", {})
        rejected = sum(int(e.get("count", 0)) for e in (m.get("rejects") or {}).values() if isinstance(e, dict))
        if not counts:
            return ""
        return (f"{counts.get('rows_out')} of {counts.get('rows_in')} rows: train {splits.get('train', {}).get('rows')}, "
                f"eval {splits.get('eval', {}).get('rows')}" + (f", {rejected} rejected" if rejected else ""))
    if task in ("sft", "dpo"):
        metrics = _manifest(outputs.get("model")).get("metrics", {})
        if not metrics:
            return ""
        first, last = metrics.get("first_logged_loss"), metrics.get("last_logged_loss")
        loss = f"loss {first:.3g} -> {last:.3g}" if first is not None and last is not None else f"loss {metrics.get('train_loss', 0):.3g}"
        first_eval, last_eval = metrics.get("first_eval_loss"), metrics.get("last_eval_loss")
        if first_eval is not None and last_eval is not None:
            loss += f", eval loss {first_eval:.3g} -> {last_eval:.3g}"
        return f"{metrics.get('global_steps')} steps on {metrics.get('train_rows')} rows, {loss}"
    if task == "evaluate":
        m = _manifest(outputs.get("evaluation"))
        if not m:
            return ""
        metric, order = m.get("primary_metric", ""), ["base", "sft", "dpo", "champion"]
        models = sorted(m.get("models", []), key=lambda n: order.index(n) if n in order else len(order))
        scores = ", ".join(f"{name} {m['metrics'][f'{name}_{metric}']:.3f}" for name in models
                           if f"{name}_{metric}" in m.get("metrics", {}))
        return f"{metric}: {scores}; gate {'passed' if m.get('passed') else 'not passed'}"
    if task == "register":
        name = f"{params.get('registry_name')} " if params else ""
        return f"{name}v{outputs.get('version', '?')} in {params.get('registry')}" if params else f"version {outputs.get('version', '?')}"
    return ""


def progress_hints(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the console needs to size progress bars: epochs or steps per training step, models evaluated."""
    from components.dpo.config import DPOStepConfig
    from components.sft.config import SFTStepConfig

    hints = {}
    for task, cls, section in (("sft", SFTStepConfig, "sft_config"), ("dpo", DPOStepConfig, "dpo_config")):
        defaults = cls()
        values = {**{k: getattr(defaults, k) for k in ("num_train_epochs", "max_steps", "logging_steps")},
                  **(params.get(section) or {})}
        hints[task] = {"epochs": float(values["num_train_epochs"]), "max_steps": int(values["max_steps"]),
                       "logging_steps": int(values["logging_steps"])}
    hints["evaluate"] = {"models": 3 + (1 if Path(str(params.get("registry", "")), str(params.get("registry_name", ""))).exists() else 0)}
    return hints


def log_path_for(workdir: Path, now: dt.datetime | None = None) -> Path:
    return Path(workdir) / "logs" / f"run-{(now or dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}.log"


def report_failure(failure, out=None) -> None:
    """A failed step on the terminal: what failed and why, its last lines, and where the whole log is."""
    import sys

    out = out or sys.stderr
    print(f"\nerror: {failure.step} failed (exit status {failure.status}): {failure.message}", file=out)
    if failure.not_run:
        print(f"not run: {', '.join(failure.not_run)}", file=out)
    if failure.tail:
        print("last lines of its log:", file=out)
        for line in failure.tail:
            print(f"  | {line}", file=out)
    if failure.log_path:
        print(f"full log: {failure.log_path}", file=out)


def execute(params: dict[str, Any], workdir: Path, *, title: str, to_build: tuple[str, ...] = (),
            runner: str = "subprocess", caching: bool = True, gpus: str | None = None, verbose: bool = False,
            out=None) -> tuple[int, dict[str, Any] | None]:
    """Build what is still missing, run the pipeline with the console view, write ``summary.json``.
    Returns (exit status, summary or None): a failed step's own status (2 its input, 3 its data), else 1."""
    import sys

    from pipelines.console import StepConsole, StepFailed
    from pipelines.local import run_local

    out = out or sys.stdout
    workdir = Path(workdir).absolute()
    started = time.time()
    log_path = log_path_for(workdir)
    console = StepConsole(log_path, verbose=verbose, out=out, hints=progress_hints(params),
                          figures=lambda task, outputs: step_figures(task, outputs, params))
    console.say(f"{title}; full log: {log_path}")
    try:
        with console.capture():
            if to_build:
                with console.step("demo inputs") as info:
                    built = ensure_demo_inputs(workdir, needed=to_build)
                    info["figures"] = ("built " + ", ".join(built)) if built else f"found in {workdir}"
            outputs = run_local(params, workdir / "pipeline-root", runner=runner, caching=caching, gpus=gpus,
                                console=console)
            summary = summarize(outputs, params, time.time() - started)
    except StepFailed as failure:
        report_failure(failure)
        return failure.status, None
    except Exception as error:  # a bug of ours or of kfp: its traceback goes to the log
        import traceback

        with open(log_path, "a", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        report_failure(console.failure(error))
        return EXIT_BUG, None
    summary["log"] = str(log_path)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, out=out)
    return EXIT_OK, summary


def summarize(outputs: dict[str, Any], params: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    from components.common.registry import open_registry

    evaluation = artifacts.read_manifest(outputs["evaluation"], kind="vlmtune.evaluation")
    metrics = json.loads(Path(outputs["evaluation"], "metrics.json").read_text())
    scores = metrics["scores"]
    model_path = str(Path(outputs["model"]).absolute())
    # The registered version is the one holding this run's model: found by content hash, which stays the same
    # when the registry keeps its own copy of the model (its model_uri then points into the registry).
    content_hash = _manifest(outputs["model"]).get("content_hash")
    registered = None
    for version in open_registry(params["registry"]).list_versions(params["registry_name"]):
        # The registry serves its own copy (model_uri points into it); source_uri is the folder it came from.
        if (content_hash and version.content_hash == content_hash) or \
                str(version.source_uri or version.model_uri).rstrip("/") == model_path.rstrip("/"):
            registered = version.version
    return {
        "base_accuracy": scores.get("base"),
        "sft_accuracy": scores.get("sft"),
        "dpo_accuracy": scores.get("dpo"),
        "champion_accuracy": scores.get("champion"),
        "metric": metrics["primary_metric"],
        "eval_rows": metrics["eval_rows"],
        "per_category": {name: {c: v["score"] for c, v in metrics["by_model"][name][metrics["primary_metric"]]["per_category"].items()}
                         for name in scores},
        "passed": evaluation["passed"],
        "reasons": evaluation["reasons"],
        "registered_version": registered,
        "registry": params["registry"],
        "model": model_path,
        "report": str(Path(outputs["evaluation"], "report.html")),
        "wall_seconds": round(wall_seconds, 1),
    }


def print_summary(summary: dict[str, Any], out=None) -> None:
    import sys

    out = out or sys.stdout
    print(f"\nheld-out {summary['metric']} on {summary['eval_rows']} rows:", file=out)
    print(f"  {'model':<10}{'score':>8}", file=out)
    for name in ("base", "sft", "dpo", "champion"):
        value = summary.get(f"{name}_accuracy")
        if value is not None:
            print(f"  {name:<10}{value:>8.3f}", file=out)
    print(f"  gate passed: {summary['passed']}   registered version: {summary['registered_version']}", file=out)
    print(f"  report: {summary['report']}", file=out)
    print(f"  wall time: {summary['wall_seconds']} s", file=out)
    if summary.get("log"):
        print(f"  full log: {summary['log']}", file=out)


def run_demo(workdir: str | Path, caching: bool = True, verbose: bool = False) -> tuple[int, dict[str, Any] | None]:
    """The demo: checked defaults, inputs built if absent, the pipeline run. Returns (exit status, summary)."""
    workdir = Path(workdir).absolute()
    params, to_build = resolve_run_params(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return execute(params, workdir, title="vlmtune demo: tiny model + synthetic shapes data, kfp.local on this machine",
                   to_build=to_build, caching=caching, verbose=verbose)


# ------------------------------------------------------------------------------------ README figures

def readme_block(first: dict[str, Any], second: dict[str, Any], *, date: str, machine: str) -> str:
    """The README's demo section between its markers, from the summaries of a first run and a cached rerun."""
    def row(label: str, s: dict[str, Any], note: str, same: str = "") -> str:
        version = f"v{s['registered_version']}{same}" if s.get("registered_version") else "none"
        return (f"| {label} | {s['base_accuracy']:.3f} | {s['sft_accuracy']:.3f} | {s['dpo_accuracy']:.3f} | "
                f"{'passed' if s['passed'] else 'not passed'} | {version} | {s['wall_seconds']:.1f} s ({note}) |")

    same = " (same)" if second.get("registered_version") == first.get("registered_version") else ""
    per_category = "; ".join(
        f"{model} " + ", ".join(f"{c} {v:.2f}" for c, v in cats.items())
        for model, cats in first["per_category"].items())
    return "\n".join([
        README_START,
        f"Measured {date} on {machine} (`vlmtune demo --write-readme README.md`: a first run in a fresh workdir, then",
        f"a second `vlmtune demo` process in the same workdir, timed from outside), {first['metric']} on the {first['eval_rows']} held-out rows:",
        "",
        "| | base | sft | dpo | gate | registered | wall time |",
        "|---|---|---|---|---|---|---|",
        row("first run", first, "tiny model and data built, all steps run"),
        row("second run", second, "every step from kfp's cache", same),
        "",
        f"Per question type: {per_category}.",
        README_END,
    ])


def write_readme(readme: str | Path, block: str) -> None:
    """Replace the text between the demo markers of ``readme`` with ``block`` (markers included)."""
    path = Path(readme)
    text = path.read_text()
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{str(path)!r} has no demo markers: put {README_START!r} and {README_END!r} where the "
                         f"demo table goes")
    path.write_text(pattern.sub(lambda _: block, text, count=1))


def machine_description() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"a {os.cpu_count()}-core machine (load average {load:.1f} when it started)"


def demo_for_readme(workdir: str | Path, readme: str | Path, verbose: bool = False) -> int:
    """Run the demo twice in a fresh ``workdir`` (a first run, then one from kfp's cache) and write the demo
    table between the markers of ``readme``. The figures come from the runs; nothing is typed by hand."""
    workdir = Path(workdir).absolute()
    if workdir.exists() and any(workdir.iterdir()):
        raise ValueError(f"--write-readme measures a first run: --workdir {str(workdir)!r} is not empty; "
                         f"give a new folder")
    text = Path(readme).read_text() if Path(readme).is_file() else ""
    if README_START not in text or README_END not in text:
        raise ValueError(f"--write-readme {str(readme)!r}: no demo markers in it ({README_START!r} ... {README_END!r})")
    date, machine = dt.date.today().isoformat(), machine_description()
    status, first = run_demo(workdir, caching=True, verbose=verbose)
    if status != EXIT_OK:
        return status
    # The second run is a fresh process, timed from outside, as a user's second `make demo` is: kfp's cache
    # makes the pipeline itself take milliseconds, the interpreter and imports are what remains.
    started = time.time()
    rerun = subprocess.run([sys.executable, "-m", "pipelines.cli", "demo", "--workdir", str(workdir)],
                           capture_output=not verbose, text=True)
    if rerun.returncode != EXIT_OK:
        print(rerun.stdout or "", rerun.stderr or "", sep="", end="")
        return rerun.returncode
    second = {**json.loads((workdir / "summary.json").read_text()), "wall_seconds": round(time.time() - started, 1)}
    write_readme(readme, readme_block(first, second, date=date, machine=machine))
    print(f"demo table written to {readme}")
    return EXIT_OK
