"""One run of the demo's settings search (docs/demo_tuning.md): build, prepare, SFT, evaluate; figures as JSON.

    python benchmarks/demo_search.py --workdir W [--model '{"patch_size": 8}'] [--set learning_rate=1e-3 ...]
        [--rows 1200] [--dpo] [--dpo-set learning_rate=1e-5 ...]

It runs the step CLIs exactly as the pipeline's containers do (``vlmtune prepare-data | sft | dpo | evaluate``)
on the demo's tiny model (``pipelines/demo.py`` DEMO_MODEL, with ``--model`` overrides) and data, with
demo.yaml's configs under the ``--set`` overrides. Held-out exact match per category comes from evaluate's
metrics; ``sft_cpu_s`` is the SFT process's user+system time (fair when runs share the cores; wall is not).
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cli(*args: str) -> tuple[float, float]:
    """Run ``vlmtune ARGS``; (wall s, CPU s of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - start, cpu


def _config_file(path: Path, section: dict) -> Path:
    path.write_text(yaml.safe_dump(section))
    return path


def _overrides(sets: list[str]) -> list[str]:
    """``--set KEY=VALUE`` for the step CLI, which parses and checks each against its config class."""
    return [arg for item in sets for arg in ("--set", item)]


def main() -> None:
    from components.common.demo_data import write_demo_data
    from components.common.tiny_model import build_tiny_model
    from pipelines.demo import DEMO_MODEL, DEMO_ROWS, DEMO_SEED, demo_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--model", default="{}", help="JSON of build_tiny_model keywords over DEMO_MODEL")
    ap.add_argument("--rows", type=int, default=DEMO_ROWS)
    ap.add_argument("--data", default="{}", help="JSON of write_demo_data keywords (question_cycle, extent_range)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="sft_config KEY=VALUE (YAML value)")
    ap.add_argument("--dpo", action="store_true", help="also run DPO on the SFT model and score it")
    ap.add_argument("--dpo-set", dest="dpo_sets", action="append", default=[], help="dpo_config KEY=VALUE")
    args = ap.parse_args()

    w = args.workdir.absolute()
    w.mkdir(parents=True, exist_ok=True)
    config = demo_config()
    model_knobs = {**DEMO_MODEL, **json.loads(args.model)}
    build_tiny_model(w / "model", seed=DEMO_SEED, **model_knobs)
    data_knobs = json.loads(args.data)
    write_demo_data(w / "data", rows=args.rows, preference_rows=max(args.rows // 3, 40), seed=DEMO_SEED, **data_knobs)
    prep = _config_file(w / "prepare.yaml", config["prepare_config"])
    figures: dict = {"model": model_knobs, "rows": args.rows, "data": data_knobs, "sft_set": args.sets, "dpo_set": args.dpo_sets}
    for task in ("sft", "preference"):
        _cli("prepare-data", "--source", str(w / "data" / task), "--output", str(w / f"prep-{task}"), "--task", task,
             "--processor", str(w / "model"), "--config", str(prep), "--no-progress")
    sft_cfg = _config_file(w / "sft.yaml", config["sft_config"])
    figures["sft_wall_s"], figures["sft_cpu_s"] = _cli(
        "sft", "--dataset", str(w / "prep-sft"), "--output", str(w / "sft"), "--base-model", str(w / "model"),
        "--config", str(sft_cfg), *_overrides(args.sets))
    models = ["--model", f"sft={w / 'sft'}"]
    if args.dpo:
        dpo_cfg = _config_file(w / "dpo.yaml", config["dpo_config"])
        figures["dpo_wall_s"], figures["dpo_cpu_s"] = _cli(
            "dpo", "--dataset", str(w / "prep-preference"), "--sft-model", str(w / "sft"),
            "--sft-dataset", str(w / "prep-sft"), "--output", str(w / "dpo"), "--config", str(dpo_cfg),
            *_overrides(args.dpo_sets))
        models += ["--model", f"dpo={w / 'dpo'}"]
    eval_cfg = _config_file(w / "eval.yaml", {**config["eval_config"], "min_delta": 0.0})
    _cli("evaluate", "--dataset", str(w / "prep-sft"), "--base-model", str(w / "model"), *models,
         "--output", str(w / "eval"), "--config", str(eval_cfg))
    metrics = json.loads((w / "eval" / "metrics.json").read_text())
    for name, by_metric in metrics["by_model"].items():
        em = by_metric["exact_match"]
        figures[name] = {"overall": round(em["score"], 3),
                         **{c: round(v["score"], 3) for c, v in (em.get("per_category") or {}).items()}}
    print(json.dumps(figures, sort_keys=True, default=str))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
