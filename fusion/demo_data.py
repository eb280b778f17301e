"""A handful of interleaved conversations with drawn shapes, for the smoke path and tests.

Written by ``python tools/make_tiny.py`` to ``<out_dir>/demo_data/`` (``conversations.jsonl``
plus PNGs). It covers the message kinds the renderer must handle: a text-to-image request,
an edit of a user image, a text-only answer, a multi-image answer, and a three-turn chat
whose last turn refers back to the first image. The full procedural
toy world (with ground truth and an evaluator) replaces it as the main job later.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from fusion.toyworld.scenes import Obj, make_scene, render


def draw_scene(objects: list[tuple[str, str, int, int]], size: int = 64) -> Image.Image:
    """Draw (shape, colour, row, col) objects with the toy world's renderer."""
    return render(make_scene(Obj(*o) for o in objects), size)


def make_demo_data(out_dir: str | Path, seed: int = 0, name: str = "demo_data") -> Path:
    """Write ``<out_dir>/<name>/conversations.jsonl`` and its images; returns the folder."""
    root = Path(out_dir) / name
    (root / "images").mkdir(parents=True, exist_ok=True)
    scenes = {
        "red_circle": [("circle", "red", 1, 1)],
        "red_circle_left": [("circle", "red", 1, 0)],
        "blue_square": [("square", "blue", 0, 2)],
        "blue_square_green_tri": [("square", "blue", 0, 2), ("triangle", "green", 2, 0)],
    }
    for key, objs in scenes.items():
        draw_scene(objs).save(root / "images" / f"{key}.png")

    def img(key: str) -> dict:
        return {"type": "image", "image": f"images/{key}.png"}

    def text(t: str) -> dict:
        return {"type": "text", "text": t}

    conversations = [
        [
            {"role": "user", "content": [text("Draw a red circle in the middle.")]},
            {"role": "assistant", "content": [text("Here is a red circle."), img("red_circle")]},
        ],
        [
            {"role": "user", "content": [img("red_circle"), text("Move the circle to the left.")]},
            {"role": "assistant", "content": [text("I moved it."), img("red_circle_left")]},
            {"role": "user", "content": [text("What colour is it?")]},
            {"role": "assistant", "content": [text("It is red.")]},
        ],
        [
            {"role": "user", "content": [text("Draw a blue square at the top right, then add a green triangle.")]},
            {
                "role": "assistant",
                "content": [text("First the square:"), img("blue_square"), text("then the triangle:"), img("blue_square_green_tri")],
            },
        ],
        [
            {"role": "user", "content": [text("Draw a blue square at the top right.")]},
            {"role": "assistant", "content": [text("Here is the square."), img("blue_square")]},
            {"role": "user", "content": [text("What shape is it?")]},
            {"role": "assistant", "content": [text("It is a square.")]},
            {"role": "user", "content": [text("Add a green triangle to the first image.")]},
            {"role": "assistant", "content": [text("Done."), img("blue_square_green_tri")]},
        ],
    ]
    with open(root / "conversations.jsonl", "w") as f:
        for msgs in conversations:
            f.write(json.dumps({"messages": msgs}) + "\n")
    return root
