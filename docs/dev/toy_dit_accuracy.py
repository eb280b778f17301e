"""make_toy's sampled-scene scores of a pretrained toy Wan through its own text encoder
(``fusion.toyworld.pretrain.dit_accuracy``: text-to-image, edits by operation, preservation, edits in
context) with more held-out items and other sampler settings. Not part of the toolkit.

Run as: python docs/dev/toy_dit_accuracy.py checkpoints/toy/wan [n=128] [text=<folder>] [steps:guidance ...]   (default 20:3)
    text=: the folder whose text_encoder/ and tokenizer/ to use (default: the DiT's own), e.g. a fused model's
    stage-2 DiT through its teacher: outputs/demo/align/final/generator text=checkpoints/toy/wan
"""

from __future__ import annotations

import sys
import time

import torch

from backbones.generator.text_encoder import TextEncoder
from fusion.toyworld.pretrain import dit_accuracy, load_toy_generator

root, rest = sys.argv[1], sys.argv[2:]
n = int(rest.pop(0).removeprefix("n=")) if rest and rest[0].startswith("n=") else 128
text_root = rest.pop(0).removeprefix("text=") if rest and rest[0].startswith("text=") else root
gen, text = load_toy_generator("wan", root), TextEncoder.from_pretrained(text_root)
gen.transformer.eval()
text.encoder.eval()
for spec in rest or ["20:3"]:
    steps, guidance = spec.split(":")
    t0 = time.time()
    with torch.no_grad():
        acc = dit_accuracy(gen, text, n=n, steps=int(steps), guidance=float(guidance))
    print(f"{root} n={n} steps={steps} guidance={guidance}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
          + f" ({time.time() - t0:.0f} s)", flush=True)
