"""Attention of the toy Wan DiT's self-attention from each target-frame token to the condition
frame's token at the same cell (what copying the frame needs), per block and head, on 32
held-out edits at t = 0.3 and 0.7 (docs/toyworld_log.md, the toy DiT; uniform attention would be 1/128).
Not part of the toolkit.

Run as: python docs/dev/toy_dit_attention.py checkpoints/toy/wan
"""

from __future__ import annotations

import random
import sys

import torch
import torch.nn.functional as F

from backbones.generator.text_encoder import TextEncoder
from fusion.toyworld import pretrain as P

root = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/toy/wan"
gen = P.load_toy_generator("wan", root)
text = TextEncoder.from_pretrained(root)
gen.transformer.eval()
target, cond, ids, mask, _ = P._latent_pool(gen, text.tokenizer, random.Random(777), 32, 1.0, False)["edit"]
seen, sdpa = [], F.scaled_dot_product_attention


def capture(query, key, value, *args, **kwargs):
    if query.shape[-2] == key.shape[-2]:  # self-attention, [B, heads, tokens, head_dim]
        seen.append(torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, -1))
    return sdpa(query, key, value, *args, **kwargs)


with torch.no_grad():
    states = text.states(ids, mask)
    F.scaled_dot_product_attention = capture
    for t in (0.3, 0.7):
        seen.clear()
        noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
        gen.flow_loss(target, cond, states, mask, torch.full((len(target),), t), noise)
        cells = seen[0].shape[-1] // 2
        print(f"t={t}")
        for block, a in enumerate(seen):
            same = a[..., cells:, :cells].diagonal(dim1=-2, dim2=-1).mean(dim=(0, -1))
            mass = a[..., cells:, :cells].sum(-1).mean(dim=(0, -1))
            print(f"  block {block}: same cell by head {[round(x, 3) for x in same.tolist()]}, condition frame mass {[round(x, 2) for x in mass.tolist()]}")
    F.scaled_dot_product_attention = sdpa
