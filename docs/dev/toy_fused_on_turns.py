"""A fused model drawing every assistant image of a split with the true history (teacher forcing:
the earlier images are the data set's, not the model's drawings), through the path generation
takes: the MLLM's states of the context up to the image's ``<|bov|>``, the connector, the frames
``stage.frame_select`` hands the DiT, the trained negative. Scored exact by conversation kind and
turn, beside the frame picked against the one the ground truth starts from; compare with
docs/dev/toy_dit_on_turns.py (the DiT's own encoder on the same turns). Not part of the toolkit.

Run as: python docs/dev/toy_fused_on_turns.py outputs/demo/align/final [checkpoints/toy/toyworld/test.jsonl]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch

from backbones.generator.base import to_pil
from fusion.data import load_images, read_jsonl
from fusion.model import FusedModel
from fusion.toyworld.conversations import drawn_images
from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import scene_from_dicts

model = FusedModel.from_pretrained(sys.argv[1]).eval()
split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
model.settings["target_image"] = "last"
gen = model.generator



hits, picks = defaultdict(list), defaultdict(lambda: defaultdict(int))
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for conv, line in zip(read_jsonl(split), open(split)):
        raw = json.loads(line)
        kind = raw["meta"]["kind"]
        for k, turn, j, want in drawn_images(raw["meta"], [r for r, _ in conv.image_items()]):
            scene = turn["images"][j]
            if kind == "steps":
                group = f"steps, image {j + 1}"
            elif "edit" in turn:
                group = f"{kind} edit ({turn['edit']['op']})"
            else:
                group = f"{kind} drawing"
            sample = model.prepare_align_sample(load_images(conv.until_image(k)))
            states, mask, _ = model.sample_states(sample)
            neg, neg_mask = model.negative_states(sample, states, mask)
            idx = [] if sample.cond is None else model.frame_indices(sample.cond.shape[0], sample.ctx_ids,
                                                                      lambda: model.packed_context_states([sample])[0].ctx_hidden)
            cond = sample.cond[idx][None] if idx else None
            latent = gen.sample(states.to(gen.dtype), mask, cond, steps=20, guidance=3.0, negative=(neg.to(gen.dtype), neg_mask),
                                generator=g)
            hits[group].append(read_scene(to_pil(latent)[0]) == scene_from_dicts(scene))
            picks[group]["right" if (idx[0] if idx else None) == want else f"picked {idx}, want {want}"] += 1
print(f"{sys.argv[1]} on {split} (teacher forcing)")
for group in sorted(hits):
    print(f"  {group:32s} {sum(hits[group]):3d}/{len(hits[group]):3d} = {sum(hits[group]) / len(hits[group]):.3f}   frames {dict(picks[group])}")
print(f"  all {sum(map(sum, hits.values()))}/{sum(map(len, hits.values()))}")
