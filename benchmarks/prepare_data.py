"""Benchmark: our ``prepare-data`` vs the seed notebooks' way, and vs the plain-Pillow limit.

    python benchmarks/prepare_data.py [--rows 2000] [--workdir /tmp/vlmtune-bench-prepare] [--longest-edge 768]

- Data: ``--rows`` generated photo-like 1024x768 images (JPEG, with ~5% grayscale, ~5% CMYK, ~5% EXIF-rotated
  JPEGs and ~5% RGBA PNGs), written once under ``--workdir`` and reused.
- Ours: ``core.run`` with the default process pool (all cores), SmolVLM-Instruct image settings at
  ``--longest-edge`` (384 px tiles), output Parquet. Run at N/10 and N rows to show peak RSS stays flat.
- Seed way: ``datasets`` Dataset with an ``Image`` column, ``.map`` with PIL in one process (EXIF, RGB,
  resize), images decoded into memory, ``to_parquet``. ``seed`` keeps datasets' default encoding of the
  resized PIL images (PNG), as the notebooks do; ``seed_jpeg`` hands back JPEG bytes like ours, to separate
  the encoding gain from the parallelism gain. The PNG variant runs on the first ``--seed-png-rows`` rows
  only (it manages ~1-3 images/s; its per-image rate does not depend on N, its memory does).
- Limit: plain Pillow decode + RGB + resize + JPEG encode of the same files, one process, times the cores.

Each contender runs in its own subprocess (so peak RSS is its own). The last line printed is one JSON object.
Besides wall-clock images/s, every contender reports images per CPU-second (its own and its workers' CPU
time): on a shared, noisy machine wall-clock ratios swing with other people's load, CPU-time ratios do not, and
``*_idle_estimate`` turns them into the wall-clock ratio an idle machine with these cores would show.
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


# ----------------------------------------------------------------------------------------------------------
# Data


def _make_image(i: int, folder: str) -> dict:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    w, h = 1024, 768
    # Photo-like: smooth colour field + a few soft shapes + sensor noise (so JPEG sizes look like photos).
    base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), "RGB").resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(6):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(20, 200))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    arr = np.asarray(base, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    kind = i % 20
    if kind == 1:
        rel = f"images/{i:06d}.jpg"
        im.convert("L").save(Path(folder) / rel, quality=90)
    elif kind == 2:
        rel = f"images/{i:06d}.jpg"
        im.convert("CMYK").save(Path(folder) / rel, quality=90)
    elif kind == 3:
        rel = f"images/{i:06d}.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(Path(folder) / rel, quality=90, exif=exif.tobytes())
    elif kind == 4:
        rel = f"images/{i:06d}.png"
        rgba = im.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize((w, h)))
        rgba.save(Path(folder) / rel, compress_level=1)
    else:
        rel = f"images/{i:06d}.jpg"
        im.save(Path(folder) / rel, quality=90)
    return {"id": f"photo-{i:06d}", "image": rel, "question": "What is in the picture?", "answer": f"shapes {i % 7}",
            "category": f"c{i % 5}"}


def make_source(folder: Path, rows: int) -> Path:
    """``rows`` images + rows.jsonl under ``folder`` (reused when already complete)."""
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


def subset(folder: Path, rows: int) -> Path:
    """A rows file with the first ``rows`` rows, inside ``folder`` (so its image paths stay under the root)."""
    sub = folder / f"rows-first{rows}.jsonl"
    lines = (folder / "rows.jsonl").read_text().splitlines()[:rows]
    sub.write_text("".join(line + "\n" for line in lines))
    return sub


def rows_file(source: Path) -> Path:
    return source if source.is_file() else source / "rows.jsonl"


# ----------------------------------------------------------------------------------------------------------
# Contenders (each runs in a subprocess: ``--child NAME``)


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (workers): robust to a shared, noisy machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> dict:
    import resource

    return {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
    }


def build_processor(folder: Path) -> Path:
    """SmolVLM-Instruct's image settings (1536 px, 384 px tiles, 81 tokens/tile), built offline."""
    if (folder / "preprocessor_config.json").exists():
        return folder
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from components.common.tiny_model import build_tokenizer

    ip = Idefics3ImageProcessor(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}, do_image_splitting=True)
    Idefics3Processor(image_processor=ip, tokenizer=build_tokenizer(), image_seq_len=81).save_pretrained(folder)
    return folder


