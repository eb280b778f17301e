"""The toy Wan DiT's one-step prediction of an edit at fixed t (docs/toyworld_log.md, the toy DiT): from the
true noisy target at t, x0 = x_t - t v is decoded and read back; "kept" is the share of edits
whose other source objects are all there. At t = 1 (pure noise, where sampling starts) only the
condition frame can say where they are. Not part of the toolkit.

Run as: python docs/dev/toy_dit_x0.py checkpoints/toy/wan
Prints, per t, (exact, kept) of 64 held-out edits with the request's text and with zero text.
"""

from __future__ import annotations

import random
import sys

import torch

from backbones.generator.base import to_pil
from backbones.generator.text_encoder import TextEncoder
from fusion.toyworld import pretrain as P
from fusion.toyworld.conversations import edited_object
from fusion.toyworld.reader import read_scene

root = sys.argv[1] if len(sys.argv) > 1 else "checkpoints/toy/wan"
gen = P.load_toy_generator("wan", root)
text = TextEncoder.from_pretrained(root)
gen.transformer.eval()
rng = random.Random(5)
_, edits = P.dit_batch(rng, 64, 1.0)
states, mask = text.encode([P.edit_prompt(rng, s, op, t) for s, _, op, t in edits])
cond = gen.encode(P._images([s for s, *_ in edits]))[:, None]
x0 = gen.encode(P._images([e for _, e, *_ in edits]))


def kept(scene, edit) -> bool:
    source, _, op, target = edit
    return all(o in scene for o in source if o != edited_object(source, op, target))


for t in (0.3, 0.6, 0.9, 1.0):
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = (1 - t) * x0 + t * noise
    row = {}
    for name, st in (("text", states), ("zero text", states * 0)):
        with torch.no_grad():
            v = gen.velocity(xt, torch.full((len(x0),), t), cond, st, mask)
            got = [read_scene(im) for im in to_pil(gen.decode(xt - t * v))]
        exact = sum(g == e[1] for g, e in zip(got, edits)) / len(edits)
        row[name] = (round(exact, 3), round(sum(kept(g, e) for g, e in zip(got, edits)) / len(edits), 3))
    print(f"t={t}: (exact, kept)", row, flush=True)
