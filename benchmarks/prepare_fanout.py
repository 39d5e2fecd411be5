"""prepare-data fanned out vs one container: N items with one image worker each, run at the same time as
separate processes (as a ParallelFor runs pods), against one container-shape run with one image worker, on the
same source of photo-like images of varied sizes (so resizing does real work). Both outputs must have the same
content hash (checked, not assumed).

    python benchmarks/prepare_fanout.py --rows 2000 [--items N (default: the cores)]

Prints one JSON line last: speed-up (wall), parallel efficiency (speed-up / items), images/s per core,
CPU seconds of each shape, peak RSS per item. On a machine shared with other jobs wall times are pessimistic;
the CPU seconds say how much work each shape did.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _make_image(i: int, folder: str) -> dict:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    w, h = int(rng.integers(300, 1600)), int(rng.integers(300, 1200))
    base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(4):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(20, 150))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    rel = f"images/{i:06d}.{'png' if i % 10 == 0 else 'jpg'}"
    base.save(Path(folder) / rel, **({"compress_level": 1} if rel.endswith("png") else {"quality": 90}))
    return {"id": f"img-{i:06d}", "image": rel, "question": "What is in the picture?", "answer": f"shapes {i % 7}"}


def make_source(folder: Path, rows: int) -> Path:
    done = folder / f"DONE-{rows}"
    if done.exists():
        return folder
    from concurrent.futures import ProcessPoolExecutor

    (folder / "images").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(cores()) as pool:
        records = list(pool.map(_make_image, range(rows), [str(folder)] * rows, chunksize=16))
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done.write_text("ok")
    return folder


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "components.prepare_data.cli", *args]


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen) -> dict:
    """Exit status, CPU seconds and peak RSS of one process and its workers (``wait4``'s rusage)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{proc.args} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--items", type=int, default=None, help="work items run at once (default: the cores)")
    parser.add_argument("--longest-edge", type=int, default=768)
    parser.add_argument("--workdir", default="/tmp/vlmtune-bench-fanout")
    args = parser.parse_args(argv)
    items = args.items or cores()
    work = Path(args.workdir)
    source = make_source(work / f"source-{args.rows}", args.rows)
    flags = ["--num-workers", "1", "--longest-edge", str(args.longest_edge)]
    run = work / "runs"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir(parents=True)

    started = time.perf_counter()
    single = _wait(_start(_cli("--source", str(source), "--output", str(run / "single"), "--no-progress", *flags)))
    single_wall = time.perf_counter() - started

    plan = str(run / "plan.json")
    started = time.perf_counter()
    plan_usage = _wait(_start(_cli("plan", "--source", str(source), "--plan", plan, "--shards", str(items), *flags)))
    parts = [str(run / f"part-{i}") for i in range(items)]
    procs = [_start(_cli("part", "--plan", plan, "--item", str(i), "--output", parts[i])) for i in range(items)]
    part_usage = [_wait(p) for p in procs]
    final_usage = _wait(_start(_cli("finalize", "--plan", plan, "--parts", *parts, "--output", str(run / "fanout"))))
    fanout_wall = time.perf_counter() - started

    m1 = json.loads((run / "single" / "manifest.json").read_text())
    mn = json.loads((run / "fanout" / "manifest.json").read_text())
    if m1["content_hash"] != mn["content_hash"] or m1["counts"] != mn["counts"]:
        raise RuntimeError("the fanned-out dataset differs from the one-container dataset")
    speedup = single_wall / fanout_wall
    n_cores = cores()
    result = {
        "benchmark": "prepare_fanout",
        "rows": args.rows,
        "rows_out": m1["counts"]["rows_out"],
        "items": items,
        "cores": n_cores,
        "longest_edge": args.longest_edge,
        "same_content_hash": True,
        "single_wall_s": round(single_wall, 2),
        "fanout_wall_s": round(fanout_wall, 2),
        "speedup": round(speedup, 3),
        "ratio": round(speedup, 3),  # readme_figures.py prints every benchmark's ratio
        "parallel_efficiency": round(speedup / items, 3),
        "single_images_per_s_per_core": round(args.rows / single_wall, 2),  # one worker: one core
        "fanout_images_per_s_per_core": round(args.rows / fanout_wall / min(items, n_cores), 2),
        "single_cpu_s": round(single["cpu_s"], 2),
        "fanout_cpu_s": round(plan_usage["cpu_s"] + sum(u["cpu_s"] for u in part_usage) + final_usage["cpu_s"], 2),
        "finalize_cpu_s": round(final_usage["cpu_s"], 2),
        "single_peak_rss_mb": single["peak_rss_mb"],
        "peak_rss_per_item_mb": [u["peak_rss_mb"] for u in part_usage],
        "finalize_peak_rss_mb": final_usage["peak_rss_mb"],
        "load_at_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
