"""How good the labels of a ``stage.frame_select=learned`` head are, and how well the head follows the truth: for
every assistant image with earlier images of a toy-world split (true history), the frame the DiT's own flow loss
prefers (``fusion.frames.best_frames`` with the teacher's states, as stage 2 labels it; at each ``t`` given, with
``noises`` draws each) against the frame the ground truth starts from (the edited image; the previous step; none
for a new drawing), and the head's pick against the same truth. By conversation kind and operation.
Not part of the toolkit.

Run as: python docs/dev/toy_frame_labels.py outputs/demo/align/final [checkpoints/toy/toyworld/test.jsonl] [n_conversations] [t,t...] [noises]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch

from backbones.generator.text_encoder import TextEncoder
from fusion.data import load_images, read_jsonl
from fusion.frames import best_frames
from fusion.model import FusedModel
from fusion.toyworld.conversations import drawn_images

model = FusedModel.from_pretrained(sys.argv[1]).eval()
split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
n_conv = int(sys.argv[3]) if len(sys.argv) > 3 else 10**9
ts = [float(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "0.8").split(",")]
noises = int(sys.argv[5]) if len(sys.argv) > 5 else 1
model.settings["target_image"] = "last"
gen = model.generator
model.set_teacher(TextEncoder.from_pretrained(model.generator_source, device=gen.device))
right, total = defaultdict(lambda: defaultdict(int)), defaultdict(int)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for i, (conv, line) in enumerate(zip(read_jsonl(split), open(split))):
        if i >= n_conv:
            break
        meta = json.loads(line)["meta"]
        kind = meta["kind"]
        for k, turn, _, start in drawn_images(meta, [role for role, _ in conv.image_items()]):
            if k == 0:
                continue
            want = k if start is None else start  # index k: none (the candidates are images 0 .. k-1, then none)
            group = "steps" if kind == "steps" else f"{kind} {turn['edit']['op']}" if "edit" in turn else f"{kind} new drawing"
            sample = model.prepare_align_sample(load_images(conv.until_image(k)), g)
            states, mask = model._teacher_states(sample.request)
            for t in ts:
                for _ in range(noises):
                    noise = torch.randn(sample.target[None].shape, generator=g)
                    [(best, _)] = best_frames(gen, [(sample.target[None].to(gen.dtype), noise.to(gen.dtype), sample.cond, states[0], mask[0])], t)
                    right[group][f"label t={t}"] += int(best == want)
            pick = model.frame_indices(sample.cond.shape[0], sample.ctx_ids, lambda: model.packed_context_states([sample])[0].ctx_hidden)
            right[group]["head"] += int((pick[0] if pick else k) == want)
            total[group] += 1
print(f"{sys.argv[1]} on {split}: right against the ground truth's frame (labels: {noises} noise(s) per t)")
for group in sorted(total):
    n = total[group]
    print(f"  {group:28s} n={n:3d}  " + "  ".join(f"{key} {v / (n * (1 if key == 'head' else noises)):.3f}" for key, v in right[group].items()))
