"""The toy DiT drawing the test split's text-to-image requests through its *own* text encoder
(no MLLM, no connector), scored like the fused model: what the connector's figures are capped
by on the same requests. Not part of the toolkit.

Run as: python docs/dev/toy_dit_on_requests.py [checkpoints/toy/wan] [checkpoints/toy/toyworld/test.jsonl]
"""

from __future__ import annotations

import json
import sys

import torch

from backbones.generator.base import to_pil
from backbones.generator.text_encoder import TextEncoder
from fusion.toyworld.pretrain import load_toy_generator
from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import scene_from_dicts

root = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/toy/wan"
split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
gen, text = load_toy_generator("wan", root), TextEncoder.from_pretrained(root)
requests, scenes = [], []
for line in open(split):
    conv = json.loads(line)
    if conv["meta"]["kind"] != "t2i":
        continue
    user = next(m for m in conv["messages"] if m["role"] == "user")
    requests.append(" ".join(x["text"] for x in user["content"] if x["type"] == "text"))
    scenes.append(scene_from_dicts(conv["meta"]["turns"][0]["images"][0]))
with torch.no_grad():
    states, mask = text.encode(requests)
    images = to_pil(gen.sample(states, mask, steps=20, guidance=3.0, generator=torch.Generator().manual_seed(0)))
ok = [read_scene(im) == s for im, s in zip(images, scenes)]
single = [k for k, s in zip(ok, scenes) if len(s) == 1]
multi = [k for k, s in zip(ok, scenes) if len(s) > 1]
print(f"t2i exact {sum(ok)}/{len(ok)}; single {sum(single)}/{len(single)}; several {sum(multi)}/{len(multi)}")
