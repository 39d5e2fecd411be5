"""Synthetic visual questions for the demo and the tests: shapes of several colours, sizes, positions, counts.

Written in an ordinary source format that ``prepare-data`` reads like any user's data:

    DIR/sft/rows.jsonl          {"id", "image": "images/x.png", "question", "answer", "category"}
    DIR/sft/images/*.png
    DIR/preference/rows.jsonl   {"id", "image", "question", "chosen", "rejected", "category"}
    DIR/preference/images/*.png

    vlmtune demo-data --output ./demo-data --rows 600 --seed 0

The answers are single words from small closed sets, so exact-match accuracy is meaningful.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "1", 2: "2", 3: "3", 4: "4"}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "position": "Is the shape on the left or the right?",
}
ANSWER_SETS = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "count": list(COUNT_WORDS.values()),
    "position": ["left", "right"],
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_example(rng: random.Random, category: str, size: int = 128,
                 extent_range: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """One image and the answer to ``QUESTIONS[category]`` about it; ``extent_range``: the single shape's side
    in px (default size/4 .. size/2 - 8)."""
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    if category == "count":
        n = rng.randint(1, 4)
        colour = rng.choice(list(COLOURS))
        cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], n)  # one shape per quadrant, so they never overlap
        for cx, cy in cells:
            extent = rng.randint(size // 5, size // 3)
            x0 = cx * size // 2 + rng.randint(2, size // 2 - extent - 2)
            y0 = cy * size // 2 + rng.randint(2, size // 2 - extent - 2)
            _draw_shape(draw, rng.choice(SHAPES), (x0, y0, x0 + extent, y0 + extent), COLOURS[colour])
        return image, COUNT_WORDS[n]
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    extent = rng.randint(*(extent_range or (size // 4, size // 2 - 8)))
    side = rng.choice(["left", "right"])
    x0 = rng.randint(4, size // 2 - extent) if side == "left" else rng.randint(size // 2, size - extent - 4)
    y0 = rng.randint(4, size - extent - 4)
    _draw_shape(draw, shape, (x0, y0, x0 + extent, y0 + extent), COLOURS[colour])
    return image, {"colour": colour, "shape": shape, "position": side}[category]


def write_demo_data(output: str | Path, rows: int = 600, preference_rows: int = 200, seed: int = 0,
                    question_cycle: tuple[str, ...] | None = None, extent_range: tuple[int, int] | None = None) -> Path:
    """Write the SFT and preference sources under ``output``; deterministic for a seed. Row i asks
    ``question_cycle[i % len]`` (default: each question type in turn)."""
    output = Path(output)
    rng = random.Random(seed)
    categories = list(question_cycle or QUESTIONS)
    for kind, n in (("sft", rows), ("preference", preference_rows)):
        folder = output / kind
        (folder / "images").mkdir(parents=True, exist_ok=True)
        with open(folder / "rows.jsonl", "w") as f:
            for i in range(n):
                category = categories[i % len(categories)]
                image, answer = make_example(rng, category, extent_range=extent_range)
                rel = f"images/{kind}-{i:05d}.png"
                image.save(folder / rel)
                row = {"id": f"{kind}-{i:05d}", "image": rel, "question": QUESTIONS[category], "category": category}
                if kind == "sft":
                    row["answer"] = answer
                else:
                    row["chosen"] = answer
                    row["rejected"] = rng.choice([a for a in ANSWER_SETS[category] if a != answer])
                f.write(json.dumps(row) + "\n")
    (output / "DONE").write_text(json.dumps({"rows": rows, "preference_rows": preference_rows, "seed": seed}))
    return output
