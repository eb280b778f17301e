"""A toy Wan DiT's sampled scenes read back exactly (its pretrain.json figures) plus edits with 2-3
condition frames: the first referred back to, or the latest (``dit_accuracy(..., frames=True)``;
docs/toyworld_log.md, the several-frames trial). Not part of the toolkit.

Run as: python docs/dev/toy_dit_frames.py checkpoints/toy/wan [n=64]
"""

from __future__ import annotations

import sys

from backbones.generator.text_encoder import TextEncoder
from fusion.toyworld import pretrain as P

root = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/toy/wan"
gen = P.load_toy_generator("wan", root)
text = TextEncoder.from_pretrained(root)
gen.transformer.eval()
acc = P.dit_accuracy(gen, text, n=int(sys.argv[2]) if len(sys.argv) > 2 else 64, frames=True)
print({k: round(v, 3) for k, v in acc.items()})
