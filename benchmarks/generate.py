"""Benchmark: batched, left-padded generation (ours) vs one prompt at a time (the seed notebooks' way).

    python benchmarks/generate.py [--workdir /tmp/vlmtune-bench-generate] [--rows 400] [--batch-size 16]
                                  [--max-new-tokens 16] [--model REF] [--dataset PREPARED_URI] [--threads N]

- Model: ``--model`` (folder, gs://, hub id, vlmtune artifact or registry reference); default the tiny
  SmolVLM-architecture model, built under ``--workdir``.
- Data: the eval split of ``--dataset`` (a prepare-data output); default: ``--rows`` demo rows written and
  prepared under ``--workdir`` (eval split ~20% of them).
- Ours: :func:`components.common.generation.generate_answers` with ``--batch-size`` (what evaluate and
  ``vlmtune predict --batch`` run).
- Seed way: a loop over rows, each ``apply_chat_template`` -> ``processor(text=prompt, images=[images])`` ->
  ``model.generate`` -> decode, as the seed notebooks do (with ``add_special_tokens=False`` like ours, so both
  see the same tokens and the answers can be compared).
- Same model, same process, same greedy settings; one warm-up call each first. Both must give the same
  answers (``answers_identical``): left padding makes batching change speed, not output.

The machine may be shared and noisy: compare the ratio from one run, not absolute numbers across runs. The
last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare_inputs(workdir: Path, rows: int) -> tuple[str, str]:
    """(tiny model folder, prepared dataset folder), built once under ``workdir`` and reused."""
    from components.common import artifacts
    from components.common.config import build_config
    from components.common.demo_data import write_demo_data
    from components.common.tiny_model import build_tiny_model
    from components.prepare_data.config import PrepareDataConfig
    from components.prepare_data.core import run

    model = workdir / "tiny-model"
    if not (model / "vlmtune_tiny_model.json").exists():
        build_tiny_model(model, seed=0)
    data = workdir / f"demo-data-{rows}"
    if not (data / "DONE").exists():
        write_demo_data(data, rows=rows, preference_rows=0, seed=0)
    prepared = workdir / f"prepared-{rows}"
    if not (prepared / artifacts.MANIFEST).exists():  # the manifest is written last: present = complete
        run(build_config(PrepareDataConfig, {"task": "sft", "processor": str(model)}), str(data / "sft"), str(prepared))
    return str(model), str(prepared)


def one_by_one(model, processor, conversations, images, options) -> list[str]:
    """The seed notebooks' loop: one prompt, one generate call, one decode per row."""
    import torch

    from components.common.generation import prompt_messages

    answers = []
    for messages, row_images in zip(conversations, images):
        prompt = processor.apply_chat_template(prompt_messages(messages), add_generation_prompt=True)
        inputs = processor(text=prompt, images=[list(row_images)] if row_images else None,
                           add_special_tokens=False, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            generated = model.generate(**inputs, **options.generate_kwargs(),
                                       pad_token_id=processor.tokenizer.pad_token_id)
        answers.append(processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    return answers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vlmtune-bench-generate")
    parser.add_argument("--rows", type=int, default=400, help="demo rows to write and prepare (eval split ~20%%)")
    parser.add_argument("--model", help="model reference (default: the tiny model, built in --workdir)")
    parser.add_argument("--dataset", help="prepared dataset URI whose eval split to use (default: demo data)")
    parser.add_argument("--max-rows", type=int, default=0, help="use at most this many eval rows (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=cores(), help="torch CPU threads (default: all cores)")
    args = parser.parse_args(argv)

    import torch

    from components.common.generation import GenerationOptions, generate_answers
    from components.common.modeling import load_for_inference
    from components.predict.api import resolve_model
    from components.common.dataset import load_split

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_ref, dataset = args.model, args.dataset
    if not (model_ref and dataset):
        tiny, prepared = prepare_inputs(workdir, args.rows)
        model_ref, dataset = model_ref or tiny, dataset or prepared
    model, processor = load_for_inference(resolve_model(model_ref))
    rows = load_split(dataset, "eval", cache_dir=str(workdir / "hf-cache"))
    if args.max_rows:
        rows = rows.select(range(min(args.max_rows, rows.num_rows)))
    conversations = [row["messages"] for row in rows]
    images = [row["images"] for row in rows]
    n = len(conversations)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)

    # Warm-up: first calls pay for lazy init (kernels, caches), which neither contender should carry.
    one_by_one(model, processor, conversations[:1], images[:1], options)
    generate_answers(model, processor, conversations[:args.batch_size], images[:args.batch_size], args.batch_size, options)

    t0 = time.perf_counter()
    seed_answers = one_by_one(model, processor, conversations, images, options)
    seed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched_answers = generate_answers(model, processor, conversations, images, args.batch_size, options)
    batched_s = time.perf_counter() - t0

    differing = sum(a != b for a, b in zip(batched_answers, seed_answers))
    result = {
        "ratio": round(seed_s / batched_s, 2),
        "batched_samples_per_s": round(n / batched_s, 2),
        "one_by_one_samples_per_s": round(n / seed_s, 2),
        "rows": n,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "answers_identical": differing == 0,
        "answers_differing": differing,
        "model": model_ref,
    }
    print(f"one-by-one (seed notebooks): {n} rows in {seed_s:.2f}s = {n / seed_s:.2f} samples/s")
    print(f"batched (batch {args.batch_size}):      {n} rows in {batched_s:.2f}s = {n / batched_s:.2f} samples/s")
    print(f"ratio {seed_s / batched_s:.2f}x; answers identical: {differing == 0} ({differing} of {n} differ)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
