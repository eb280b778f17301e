"""Drawings read back exactly, with and without a (colour, shape) pair the train split never holds
(``HELD_OUT``), from an evaluation's ``items.jsonl`` (tools/evaluate.py): text-to-image, every other
drawing, and edits (exact scene) by operation, an edit counting as held-out when its source or its
result holds such a pair. Not part of the toolkit.

Run as: python docs/dev/toy_items_held_out.py outputs/demo/eval/items.jsonl [<conversations.jsonl> <distill.jsonl>]
With the evaluated conversations and a distillation corpus (stage.distill_data), the text-to-image drawings
are also split by whether their request's words occur verbatim in the corpus.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from fusion.toyworld.conversations import HELD_OUT

pairs = [f"{colour} {shape}" for colour, shape in sorted(HELD_OUT)]
held = lambda words: any(p in (words or "") for p in pairs)  # noqa: E731
c = Counter()
for line in open(sys.argv[1]):
    r = json.loads(line)
    for im in r["images"]:
        c["t2i" if r["kind"] == "t2i" else "other", held(im["want"]), im["exact"]] += 1
    if "edit" in r:
        last = r["images"][-1]
        for group in ("edits", f"edit {r['edit']['op']}"):
            c[group, held(last["want"]) or held(r["edit"]["source"]), last["exact"]] += 1
if len(sys.argv) > 3:
    first_words = lambda r: next(i["text"] for i in r["messages"][0]["content"] if i["type"] == "text")  # noqa: E731
    asked = [first_words(json.loads(line)) for line in open(sys.argv[2])]
    corpus = {first_words(json.loads(line)) for line in open(sys.argv[3])}
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r["kind"] == "t2i":
            for im in r["images"]:
                c["t2i, request in the corpus" if asked[r["line"] - 1] in corpus else "t2i, request not in the corpus",
                  held(im["want"]), im["exact"]] += 1
for group in ("t2i", "t2i, request in the corpus", "t2i, request not in the corpus", "other", "edits", "edit recolour", "edit add", "edit remove", "edit move"):
    print(f"{group}: " + " | ".join(f"{'with a held-out pair' if h else 'without'} {c[group, h, True]}/{c[group, h, True] + c[group, h, False]}"
                                    for h in (True, False)))
