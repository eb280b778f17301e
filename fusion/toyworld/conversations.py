"""Conversations of every kind the real models see, with the ground truth of every turn.

Kinds (``KINDS``):

* ``t2i``: text-to-image, one to three objects;
* ``edit_user``: the user shows an image and asks for an edit (move, recolour, add, remove);
* ``edit_generated``: draw, then edit the image just drawn;
* ``steps``: a step-by-step answer with 2-4 images, one object added per step;
* ``question``: a question about a user image answered in text only (no image may be drawn);
* ``distractor``: draw, then 1-3 unrelated turns (ChatUMM-style), then an edit of the image
  drawn 2-4 turns earlier.

Each JSONL line is ``{"messages": [...], "meta": {"kind": ..., "turns": [...]}}``: one meta
entry per assistant turn with the scenes it must draw (``images``), the text answer it must
contain (``answer``) and, for edits, the operation and the source image it edits. Splits
draw from disjoint seeds; ``HELD_OUT`` (colour, shape) pairs never appear in train.

Run as: ``python tools/toyworld.py out_dir=data/toy n_train=2000`` (writes train/val/test).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fusion.atomic import write_text_atomic
from fusion.toyworld.scenes import (
    CELL_NAMES,
    CELLS,
    COLOURS,
    Obj,
    make_scene,
    random_obj,
    random_scene,
    render,
    scene_to_dicts,
)

KINDS = ("t2i", "edit_user", "edit_generated", "steps", "question", "distractor")
SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_003, "distill": 3_000_003}
HELD_OUT = frozenset({("purple", "triangle"), ("yellow", "circle")})

DRAW = ["Draw {objs}.", "Please draw {objs}.", "Can you make a picture with {objs}?", "Show me {objs}.", "Paint {objs}."]
DRAW_REPLY = ["Here it is.", "Here is the picture.", "Sure, here you go.", "Done, here is the image."]
EDIT_REPLY = ["Done.", "Here is the edited picture.", "Sure, here it is."]
MOVE = ["Move the {obj} to the {where}.", "Put the {obj} at the {where}.", "Shift the {obj} to the {where}."]
RECOLOUR = ["Make the {obj} {colour}.", "Recolour the {obj} to {colour}.", "Change the {obj} to {colour}."]
ADD = ["Add {new}.", "Also add {new}.", "Put {new} in the picture."]
REMOVE = ["Remove the {obj}.", "Take away the {obj}.", "Delete the {obj}."]
DISTRACT = [("What is two plus three?", "Five."), ("Say hello.", "Hello!"), ("What day comes after Monday?", "Tuesday."),
            ("How many sides does a square have?", "Four."), ("Name a colour.", "Red."), ("Is the sky usually blue?", "Yes.")]
BACK = ["In the first picture, {edit}", "Go back to the first image. {edit}", "About the picture from before: {edit}"]


def place(obj: Obj) -> str:
    return f"{obj.describe()} at the {obj.where}"


def list_objs(scene) -> str:
    parts = [place(o) for o in scene]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def ref(obj: Obj) -> str:
    return f"{obj.colour} {obj.shape}"


def text(t: str) -> dict:
    return {"type": "text", "text": t}


class Writer:
    """Turns scenes into messages; renders and stores every image once."""

    def __init__(self, root: Path, split: str, size: int = 64):
        self.root, self.split, self.size = root, split, size
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        self.count = 0

    def image(self, scene) -> dict:
        self.count += 1
        rel = f"images/{self.split}/{self.count:07d}.png"
        render(scene, self.size).save(self.root / rel)
        return {"type": "image", "image": rel}


def random_edit(rng: random.Random, scene, held_out, op: str | None = None, exclude: tuple = ()) -> tuple[str, object, dict]:
    """(instruction, edited scene, edit meta) for one of move / recolour / add / remove (``op``: that one; else one of
    those the scene allows, less ``exclude``, at random)."""
    if op is None:
        ops = [o for o in ["recolour", "move"] + (["add"] if len(scene) < 3 else []) + (["remove"] if len(scene) > 1 else [])
               if o not in exclude]
        op = rng.choice(ops)
    taken = {o.cell for o in scene}
    if op == "add":
        new = random_obj(rng, taken, held_out)
        return rng.choice(ADD).format(new=place(new)), make_scene([*scene, new]), {"op": "add", "target": new.to_dict()}
    obj = rng.choice(scene)
    rest = [o for o in scene if o != obj]
    if op == "remove":
        return rng.choice(REMOVE).format(obj=ref(obj)), make_scene(rest), {"op": "remove", "target": obj.to_dict()}
    if op == "recolour":
        colours = [c for c in COLOURS if c != obj.colour and (c, obj.shape) not in held_out]
        c = rng.choice(colours)
        new = Obj(obj.shape, c, obj.row, obj.col)
        return rng.choice(RECOLOUR).format(obj=ref(obj), colour=c), make_scene([*rest, new]), {"op": "recolour", "target": new.to_dict()}
    cell = rng.choice([c for c in CELLS if c not in taken])
    new = Obj(obj.shape, obj.colour, *cell)
    return rng.choice(MOVE).format(obj=ref(obj), where=CELL_NAMES[cell]), make_scene([*rest, new]), {"op": "move", "target": new.to_dict()}


def unique_refs(scene) -> bool:
    """Edits name objects by colour and shape: every object must be unambiguous."""
    keys = [(o.colour, o.shape) for o in scene]
    return len(set(keys)) == len(keys)


def sample_scene(rng, n, held_out):
    while True:
        s = random_scene(rng, n, held_out)
        if unique_refs(s):
            return s


@dataclass(frozen=True)
class EditMix:
    """How the toy DiTs' pretraining edits are drawn (make_toy's ``dit_p_recolour``, ``dit_p_shared_colour`` and
    ``dit_p_shared_shape``)."""

    p_recolour: float = 0.0
    """A recolour with this probability, else one of the other operations (0: every operation the scene allows alike)."""
    p_shared_colour: float = 0.0
    """With this probability the edit is redrawn until another object of the source scene has the colour of the object
    it changes (a recolour's old colour; an added object's own): the request's colour word then fits more than one
    object, and only colour *and* shape say which one the edit means."""
    p_shared_shape: float = 0.0
    """Likewise with its shape, with this probability (the two are exclusive: their sum is at most 1)."""


def edited_object(source, op: str, target):
    """The object of ``source`` an edit (``op``, ``target``: the object after it) changes, as it was; an added one: itself."""
    if op == "add":
        return target
    if op == "move":
        return next(o for o in source if (o.shape, o.colour) == (target.shape, target.colour))
    return next(o for o in source if o.cell == target.cell)  # recolour, remove


def shares(source, op: str, target, attribute: str = "colour") -> bool:
    """Whether another object of ``source`` has the ``attribute`` (colour or shape) of the object the edit changes
    (:func:`edited_object`)."""
    obj = edited_object(source, op, target)
    return any(getattr(o, attribute) == getattr(obj, attribute) and o.cell != obj.cell for o in source)


def random_edit_scenes(rng: random.Random, held_out=frozenset(), mix: EditMix = EditMix()) -> tuple:
    """(source scene, edited scene, op, target object) of a random edit (for DiT pretraining), drawn as ``mix`` says
    (the default: as the world's own random_edit, with the same random draws)."""
    need = None
    if mix.p_shared_colour or mix.p_shared_shape:  # no extra draw when both are 0 (the builds before stay cached)
        u = rng.random()
        need = "colour" if u < mix.p_shared_colour else "shape" if u < mix.p_shared_colour + mix.p_shared_shape else None
    while True:
        s = sample_scene(rng, rng.choice([1, 2, 2, 3]), held_out)
        op, exclude = None, ()
        if mix.p_recolour > 0:
            op, exclude = ("recolour", ()) if rng.random() < mix.p_recolour else (None, ("recolour",))
        _, edited, meta = random_edit(rng, s, held_out, op, exclude)
        target = Obj(**meta["target"])
        if need is None or shares(s, meta["op"], target, need):
            return s, edited, meta["op"], target


def conversation(kind: str, rng: random.Random, w: Writer, held_out) -> dict:
    msgs, turns = [], []

    def user(*items):
        msgs.append({"role": "user", "content": list(items)})

    def assistant(*items):
        msgs.append({"role": "assistant", "content": list(items)})

    if kind == "t2i":
        s = sample_scene(rng, rng.choice([1, 1, 2, 3]), held_out)
        user(text(rng.choice(DRAW).format(objs=list_objs(s))))
        assistant(text(rng.choice(DRAW_REPLY)), w.image(s))
        turns.append({"images": [scene_to_dicts(s)], "answer": None})
    elif kind in ("edit_user", "edit_generated"):
        s = sample_scene(rng, rng.choice([1, 2, 2, 3]), held_out)
        instr, edited, meta = random_edit(rng, s, held_out)
        if kind == "edit_user":
            user(w.image(s), text(instr))
        else:
            user(text(rng.choice(DRAW).format(objs=list_objs(s))))
            assistant(text(rng.choice(DRAW_REPLY)), w.image(s))
            turns.append({"images": [scene_to_dicts(s)], "answer": None})
            user(text(instr))
        assistant(text(rng.choice(EDIT_REPLY)), w.image(edited))
        turns.append({"images": [scene_to_dicts(edited)], "answer": None, "edit": {**meta, "source": scene_to_dicts(s)}})
    elif kind == "steps":
        final = sample_scene(rng, rng.choice([2, 3]), held_out)
        user(text(f"Draw {list_objs(final)}, one object at a time."))
        items, images, shown = [], [], []
        for o in final:
            shown.append(o)
            items += [text(f"Now {place(o)}."), w.image(make_scene(shown))]
            images.append(scene_to_dicts(make_scene(shown)))
        assistant(*items)
        turns.append({"images": images, "answer": None})
    elif kind == "question":
        s = sample_scene(rng, rng.choice([1, 2, 3]), held_out)
        q = rng.choice(["count", "colour", "where"])
        o = rng.choice(s)
        if q == "count":
            question, answer = "How many objects are in the picture?", ["zero", "one", "two", "three"][len(s)]
        elif q == "colour":
            question, answer = f"What colour is the {o.shape} at the {o.where}?", o.colour
        else:
            question, answer = f"Where is the {ref(o)}?", o.where
        user(w.image(s), text(question))
        assistant(text(f"{answer.capitalize()}."))
        turns.append({"images": [], "answer": answer})
    elif kind == "distractor":
        s = sample_scene(rng, rng.choice([1, 2]), held_out)
        user(text(rng.choice(DRAW).format(objs=list_objs(s))))
        assistant(text(rng.choice(DRAW_REPLY)), w.image(s))
        turns.append({"images": [scene_to_dicts(s)], "answer": None})
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                q, a = rng.choice(DISTRACT)
                user(text(q))
                assistant(text(a))
                turns.append({"images": [], "answer": a.rstrip(".!").lower()})
            else:
                other = sample_scene(rng, 1, held_out)
                user(text(rng.choice(DRAW).format(objs=list_objs(other))))
                assistant(text(rng.choice(DRAW_REPLY)), w.image(other))
                turns.append({"images": [scene_to_dicts(other)], "answer": None})
        instr, edited, meta = random_edit(rng, s, held_out)
        user(text(rng.choice(BACK).format(edit=instr[0].lower() + instr[1:])))
        assistant(text(rng.choice(EDIT_REPLY)), w.image(edited))
        turns.append({"images": [scene_to_dicts(edited)], "answer": None, "edit": {**meta, "source": scene_to_dicts(s)}, "refers_back": True})
    else:
        raise ValueError(f"unknown conversation kind {kind!r}; expected one of {KINDS}")
    return {"messages": msgs, "meta": {"kind": kind, "turns": turns}}


def drawn_images(meta: dict, image_roles: list[str]) -> list[tuple[int, dict, int, int | None]]:
    """Every image the assistant draws in a conversation (``meta`` its ground truth, ``image_roles`` the role of each of
    its images in order): (index among the conversation's images, its turn's meta, its place in that turn, the index of
    the earlier image the drawing starts from: the edited image, the previous step, or None for a new drawing)."""
    drawn = [k for k, role in enumerate(image_roles) if role == "assistant"]
    turns = [(turn, j) for turn in meta["turns"] for j in range(len(turn["images"]))]
    out = []
    for k, (turn, j) in zip(drawn, turns):
        if meta["kind"] == "steps":
            start = k - 1 if j else None
        elif "edit" in turn:  # a user's image or the first drawing (refers back after distractors) is image 0
            start = 0 if turn.get("refers_back") or meta["kind"] == "edit_user" else k - 1
        else:
            start = None
        out.append((k, turn, j, start))
    return out


def write_split(root: str | Path, split: str, n: int, seed: int = 0, kinds=KINDS, size: int = 64) -> Path:
    """Write ``<root>/<split>.jsonl`` (+ images) with ``n`` conversations, kinds in rotation."""
    root = Path(root)
    rng = random.Random(SPLIT_SEEDS[split] + seed)
    held_out = HELD_OUT if split == "train" else frozenset()
    w = Writer(root, split, size)
    path = root / f"{split}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(conversation(kinds[i % len(kinds)], rng, w, held_out)) + "\n" for i in range(n))
    tmp.replace(path)
    return path


class TextOnly(Writer):
    """A writer of text-only lines: each drawing an image item without a file (``fusion.data.drawings_as_placeholders``)."""

    def __init__(self):
        self.count = 0

    def image(self, scene) -> dict:
        self.count += 1
        return {"type": "image"}


def write_distill_corpus(root: str | Path, n: int, seed: int = 0, name: str = "distill") -> Path:
    """``<root>/<name>.jsonl``: ``n`` text-only text-to-image requests over every (colour, shape) pair, the ones the
    train split holds out too (the toy stage 2's ``stage.distill_data``: what a caption corpus is to a published DiT).
    No image is drawn: each line's one drawing is an image item without a file."""
    rng = random.Random(SPLIT_SEEDS["distill"] + seed)
    return write_text_atomic(Path(root) / f"{name}.jsonl",
                             "".join(json.dumps(conversation("t2i", rng, TextOnly(), frozenset())) + "\n" for _ in range(n)))


def make_toyworld(out_dir: str | Path, seed: int = 0, name: str = "toyworld", n_train: int = 600, n_val: int = 60, n_test: int = 60,
                  size: int = 64) -> Path:
    """All three splits under ``<out_dir>/<name>``."""
    root = Path(out_dir) / name
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        write_split(root, split, n, seed, size=size)
    return root
