"""The frame a ``stage.frame_select=learned`` head hands the DiT for every edit of a toy-world split in free-running
chat (each user turn sent to a ``Chat`` as the evaluator sends them, so earlier images are the model's own drawings;
default generation settings), beside whether the edit was applied and preserved and its source drawn right
(``fusion.toyworld.evaluate.Scorer``). Not part of the toolkit.

Run as: python docs/dev/toy_chat_frames.py outputs/demo/align/final [checkpoints/toy/toyworld/test.jsonl] [kinds, comma-separated]
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from fusion.data import read_jsonl
from fusion.generate import Chat, GenerationSettings
from fusion.model import FusedModel
from fusion.toyworld.evaluate import Scorer, TurnOutput

model = FusedModel.from_pretrained(sys.argv[1]).eval()
split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
kinds = (sys.argv[3] if len(sys.argv) > 3 else "distractor,edit_generated,edit_user").split(",")
tally = Counter()
for conv, line in zip(read_jsonl(split), open(split)):
    meta = json.loads(line)["meta"]
    if meta["kind"] not in kinds:
        continue
    chat, outputs = Chat(model, GenerationSettings()), []
    for msg in conv.messages:
        if msg["role"] == "user":
            new = chat.send(" ".join(x["text"] for x in msg["content"] if x["type"] == "text"),
                            [x["image"] for x in msg["content"] if x["type"] == "image"])
            outputs.append(TurnOutput([s.image for s in new if s.role == "assistant" and s.kind == "image"],
                                      " ".join(s.text for s in new if s.role == "assistant" and s.kind == "text")))
    scorer = Scorer()
    scorer.score(meta, outputs)
    op = next(t["edit"]["op"] for t in meta["turns"] if "edit" in t)
    pick = chat.draws[-1].condition_images if chat.draws else None
    right = pick == [0] if meta["turns"][-1].get("refers_back") or meta["kind"] == "edit_user" else pick == [len(chat.images) - 2]
    tally[(meta["kind"], op, "frame right" if right else f"frame {pick}", "preserved" if scorer.hits["edit_preserved"] else "lost",
           "source right" if scorer.hits["edit_source_right"] else "source wrong")] += 1
print(f"{sys.argv[1]} on {split} (free-running chat)")
for key, n in sorted(tally.items()):
    print(f"  {n:3d}  " + ", ".join(key))