def child_ours(source: Path, out: Path, args) -> dict:
    from components.common.config import build_config
    from components.common.processor_settings import load_processor_settings
    from components.prepare_data import core
    from components.prepare_data.config import PrepareDataConfig

    config = build_config(PrepareDataConfig, {
        "processor": str(args.processor), "longest_edge": args.longest_edge, "progress": False,
        "max_invalid_fraction": 0.0,
    })
    # Import transformers and read the processor once before timing: a fixed start-up cost (~5-10 s here),
    # reported apart, not part of the per-image throughput.
    t = time.perf_counter()
    load_processor_settings(str(args.processor), args.longest_edge)
    startup = time.perf_counter() - t
    c0, t = cpu_seconds(), time.perf_counter()
    manifest = core.run(config, str(source), str(out))
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - c0
    n = manifest["counts"]["rows_out"]
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_seconds": cpu,
            "images_per_cpu_s": n / cpu, "startup_seconds": startup,
            "tokens_per_image": manifest["tokens_per_image"], "workers": cores(), **peak_rss_mb()}


def _seed_transform(jpeg: bool, longest_edge: int):
    import io

    from PIL import Image, ImageOps

    def fn(example):
        im = ImageOps.exif_transpose(example["image"])
        if im.mode != "RGB":
            im = im.convert("RGBA") if "A" in im.mode else im.convert("RGB")
            if im.mode == "RGBA":
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
        scale = longest_edge / max(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        messages = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": example["question"]}]},
                    {"role": "assistant", "content": [{"type": "text", "text": example["answer"]}]}]
        if jpeg:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95)
            im = {"bytes": buf.getvalue(), "path": None}
        return {"images": [im], "messages": messages, "answers": [example["answer"]]}

    return fn


def child_seed(source: Path, out: Path, args, jpeg: bool) -> dict:
    import tempfile

    import datasets

    datasets.disable_progress_bars()
    c0, t = cpu_seconds(), time.perf_counter()
    rows = [json.loads(line) for line in rows_file(source).read_text().splitlines()][: args.seed_rows or None]
    root = rows_file(source).parent
    ds = datasets.Dataset.from_dict({
        "id": [r["id"] for r in rows], "image": [str(root / r["image"]) for r in rows],
        "question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows],
        "category": [r["category"] for r in rows],
    }).cast_column("image", datasets.Image())
    with tempfile.TemporaryDirectory() as cache:
        ds = ds.map(_seed_transform(jpeg, args.longest_edge), remove_columns=["image", "question", "answer"],
                    keep_in_memory=True, cache_file_name=None, new_fingerprint=f"seed-{jpeg}-{time.time()}")
        out.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out / "train.parquet"))
        del cache
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - c0
    return {"images": len(rows), "seconds": seconds, "images_per_s": len(rows) / seconds, "cpu_seconds": cpu,
            "images_per_cpu_s": len(rows) / cpu, **peak_rss_mb()}


