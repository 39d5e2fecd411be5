"""Benchmark: image tokens and SFT step time with the processor's fixed size vs need-based sizing (the default).

    python benchmarks/tokens.py [--threads 2] [--vision-layers 1] [--steps 2] [--smoke]

- Processor: SmolVLM-256M's real image settings (longest edge 2048, 512 px tiles, 64 tokens a tile), built here
  from ``Idefics3ImageProcessor`` and the project's locally trained tokenizer (no hub).
- Images: a mix from 64 px to 4,000 px in several aspect ratios (``SIZES``). Each is brought within the cap as
  prepare-data stores it; tokens are counted from the real processor's output for both sizings
  (``image_sizing: fixed`` and ``need``, ``components.common.processor_settings``) and checked against the
  manifest's formula.
- SFT step time: a random-weight Idefics3 with SmolVLM-256M's vision settings (SigLIP-B/16 width at 512 px,
  scale factor 4) but only ``--vision-layers`` encoder layers, and a tiny text model (llama, 2 layers x 64),
  so a CPU run takes minutes. The vision tower is frozen (forward only, as with LoRA on the text model); the
  connector and the text model train with AdamW. Each row of ``STEP_ROWS`` (a small, a medium and an
  above-the-cap image) is timed for ``--steps`` optimizer steps (batch 1, after one warm-up step), fixed and need
  alternating in one process. CPU time (all threads) is reported beside wall time, as the machine is shared.

The last line printed is one JSON object (``ratio``: fixed/need tokens over the whole mix).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LONGEST_EDGE, TILE, TOKENS_PER_TILE = 2048, 512, 64
SIZES = [(64, 64), (128, 128), (224, 224), (300, 200), (200, 300), (480, 360), (640, 480), (600, 400),
         (1024, 768), (800, 200), (1280, 720), (1920, 1080), (2048, 2048), (3000, 1000), (4000, 3000),
         (3000, 4000), (4000, 1000), (500, 3000)]
STEP_ROWS = [(128, 128), (640, 480), (4000, 3000)]
SMOKE_SIZES = [(64, 64), (128, 128), (640, 480), (4000, 3000)]


def build_processor(folder: Path, longest_edge: int = LONGEST_EDGE, tile: int = TILE, per_tile: int = TOKENS_PER_TILE):
    from transformers import AutoProcessor, Idefics3ImageProcessor, Idefics3Processor

    from components.common.tiny_model import SMOLVLM_CHAT_TEMPLATE, build_tokenizer

    image_processor = Idefics3ImageProcessor(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile},
                                             do_image_splitting=True)
    Idefics3Processor(image_processor=image_processor, tokenizer=build_tokenizer(), image_seq_len=per_tile,
                      chat_template=SMOLVLM_CHAT_TEMPLATE).save_pretrained(folder)
    return AutoProcessor.from_pretrained(folder)


def processors(folder: Path, smoke: bool):
    """(settings, {"fixed": processor, "need": processor}) as SFT has them after reading the manifest."""
    from components.common import processor_settings as ps

    args = (128, 64, 4) if smoke else (LONGEST_EDGE, TILE, TOKENS_PER_TILE)
    build_processor(folder, *args)
    settings = ps.load_processor_settings(str(folder), image_sizing="need")
    out = {}
    for sizing in ("fixed", "need"):
        from transformers import AutoProcessor

        out[sizing] = ps.apply_processor_settings(AutoProcessor.from_pretrained(folder), {**settings, "image_sizing": sizing})
    return settings, out


def image_tokens(processor, image) -> int:
    from components.common.processor_settings import images_for_processor

    (given,) = images_for_processor(processor, [image])
    return len(processor(text="<image>", images=[[given]], add_special_tokens=False)["input_ids"][0])


def build_model(vocab: int, tokenizer, smoke: bool):
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    vision = ({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "image_size": 64, "patch_size": 16}
              if smoke else {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "image_size": 512,
                             "patch_size": 16})
    config = Idefics3Config(
        vision_config={**vision, "num_hidden_layers": ARGS.vision_layers},
        text_config={"model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 8192, "pad_token_id": tokenizer.pad_token_id,
                     "tie_word_embeddings": False},
        scale_factor=2 if smoke else 4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config)
    model.model.vision_model.requires_grad_(False)
    return model


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def step_times(model, collators: dict, rows_by_size: dict, steps: int) -> dict:
    """Seconds per optimizer step (wall and CPU) for each row, fixed and need alternating."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out = {}
    for size, row in rows_by_size.items():
        entry = {}
        for sizing in ("fixed", "need"):
            batch = collators[sizing]([row])
            def step():
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step()  # warm-up
            wall0, cpu0 = time.perf_counter(), cpu_seconds()
            for _ in range(steps):
                step()
            entry[sizing] = {"wall_s_per_step": round((time.perf_counter() - wall0) / steps, 3),
                             "cpu_s_per_step": round((cpu_seconds() - cpu0) / steps, 3),
                             "tiles": int(batch["pixel_values"].shape[1]), "sequence_tokens": int(batch["input_ids"].shape[1])}
        entry["ratio_wall"] = round(entry["fixed"]["wall_s_per_step"] / entry["need"]["wall_s_per_step"], 2)
        # CPU seconds of this process: fair on a shared machine, where wall time also counts other jobs.
        entry["ratio_cpu"] = round(entry["fixed"]["cpu_s_per_step"] / entry["need"]["cpu_s_per_step"], 2)
        out[f"{size[0]}x{size[1]}"] = entry
    return out


