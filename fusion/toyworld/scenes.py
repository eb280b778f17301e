"""Scenes: up to three coloured shapes on a 3x3 grid, rendered with PIL.

A scene is a tuple of :class:`Obj` (shape, colour, row, col) with at most one object per
cell. Rendering is deterministic: each object fills the central part of its cell, so two
objects never touch and a reader can take them apart by connected components.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
}
COLOURS = tuple(PALETTE)
BACKGROUND = (255, 255, 255)
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
CELLS = tuple(CELL_NAMES)
MARGIN = 0.18  # fraction of a cell left empty on each side


@dataclass(frozen=True, order=True)
class Obj:
    shape: str
    colour: str
    row: int
    col: int

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def where(self) -> str:
        return CELL_NAMES[self.cell]

    def describe(self) -> str:
        return f"a {self.colour} {self.shape}"

    def to_dict(self) -> dict:
        return asdict(self)


Scene = tuple  # tuple[Obj, ...], sorted


def make_scene(objs) -> Scene:
    objs = tuple(sorted(objs))
    cells = [o.cell for o in objs]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects share a cell: {objs}")
    return objs


def scene_from_dicts(items: list[dict]) -> Scene:
    return make_scene(Obj(**d) for d in items)


def scene_to_dicts(scene: Scene) -> list[dict]:
    return [o.to_dict() for o in scene]


def random_obj(rng: random.Random, taken: set, held_out: set | frozenset = frozenset()) -> Obj:
    """An object in a free cell whose (colour, shape) is not held out."""
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        if (colour, shape) in held_out:
            continue
        free = [c for c in CELLS if c not in taken]
        row, col = rng.choice(free)
        return Obj(shape, colour, row, col)


def random_scene(rng: random.Random, n: int, held_out: set | frozenset = frozenset()) -> Scene:
    objs, taken = [], set()
    for _ in range(n):
        o = random_obj(rng, taken, held_out)
        taken.add(o.cell)
        objs.append(o)
    return make_scene(objs)


def render(scene: Scene, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    cell = size / 3
    for o in scene:
        x0, y0 = o.col * cell + cell * MARGIN, o.row * cell + cell * MARGIN
        x1, y1 = (o.col + 1) * cell - cell * MARGIN - 1, (o.row + 1) * cell - cell * MARGIN - 1
        fill = PALETTE[o.colour]
        if o.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif o.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img
