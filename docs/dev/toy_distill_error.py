"""How closely a fused model's connector says what its DiT's own encoder says, turn by turn: the
aligned distillation error (``stage.distill_target=aligned``, :mod:`fusion.distill`) of every
assistant image of a split with the true history, grouped by conversation kind and edit operation,
and split by the request word a token carries (the colour a recolour asks for, the object's
colour and shape words, every other word) beside the context tokens that should say nothing
(mean square onto zero). Run it on the train split to see whether the connector fits the turns it
was taught, on the test split for held-out turns. Not part of the toolkit.

Run as: python docs/dev/toy_distill_error.py outputs/demo/align/final [checkpoints/toy/toyworld/train.jsonl] [max conversations]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import replace

import torch

from backbones.generator.text_encoder import TextEncoder
from fusion.data import load_images, read_jsonl
from fusion.distill import context_pieces
from fusion.model import FusedModel
from fusion.toyworld.scenes import COLOURS, SHAPES

model = FusedModel.from_pretrained(sys.argv[1]).eval()
split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/train.jsonl"
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 10**9
model.set_teacher(TextEncoder.from_pretrained(model.generator_source, device=model.generator.device))
model.settings["target_image"] = "last"



def role_of(word: str, edit: dict | None) -> str:
    """Which part of the request a context token's word is."""
    w = word.strip().lower().strip(".,")
    if edit and edit["op"] == "recolour" and w == edit["target"]["colour"]:
        return "new colour"
    if w in COLOURS:
        return "colour"
    if w in SHAPES:
        return "shape"
    return "other word"


err = defaultdict(lambda: defaultdict(list))  # group -> part -> squared errors (one per token)
with torch.no_grad():
    for n, (conv, line) in enumerate(zip(read_jsonl(split), open(split))):
        if n >= limit:
            break
        raw = json.loads(line)
        kind, turns = raw["meta"]["kind"], raw["meta"]["turns"]
        targets = [k for k, (r, _) in enumerate(conv.image_items()) if r == "assistant"]
        scenes = [t for t in turns for _ in t["images"]]
        for k, turn in zip(targets, scenes):
            edit = turn.get("edit")
            if edit:
                group = f"{kind} edit ({edit['op']})" + (", refers back" if turn.get("refers_back") else "")
            else:
                group = f"{kind} drawing"
            # the request from the whole conversation: a turn that draws several images gives each its own words
            sample = replace(model.prepare_align_sample(load_images(conv.until_image(k))), request=conv.text_before_image(k))
            states, mask, _ = model.sample_states(sample)
            t_states, t_mask = model._teacher_states(sample.request)
            target, real = model.aligned_teacher(sample, t_states, t_mask, states.shape[1])
            per_tok = (states[0].float() - target.float()).pow(2).mean(-1)
            pieces = context_pieces(model.mllm.tokenizer, sample.ctx_ids)
            start = model.connector_start(sample.ctx_ids)  # stage.connector_span: the connector's window
            for i in range(len(per_tok)):
                pos = start + i
                part = role_of(pieces[pos], edit) if real[i] else ("context before the request" if pos < sample.neg_len else "silent request tokens")
                err[group][part].append(float(per_tok[i]))
parts = ["new colour", "colour", "shape", "other word", "silent request tokens", "context before the request"]
print(f"{sys.argv[1]} on {split}: mean squared error per token (tokens), aligned distillation target")
print(f"  {'group':42s}" + "".join(f"{p:>28s}" for p in parts))
for group in sorted(err):
    cells = [f"{sum(v) / len(v):.4f} ({len(v)})" if (v := err[group].get(p)) else "-" for p in parts]
    print(f"  {group:42s}" + "".join(f"{c:>28s}" for c in cells))
