"""``vlmtune predict``: ask a model about one or several images, a batch file, or a video.

    vlmtune predict --model ./out/sft --image shape.png --question "What colour is the shape?"
    vlmtune predict --model /srv/registry::shapes@champion --image a.png --image b.png --question "Same shape?"
    vlmtune predict --model shapes@3 --registry gs://acme/registry --batch rows.jsonl --output answers.jsonl
    vlmtune predict --model HuggingFaceTB/SmolVLM-256M-Instruct --video clip.mp4 --frames 8 --question "What happens?"

--model is a folder, gs:// URI, hub id, vlmtune model artifact (adapter loads on its base), or a registry
reference [REGISTRY::]NAME@VERSION|ALIAS (REGISTRY defaults to --registry, then $VLMTUNE_REGISTRY).

Batch file: one JSON object per line, {"id": ..., "question": ..., "image": "a.png"} or "images": [...];
relative image paths are taken from the batch file's folder; "id" defaults to the line number. Output: one
JSON line per input row, in order: {"id", "question", "images", "answer"} (to --output, else stdout).
Inputs are checked before the model is loaded (images and the video are decoded, batch lines parsed and their
image files found); a bad input exits with status 2 and says which file, line or option. A --video must be a
video: a still image (or a file with one frame, or no video stream) is refused with the advice to use --image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from components.common.generation import GenerationOptions

DEFAULT_IMAGE_QUESTION = "Describe the image."
DEFAULT_VIDEO_QUESTION = "Describe the video."


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    defaults = GenerationOptions()
    g.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="longest answer, in tokens")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature (with --do-sample)")
    g.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass (with --do-sample)")
    g.add_argument("--num-beams", type=int, default=defaults.num_beams, help="beam search width (1: none)")
    g.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty, help=">1 discourages repeats")
    g.add_argument("--seed", type=int, help="random seed, for reproducible sampling")


def generation_options(args) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                             top_p=args.top_p, num_beams=args.num_beams, repetition_penalty=args.repetition_penalty)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmtune predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder, gs:// URI, hub id or [REGISTRY::]NAME@VERSION|ALIAS")
    p.add_argument("--registry", help="registry for NAME@REF references (default: $VLMTUNE_REGISTRY)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", action="append", metavar="PATH", help="an image; repeat for several images in one prompt")
    inputs.add_argument("--batch", metavar="FILE.jsonl", help="many questions, answered in batches")
    inputs.add_argument("--video", metavar="FILE", help="a video of more than one frame (mp4, webm, mkv, ..., or animated GIF/WebP/PNG)")
    p.add_argument("--question", help=f"the question (default: {DEFAULT_IMAGE_QUESTION!r}, or {DEFAULT_VIDEO_QUESTION!r} for --video)")
    p.add_argument("--frames", type=int, default=8, help="--video: evenly spaced frames given to the model, in order")
    p.add_argument("--split-frames", action="store_true", help="--video: tile frames like still images (many more tokens)")
    p.add_argument("--output", metavar="OUT.jsonl", help="--batch: write answers here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8, help="--batch: rows per generate call")
    p.add_argument("--no-progress", action="store_true", help="--batch: no progress bar")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    add_generation_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """`vlmtune predict ...`: 0 with the answers printed or written, 2 on bad input or a model that cannot load."""
    return _cmd_predict(make_parser().parse_args(argv))


def _check_args(args, options: GenerationOptions) -> list[str]:
    from components.predict.api import check_options

    problems = check_options(options)
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.frames < 1:
        problems.append(f"--frames must be at least 1, not {args.frames}")
    if args.output and not args.batch:
        problems.append("--output goes with --batch (a single answer is printed)")
    if args.batch and args.question:
        problems.append("--question does not go with --batch: each batch row has its own 'question'")
    if args.question is not None and not args.question.strip():
        problems.append("--question is empty")
    return problems


def _cmd_predict(args) -> int:
    from components.predict.api import BatchFileError, Predictor, load_image, read_batch_file
    from components.predict.video import sample_frames
    from components.common.registry import RegistryError

    options = generation_options(args)
    problems = _check_args(args, options)
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        return 2
    # Read the inputs before loading the model: a typo should cost a second, not a model download. Video frames
    # are decoded here too, so only the chosen frames stay in memory.
    try:
        if args.image:
            images = [load_image(path) for path in args.image]
        elif args.batch:
            rows = read_batch_file(args.batch)
        else:
            frames = sample_frames(args.video, args.frames)
    except (FileNotFoundError, BatchFileError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        predictor = Predictor.from_ref(args.model, registry=args.registry, trust_remote_code=args.trust_remote_code)
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # from_pretrained: not a folder, not a hub id, or the hub cannot be reached
        print(f"error: cannot load model {args.model!r}: {e}", file=sys.stderr)
        return 2

    try:
        if args.image:
            print(predictor.ask(args.question or DEFAULT_IMAGE_QUESTION, images, options))
        elif args.video:
            print(predictor.ask_frames(args.question or DEFAULT_VIDEO_QUESTION, frames, options,
                                       split_frames=args.split_frames))
        else:
            _answer_batch(predictor, rows, args, options)
    except (FileNotFoundError, ValueError) as e:  # a batch image that exists but cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _answer_batch(predictor, rows, args, options) -> None:
    """Write one JSON line per row as answers come; with --output, into OUT.partial renamed at the end, so an
    interrupted run never leaves a file that looks complete."""
    target = Path(args.output) if args.output else None
    partial = target.with_name(target.name + ".partial") if target else None
    if partial:
        partial.parent.mkdir(parents=True, exist_ok=True)
    out = open(partial, "w", encoding="utf-8") if partial else sys.stdout
    try:
        for row, answer in predictor.iter_batch(rows, args.batch_size, options, progress=not args.no_progress):
            record = {"id": row.id, "question": row.question, "images": [str(p) for p in row.images], "answer": answer}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if partial:
            out.close()
    if partial:
        os.replace(partial, target)
        print(f"{len(rows)} answers written to {target}", file=sys.stderr)
