"""Run the benchmarks and write the README's benchmark table from their own output, so no figure is retyped.

    python benchmarks/readme_figures.py                       # run every benchmark, rewrite the table
    python benchmarks/readme_figures.py --only generate       # rerun one; the others keep their saved results
    python benchmarks/readme_figures.py --render-only         # rewrite the table from the saved results

Each benchmark prints one JSON object on its last line; that line is saved, with the date, the command and the
machine's load, as ``benchmarks/results/<name>.json`` (committed, so a reader can check every figure against
the run it came from), and the table between the README's ``benchmarks`` markers is rendered from those files.
The machine is shared and noisy: ratios are within one run of each benchmark (both contenders side by side),
absolute figures depend on the load, which the table states.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
START = "<!-- benchmarks:start (written by `python benchmarks/readme_figures.py`) -->"
END = "<!-- benchmarks:end -->"


def _mb(value: float) -> str:
    return f"{value:,.0f} MB"


def _rows_prepare(r: dict[str, Any]) -> list[list[str]]:
    # Wall-clock figures depend on what else the machine runs; images per CPU-second (all processes) do not,
    # and x cores they estimate an idle machine: both are shown, from the same run.
    idle = f"; {r['ratio_idle_estimate']}x from CPU time (the idle-machine estimate)"
    return [
        [f"prepare-data, {r['rows']:,} photos 1024x768 JPEG (mixed modes, EXIF, CMYK, RGBA) → SmolVLM {r['longest_edge']} px",
         f"{r['ours_images_per_s']} images/s ({r['ours_images_per_cpu_s']} per CPU-second), "
         f"{_mb(r['ours_peak_rss_mb'])} peak RSS",
         f"seed way (`datasets.map` + PIL, one process, PNG): {r['seed_images_per_s']} images/s "
         f"({r['seed_images_per_cpu_s']} per CPU-second), {_mb(r['seed_peak_rss_mb'])}",
         f"**{r['ratio']}x** wall{idle}"],
        ["same, baseline writing JPEG like ours", f"{r['ours_images_per_s']} images/s",
         f"{r['seed_jpeg_images_per_s']} images/s ({r['seed_jpeg_images_per_cpu_s']} per CPU-second), "
         f"{_mb(r['seed_jpeg_peak_rss_mb'])}",
         f"{r['ratio_vs_seed_jpeg']}x wall; {r['ratio_vs_seed_jpeg_idle_estimate']}x from CPU time "
         f"(cores cap this at {r['cores']}x)"],
        ["prepare-data vs plain Pillow decode+resize+encode × cores", f"{r['ours_images_per_s']} images/s",
         f"limit {r['pillow_limit_images_per_s']} images/s",
         f"**{r['fraction_of_limit']:.0%}** of the limit wall; {r['fraction_of_limit_cpu']:.0%} per CPU-second"],
        [f"prepare-data peak RSS, {r['ours_small_rows']:,} → {r['rows']:,} rows",
         f"{r['ours_small_peak_rss_mb']:,.0f} → {r['ours_peak_rss_mb']:,.0f} MB", "", f"{r['rss_growth_10x']}x"],
    ]


def _rows_generate(r: dict[str, Any]) -> list[list[str]]:
    same = "identical answers" if r["answers_identical"] else f"{r['answers_differing']} answers differ"
    return [[f"batched generation ({r['rows']} rows, batch {r['batch_size']})",
             f"{r['batched_samples_per_s']} samples/s", f"one prompt at a time: {r['one_by_one_samples_per_s']} samples/s",
             f"**{r['ratio']}x** ({same})"]]


def _rows_train(r: dict[str, Any]) -> list[list[str]]:
    ours, seed, no_gc = r["ours"], r["seed"], r["seed_no_gc"]
    return [
        [f"SFT throughput, tiny model, mixed image sizes and answer lengths ({r['rows']} rows, batch {r['batch_size']}, "
         f"best of {r['repeats']} interleaved runs)",
         f"{ours['tokens_per_s']:,.0f} tokens/s, {ours['padded_tokens_per_real_token']:.3f} padded per real token, "
         f"{_mb(ours['peak_memory_bytes'] / 2**20)}",
         f"TRL `SFTTrainer`, seed settings: {seed['tokens_per_s']:,.0f} tokens/s, "
         f"{seed['padded_tokens_per_real_token']:.3f} padded/real, {_mb(seed['peak_memory_bytes'] / 2**20)}",
         f"**{r['ratio']:.2f}x** tokens/s"],
        ["same, seed with gradient checkpointing off", f"{ours['tokens_per_s']:,.0f} tokens/s",
         f"{no_gc['tokens_per_s']:,.0f} tokens/s",
         f"{r['ratio_vs_seed_without_gradient_checkpointing']:.2f}x (end to end incl. our length pass: "
         f"{r['end_to_end_ratio']:.2f}x vs the seed settings)"],
    ]


def _rows_tokens(r: dict[str, Any]) -> list[list[str]]:
    proc = r["processor"]
    small = min((x for x in r["tokens_per_image"] if x["size"] == "128x128"), key=lambda x: x["need"], default=None)
    rows = [[f"image tokens, {r['images']} images 64-4,000 px at SmolVLM-256M's processor ({proc['longest_edge']} px, "
             f"{proc['tile']} px tiles, {proc['tokens_per_tile']} tokens a tile)",
             f"need-based (default): {r['tokens_need_total']:,} tokens"
             + (f"; a 128 px image {small['need']}" if small else ""),
             f"processor's fixed size: {r['tokens_fixed_total']:,} tokens" + (f"; a 128 px image {small['fixed']}" if small else ""),
             f"**{r['ratio']}x** fewer; one-tile images >= {r['small_images_min_ratio']}x; above the cap "
             + ("unchanged" if r["above_cap_unchanged"] else "CHANGED")]]
    for size, e in r["sft_step"].items():
        rows.append([f"SFT step, {size} image ({r['model']})",
                     f"{e['need']['wall_s_per_step']} s ({e['need']['cpu_s_per_step']} CPU-s), {e['need']['tiles']} tiles",
                     f"{e['fixed']['wall_s_per_step']} s ({e['fixed']['cpu_s_per_step']} CPU-s), {e['fixed']['tiles']} tiles",
                     f"**{e['ratio_cpu']}x** CPU time ({e['ratio_wall']}x wall)"])
    return rows
def _rows_fanout(r: dict[str, Any]) -> list[list[str]]:
    return [[f"prepare-data fanned out: {r['items']} items x 1 worker at once vs one container x 1 worker "
             f"({r['rows']:,} images of varied sizes → {r['longest_edge']} px, same content hash)",
             f"{r['fanout_wall_s']} s, {r['fanout_cpu_s']} CPU-s, peak RSS per item "
             f"{max(r['peak_rss_per_item_mb']):,.0f} MB",
             f"one container: {r['single_wall_s']} s, {r['single_cpu_s']} CPU-s, {r['single_peak_rss_mb']:,.0f} MB",
             f"**{r['speedup']}x** wall, parallel efficiency {r['parallel_efficiency']:.0%} "
             f"(ceiling {r['cores']}x on {r['cores']} cores)"]]


def _rows_gradient_checkpointing(r: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, case in r["cases"].items():
        off, on = case["off"], case["on"]
        rows.append([f"gradient checkpointing on CPU, {name} (QLoRA SFT, batch {r['batch_size']}, "
                     f"{on['real_tokens_per_sample']:.0f} tokens/sample, 1 thread)",
                     f"on: {on['cpu_s_per_step']:.2f} CPU-s/step, {_mb(on['peak_rss_mb'])} peak RSS",
                     f"off: {off['cpu_s_per_step']:.2f} CPU-s/step, {_mb(off['peak_rss_mb'])}",
                     f"time **{case['cpu_time_ratio_on_vs_off']:.2f}x**, RSS **{case['peak_rss_ratio_on_vs_off']:.2f}x**"])
    return rows


#: name -> (command, rows of the table from its JSON). Commands run from the repository root.
BENCHMARKS: dict[str, tuple[list[str], Callable[[dict], list[list[str]]]]] = {
    "prepare_data": (["benchmarks/prepare_data.py", "--rows", "2000"], _rows_prepare),
    "generate": (["benchmarks/generate.py"], _rows_generate),
    "train_throughput": (["benchmarks/train_throughput.py"], _rows_train),
    "tokens": (["benchmarks/tokens.py"], _rows_tokens),
    "prepare_fanout": (["benchmarks/prepare_fanout.py", "--rows", "2000"], _rows_fanout),
    "gradient_checkpointing": (["benchmarks/gradient_checkpointing.py", "--steps", "2"], _rows_gradient_checkpointing),
}


def run_benchmark(name: str) -> dict[str, Any]:
    command, _ = BENCHMARKS[name]
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{name}: `python {' '.join(command)}` failed (exit {proc.returncode})")
    result = json.loads(lines[-1])
    record = {"command": "python " + " ".join(command), "date": dt.date.today().isoformat(),
              "cores": os.cpu_count(), "load_average_at_start": round(load, 2), "result": result}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def render() -> str:
    lines = [START, "", "| what | ours | baseline (seed notebooks' way) | ratio | command (date, load at start) |",
             "|---|---|---|---|---|"]
    for name, (_, rows_of) in BENCHMARKS.items():
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            lines.append(f"| {name} | not measured yet | | | `python benchmarks/readme_figures.py --only {name}` |")
            continue
        record = json.loads(path.read_text())
        where = f"`{record['command']}` ({record['date']}, {record['cores']} cores, load {record['load_average_at_start']})"
        for i, row in enumerate(rows_of(record["result"])):
            lines.append("| " + " | ".join([*row, where if i == 0 else "same run"]) + " |")
    lines += ["", END]
    return "\n".join(lines)


def write_readme(block: str, readme: Path = README) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no benchmark markers ({START!r} ... {END!r})")
    readme.write_text(pattern.sub(lambda _: block, text, count=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only these (repeatable)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from the saved results")
    args = parser.parse_args(argv)
    if not args.render_only:
        for name in args.only or list(BENCHMARKS):
            print(f"running {name} ...", flush=True)
            run_benchmark(name)
    write_readme(render())
    print(f"benchmark table written to {README}")
    print(json.dumps({name: json.loads((RESULTS / f"{name}.json").read_text())["result"].get("ratio")
                      for name in BENCHMARKS if (RESULTS / f"{name}.json").is_file()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
