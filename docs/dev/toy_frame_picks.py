"""What a ``stage.frame_select=learned`` head picks on the toy world's test conversations, against
the frame the conversation's ground truth says the drawing starts from: the edited image for
edits (the first image for the turn that refers back after distractors), the latest step for
step-by-step answers, none for a new drawing. Each conversation's last assistant image, its
true history (teacher forcing: the images are the data set's, not the model's drawings).
Not part of the toolkit.

Run as: python docs/dev/toy_frame_picks.py outputs/frames1/final [checkpoints/toy/toyworld/test.jsonl]
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from fusion.data import load_images, read_jsonl
from fusion.model import FusedModel

model = FusedModel.from_pretrained(sys.argv[1])
split = Path(sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl")
model.settings["target_image"] = "last"
metas = [json.loads(x)["meta"] for x in split.read_text().splitlines() if x.strip()]
right, seen = Counter(), defaultdict(Counter)
for conv, meta in zip(read_jsonl(split), metas):
    if meta["kind"] == "question":  # nothing drawn
        continue
    sample = model.packed_context_states([model.prepare_align_sample(load_images(conv))])[0]
    n = 0 if sample.cond is None else sample.cond.shape[0]
    if n == 0:
        continue
    kind = meta["kind"] + (" (refers back)" if meta["turns"][-1].get("refers_back") else "")
    if meta["kind"] == "distractor":
        kind += f", {n} earlier" if n > 1 else ", 1 earlier"
    want = n - 1 if meta["kind"] == "steps" else 0 if "edit" in meta["turns"][-1] else None
    k = model.pick_frame(sample.ctx_hidden, sample.ctx_ids)
    seen[kind]["none" if k is None else f"{k} of {n}"] += 1
    right[kind] += int(k == want)
for kind in sorted(seen):
    total = sum(seen[kind].values())
    print(f"{kind}: right {right[kind]}/{total}; picks {dict(seen[kind])}")