def child_limit(source: Path, args) -> dict:
    """Plain Pillow, one process: read, decode, EXIF, RGB, resize, JPEG encode. No dataset, no output."""
    import io

    from PIL import Image, ImageOps

    rows = [json.loads(line) for line in rows_file(source).read_text().splitlines()][: args.limit_rows]
    root = rows_file(source).parent
    c0, t = cpu_seconds(), time.perf_counter()
    for r in rows:
        with Image.open(root / r["image"]) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            scale = args.longest_edge / max(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
            im.save(io.BytesIO(), "JPEG", quality=95)
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - c0
    return {"images": len(rows), "seconds": seconds, "images_per_s_per_core": len(rows) / seconds,
            "images_per_cpu_s": len(rows) / cpu}


def run_child(name: str, source: Path, out: Path, args, seed_rows: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--child-source", str(source), "--child-out", str(out),
           "--longest-edge", str(args.longest_edge), "--processor", str(args.processor),
           "--limit-rows", str(args.limit_rows), "--seed-rows", str(seed_rows)]
    print(f"[bench] {name} on {source.name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/vlmtune-bench-prepare")
    parser.add_argument("--longest-edge", type=int, default=768)
    parser.add_argument("--limit-rows", type=int, default=300)
    parser.add_argument("--seed-png-rows", type=int, default=500,
                        help="Rows for the (slow, ~1 image/s) seed way with PNG output; its rate does not depend on N.")
    parser.add_argument("--seed-rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--processor", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-source", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        source, out = Path(args.child_source), Path(args.child_out)
        result = {
            "ours": lambda: child_ours(source, out, args),
            "seed": lambda: child_seed(source, out, args, jpeg=False),
            "seed_jpeg": lambda: child_seed(source, out, args, jpeg=True),
            "limit": lambda: child_limit(source, args),
        }[args.child]()
        print(json.dumps(result))
        return 0

    work = Path(args.workdir)
    t0 = time.time()
    print(f"[bench] generating {args.rows} photos under {work} (reused if present) ...", file=sys.stderr, flush=True)
    source = make_source(work / f"photos-{args.rows}", args.rows)
    print(f"[bench] data ready in {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    args.processor = build_processor(work / "smolvlm-instruct-image-settings")
    small = subset(source, max(1, args.rows // 10))

    # The fast contenders run back to back, so they share the machine's (noisy) conditions; the slow seed way last.
    limit = run_child("limit", source, work / "out-limit", args)
    ours = run_child("ours", source, work / "out-ours", args)
    seed_jpeg = run_child("seed_jpeg", source, work / "out-seed-jpeg", args)
    ours_small = run_child("ours", small, work / "out-ours-small", args)
    seed = run_child("seed", source, work / "out-seed", args, seed_rows=args.seed_png_rows)

    n_cores = cores()
    limit_total = limit["images_per_s_per_core"] * n_cores
    r = lambda x, d=2: round(x, d)  # noqa: E731
    result = {
        "rows": args.rows,
        "cores": n_cores,
        "longest_edge": args.longest_edge,
        "load_average_1m": r(os.getloadavg()[0]),
        # Wall-clock throughput (what a user sees; depends on what else runs on the machine).
        "ours_images_per_s": r(ours["images_per_s"]),
        "seed_images_per_s": r(seed["images_per_s"]),
        "seed_jpeg_images_per_s": r(seed_jpeg["images_per_s"]),
        "ratio": r(ours["images_per_s"] / seed["images_per_s"]),
        "ratio_vs_seed_jpeg": r(ours["images_per_s"] / seed_jpeg["images_per_s"]),
        "pillow_limit_images_per_s": r(limit_total),
        "fraction_of_limit": r(ours["images_per_s"] / limit_total, 3),
        # CPU-time throughput (images per CPU-second, all processes): robust to a shared machine. On idle
        # cores, wall throughput ~= images_per_cpu_s x cores for ours, x 1 for the one-process seed way.
        "ours_images_per_cpu_s": r(ours["images_per_cpu_s"]),
        "seed_images_per_cpu_s": r(seed["images_per_cpu_s"]),
        "seed_jpeg_images_per_cpu_s": r(seed_jpeg["images_per_cpu_s"]),
        "pillow_limit_images_per_cpu_s": r(limit["images_per_cpu_s"]),
        "ratio_idle_estimate": r(ours["images_per_cpu_s"] * n_cores / seed["images_per_cpu_s"]),
        "ratio_vs_seed_jpeg_idle_estimate": r(ours["images_per_cpu_s"] * n_cores / seed_jpeg["images_per_cpu_s"]),
        "fraction_of_limit_cpu": r(ours["images_per_cpu_s"] / limit["images_per_cpu_s"], 3),
        "ours_startup_seconds": r(ours["startup_seconds"]),
        # Memory: peak RSS of the main process (workers: largest one; forked, so shared pages count in both).
        "ours_peak_rss_mb": ours["peak_rss_mb"],
        "ours_peak_rss_worker_mb": ours["peak_rss_worker_mb"],
        "ours_small_rows": ours_small["images"],
        "ours_small_peak_rss_mb": ours_small["peak_rss_mb"],
        "rss_growth_10x": r(ours["peak_rss_mb"] / ours_small["peak_rss_mb"], 3),
        "seed_rows": seed["images"],
        "seed_peak_rss_mb": seed["peak_rss_mb"],
        "seed_jpeg_peak_rss_mb": seed_jpeg["peak_rss_mb"],
        "tokens_per_image": ours["tokens_per_image"],
        "wall_seconds": r(time.time() - t0, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