def main(argv: list[str] | None = None) -> dict:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny processor and model (CI): seconds, not minutes")
    ARGS = parser.parse_args(argv)
    import torch
    from PIL import Image

    from components.common import processor_settings as ps
    from components.common.training.collator import VisionSFTCollator

    torch.set_num_threads(ARGS.threads)
    started = time.time()
    sizes = SMOKE_SIZES if ARGS.smoke else SIZES
    with tempfile.TemporaryDirectory(prefix="vlmtune-bench-tokens-") as tmp:
        settings, procs = processors(Path(tmp) / "processor", ARGS.smoke)
    cap = settings["size"]["longest_edge"]
    per_image = []
    for w, h in sizes:
        image = Image.new("RGB", (w, h), (40, 120, 200))
        stored = image.resize(ps.capped_size(w, h, cap))  # what prepare-data stores (both sizings)
        counts = {sizing: image_tokens(procs[sizing], stored) for sizing in ("fixed", "need")}
        for sizing, n in counts.items():  # the manifest's formula agrees with the processor
            assert n == ps.tokens_for_size(*stored.size, settings, sizing), (w, h, sizing, n)
        per_image.append({"size": f"{w}x{h}", "fixed": counts["fixed"], "need": counts["need"],
                          "ratio": round(counts["fixed"] / counts["need"], 2)})
    tile = settings["max_image_size"]["longest_edge"]
    small = [r for r, (w, h) in zip(per_image, sizes) if max(w, h) <= tile]  # one tile is enough for them
    above_cap = [r for r, (w, h) in zip(per_image, sizes) if max(w, h) >= cap]
    total_fixed, total_need = sum(r["fixed"] for r in per_image), sum(r["need"] for r in per_image)

    tokenizer = procs["need"].tokenizer
    model = build_model(len(tokenizer), tokenizer, ARGS.smoke)
    model.train()
    collators = {sizing: VisionSFTCollator(p) for sizing, p in procs.items()}
    step_sizes = [(64, 64), (4000, 3000)] if ARGS.smoke else STEP_ROWS
    rows = {}
    for w, h in step_sizes:
        stored = Image.new("RGB", (w, h), (200, 40, 40)).resize(ps.capped_size(w, h, cap))
        rows[(w, h)] = {"images": [stored], "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    steps = step_times(model, collators, rows, ARGS.steps)

    print(f"{'image':>12}{'fixed':>10}{'need':>10}{'fixed/need':>12}")
    for r in per_image:
        print(f"{r['size']:>12}{r['fixed']:>10}{r['need']:>10}{r['ratio']:>12}")
    for size, e in steps.items():
        print(f"SFT step {size}: fixed {e['fixed']['wall_s_per_step']} s ({e['fixed']['tiles']} tiles), "
              f"need {e['need']['wall_s_per_step']} s ({e['need']['tiles']} tiles): {e['ratio_wall']}x wall, {e['ratio_cpu']}x CPU time")
    summary = {
        "processor": {"longest_edge": cap, "tile": settings["max_image_size"]["longest_edge"],
                      "tokens_per_tile": settings["image_seq_len"]},
        "images": len(per_image),
        "tokens_per_image": per_image,
        "tokens_fixed_total": total_fixed,
        "tokens_need_total": total_need,
        "ratio": round(total_fixed / total_need, 2),
        "small_images_min_ratio": min(r["ratio"] for r in small),
        "above_cap_unchanged": all(r["fixed"] == r["need"] for r in above_cap),
        "model": (f"random-weight Idefics3: SmolVLM-256M vision settings with {ARGS.vision_layers} encoder layer(s), frozen; "
                  "text llama 2x64 (trained with the connector)") if not ARGS.smoke else "smoke: tiny vision and text",
        "sft_step": steps,
        "threads": ARGS.threads,
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(summary))
    return summary


ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
