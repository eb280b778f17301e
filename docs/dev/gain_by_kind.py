"""The conditioning gain (fusion/gain.py) of a fused model and of its DiT's own text encoder, split by
conversation kind (the first 12 conversations of each kind that have a target image). Not part of the toolkit.

Run as: python docs/dev/gain_by_kind.py outputs/demo/align/final checkpoints/toy/toyworld/test.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch

from backbones.generator.text_encoder import TextEncoder
from fusion.data import load_images, read_jsonl
from fusion.gain import conditioning_gain
from fusion.model import FusedModel

model_dir, path = sys.argv[1], sys.argv[2]
model = FusedModel.from_pretrained(model_dir, device="cpu")
if model.teacher is None:
    model.set_teacher(TextEncoder.from_pretrained(model.generator_source, device="cpu"))
kinds = [json.loads(line)["meta"]["kind"] for line in open(path) if line.strip()]
by_kind = defaultdict(list)
g = torch.Generator().manual_seed(0)
for conv, kind in zip(read_jsonl(path), kinds):
    if conv.num_target_images() and len(by_kind[kind]) < 12:
        by_kind[kind].append(model.prepare_align_sample(load_images(conv), g))
for kind, samples in by_kind.items():
    r = conditioning_gain(model, samples)
    row = lambda p: "/".join(f"{r[f'{p}@{t}']:.3f}" for t in (0.3, 0.5, 0.7, 0.9))  # noqa: E731
    print(f"{kind:15s} n={len(samples)}  fused {row('gain')}  own encoder {row('reference_gain')}  "
          f"loss own {row('loss_reference')}  loss own zero {row('loss_reference_zero')}", flush=True)
