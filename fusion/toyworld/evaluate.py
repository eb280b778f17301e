"""Score what a fused model produced on toy-world conversations against their ground truth.

Per assistant turn the model's output is (images drawn, text). Metrics (all in [0, 1]):

* ``trigger_precision`` / ``trigger_recall`` / ``trigger_f1``: images drawn vs images due,
  counted per turn (a text-only answer that draws is a false positive);
* ``exact_scene``: drawn image read back (``reader.read_scene``) equals the ground truth;
  also by kind and, for text-to-image, by object count (``t2i_1obj``, ``t2i_multi`` and within it
  ``t2i_2obj``, ``t2i_3obj``...: compare sets by count, their mixes differ);
* ``attr_shape`` / ``attr_colour`` / ``attr_position`` / ``attr_count``: per ground-truth
  object (matched by cell) and per image (count);
* ``edit_applied`` / ``edit_preserved`` and per operation (``edit_<op>_applied``...), both against the
  ground truth of the image edited; ``edit_source_right``: that image, where the model drew it
  itself, was drawn exactly (a user's image always is), and ``edit_preserved_source_right``: the
  preservation of those edits alone (so a wrong earlier drawing and a careless edit are told apart);
* ``tracking``: exact scene of the edit that refers back to an image before distractors; split by
  what the generator was handed (``tracking_one_earlier``: that image was the only earlier one, a
  plain edit; ``tracking_several_earlier``: other drawings came after it, so the DiT must pick the
  right one of several condition frames);
* ``text_answer``: the expected answer word is in the text (questions and distractors).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from PIL import Image

from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import Obj, scene_from_dicts


@dataclass
class TurnOutput:
    images: list[Image.Image] = field(default_factory=list)
    text: str = ""


class Scorer:
    """Accumulates hits/totals per metric over many conversations."""

    def __init__(self, items: list | None = None):
        self.hits: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)
        self.tp = self.fp = self.fn = 0
        self.items = items  # a list: one record per scored turn is appended (:func:`turn_record`)

    def add(self, key: str, ok: bool) -> None:
        self.hits[key] += float(ok)
        self.totals[key] += 1

    def score(self, meta: dict, outputs: list[TurnOutput], where: dict | None = None) -> None:
        """Score one conversation's assistant turns; ``where`` (e.g. file and line) goes into each turn's record."""
        kind = meta["kind"]
        earlier = 0  # images due before this turn (the condition frames of a model that drew them all)
        drawn: list[tuple] = []  # (ground truth, read back) of every image the model drew so far
        for t, (turn, out) in enumerate(zip(meta["turns"], outputs)):
            due = [scene_from_dicts(s) for s in turn["images"]]
            got = [read_scene(im) for im in out.images]  # each drawing read back once, for the scores and the record
            if self.items is not None:
                self.items.append(turn_record(kind, t, turn, due, got, out.text, where))
            self.tp += min(len(due), len(got))
            self.fp += max(0, len(got) - len(due))
            self.fn += max(0, len(due) - len(got))
            for i, gt in enumerate(due):
                pred = got[i] if i < len(got) else None
                self._image(kind, gt, pred)
                if "edit" in turn and i == len(due) - 1:
                    self._edit(turn["edit"], gt, pred, drawn)
                    if turn.get("refers_back"):
                        self.add("tracking", pred == gt)
                        self.add("tracking_one_earlier" if earlier == 1 else "tracking_several_earlier", pred == gt)
                drawn.append((gt, pred))
            earlier += len(due)
            if turn.get("answer") is not None:
                self.add("text_answer", answered(out.text, turn["answer"]))

    def _image(self, kind: str, gt, pred) -> None:
        exact = pred == gt
        self.add("exact_scene", exact)
        self.add(f"exact_scene_{kind}", exact)
        if kind == "t2i":
            self.add("t2i_1obj" if len(gt) == 1 else "t2i_multi", exact)
            if len(gt) > 1:  # by count too: two sets of the same size can mix 2- and 3-object requests differently
                self.add(f"t2i_{len(gt)}obj", exact)
        by_cell = {o.cell: o for o in (pred or ())}
        self.add("attr_count", pred is not None and len(pred) == len(gt))
        for o in gt:
            p = by_cell.get(o.cell)
            self.add("attr_position", p is not None)
            self.add("attr_shape", p is not None and p.shape == o.shape)
            self.add("attr_colour", p is not None and p.colour == o.colour)

    def _edit(self, edit: dict, gt, pred, drawn: list[tuple] = ()) -> None:
        op = edit["op"]
        target = Obj(**edit["target"])
        source = scene_from_dicts(edit["source"])
        pred = pred or ()
        applied = (target not in pred) if op == "remove" else (target in pred)
        kept = [o for o in gt if o in source and o != target]  # what the edit must leave alone
        preserved = all(o in pred for o in kept) and len(pred) == len(gt)
        for key in ("edit", f"edit_{op}"):
            self.add(f"{key}_applied", applied)
            self.add(f"{key}_preserved", preserved)
        # the image edited was in context as it should be: the model's first drawing of the source scene read back
        # exactly (a later turn may draw the same scene again: a distractor, not the picture the edit refers back
        # to); a user's image (never drawn by the model) always is
        mine = [p for g, p in drawn if g == source]
        source_right = not mine or mine[0] == source
        self.add("edit_source_right", source_right)
        if source_right:
            self.add("edit_preserved_source_right", preserved)

    def report(self) -> dict[str, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        out = {"trigger_precision": p, "trigger_recall": r, "trigger_f1": 2 * p * r / (p + r) if p + r else 0.0}
        for k in sorted(self.totals):
            out[k] = self.hits[k] / self.totals[k]
        out["n"] = {k: int(v) for k, v in sorted(self.totals.items())}
        return out


def say(scene) -> str | None:
    """A scene in words, objects in grid order ("red circle at top left, blue square at centre"); None: unreadable."""
    if scene is None:
        return None
    return ", ".join(f"{o.colour} {o.shape} at {o.where}" for o in sorted(scene, key=lambda o: o.cell)) or "empty"


def turn_record(kind: str, index: int, turn: dict, due: list, got: list, text: str, where: dict | None = None) -> dict:
    """What one assistant turn should have held and what the model gave, in words (``items.jsonl`` of tools/evaluate.py):
    each due image's scene (``due``) and the scene read back from the drawing in its place (``got``), the edit asked for,
    the text said and the answer expected."""
    rec = {**(where or {}), "kind": kind, "turn": index, "images_due": len(due), "images_drawn": len(got),
           "images": [{"want": say(g), "got": say(got[i]) if i < len(got) else None, "exact": i < len(got) and got[i] == g}
                      for i, g in enumerate(due)],
           "extra_images": [say(p) for p in got[len(due):]]}
    if "edit" in turn:
        e = turn["edit"]
        rec["edit"] = {"op": e["op"], "target": say([Obj(**e["target"])]), "source": say(scene_from_dicts(e["source"])),
                       "refers_back": bool(turn.get("refers_back"))}
    rec["text"] = text
    if turn.get("answer") is not None:
        rec["answer"], rec["answered"] = turn["answer"], answered(text, turn["answer"])
    return rec


def answered(text: str, answer: str) -> bool:
    """Every word of the expected answer is a word of the text (case-insensitive)."""
    words = re.findall(r"[a-z]+", text.lower())
    return bool(answer) and all(w in words for w in answer.lower().split())
