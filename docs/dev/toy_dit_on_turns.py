"""The toy DiT drawing every assistant image of a split through its *own* text encoder (no MLLM, no
connector), with the true history: the prompt is what stage 2's teacher reads for that image
(``Conversation.text_before_image``) and the condition frame is the image the ground truth says
the drawing starts from (the edited image; the previous step; none for a new drawing). Scored
exact like the evaluator, by conversation kind and turn: what the fused model's figures on the
same turns are capped by, one drawing at a time (no compounding). ``prompt=request`` reads only
the last user message and the assistant's words before the image instead (drops distractor
turns from the teacher's prompt). Not part of the toolkit.

Run as: python docs/dev/toy_dit_on_turns.py [checkpoints/toy/wan] [checkpoints/toy/toyworld/test.jsonl] [teacher|request]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch

from backbones.generator.base import to_pil
from backbones.generator.text_encoder import TextEncoder
from fusion.data import read_jsonl
from fusion.toyworld.pretrain import _images, load_toy_generator
from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import scene_from_dicts

root = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/toy/wan"
split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
mode = sys.argv[3] if len(sys.argv) > 3 else "teacher"
gen, text = load_toy_generator("wan", root), TextEncoder.from_pretrained(root)


def request_only(raw: dict, k: int) -> str:
    """The last user message before image ``k`` and the assistant's words before it."""
    seen, last_user, words = 0, "", []
    for m in raw["messages"]:
        if m["role"] == "user":
            last_user, words = " ".join(x["text"] for x in m["content"] if x["type"] == "text"), []
        for x in m["content"]:
            if x["type"] == "image":
                if seen == k:
                    return " ".join([last_user, *words] if m["role"] == "assistant" else [last_user])
                seen += 1
                words = []
            elif m["role"] == "assistant":
                words.append(x["text"])
    raise IndexError(k)


items = []  # (group, prompt, source scene or None, target scene)
for conv, line in zip(read_jsonl(split), open(split)):
    raw = json.loads(line)
    kind, turns = raw["meta"]["kind"], raw["meta"]["turns"]
    roles = [m["role"] for m in raw["messages"] for x in m["content"] if x["type"] == "image"]
    targets = [k for k, r in enumerate(roles) if r == "assistant"]
    scenes = [(t, j, s) for t in turns for j, s in enumerate(t["images"])]
    for k, (turn, j, scene) in zip(targets, scenes):
        if kind == "steps":
            source, group = (turn["images"][j - 1] if j else None), f"steps, image {j + 1}"
        elif "edit" in turn:
            source, group = turn["edit"]["source"], f"{kind} edit ({turn['edit']['op']})"
        else:
            source, group = None, f"{kind} drawing"
        prompt = conv.text_before_image(k) if mode == "teacher" else request_only(raw, k)
        items.append((group, prompt, None if source is None else scene_from_dicts(source), scene_from_dicts(scene)))

hits = defaultdict(list)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for framed in (False, True):
        batch = [x for x in items if (x[2] is not None) == framed]
        for i in range(0, len(batch), 32):
            chunk = batch[i:i + 32]
            states, mask = text.encode([x[1] for x in chunk])
            cond = gen.encode(_images([x[2] for x in chunk]))[:, None] if framed else None
            images = to_pil(gen.sample(states, mask, cond, steps=20, guidance=3.0, generator=g))
            for im, x in zip(images, chunk):
                hits[x[0]].append(read_scene(im) == x[3])
print(f"{root} on {split}, prompt={mode}")
for group in sorted(hits):
    print(f"  {group:32s} {sum(hits[group]):3d}/{len(hits[group]):3d} = {sum(hits[group]) / len(hits[group]):.3f}")
print(f"  all {sum(map(sum, hits.values()))}/{sum(map(len, hits.values()))}")
