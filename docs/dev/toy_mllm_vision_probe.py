"""What a toy MLLM's vision tower hands its language model (docs/toyworld_log.md, "the toy MLLM
reads its pictures"): the norm of its merged image tokens against the norm of the text
embeddings, and a linear probe per grid cell (trained on 900 random scenes' image tokens, tested
on 300) that reads the colour of the object in that cell, or none, from the cell's image token.
If the probe reads colours the language model could too: what it answers wrong is lost after the
vision tower. Not part of the toolkit.

Run as: python docs/dev/toy_mllm_vision_probe.py checkpoints/toy/qwen2_5_vl [scenes=1200]
"""

from __future__ import annotations

import random
import sys

import torch

from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
from fusion.toyworld.pretrain import random_scene, render
from fusion.toyworld.scenes import CELLS, COLOURS

adapter = Qwen25VLAdapter.from_pretrained(sys.argv[1], add_bov=False)
adapter.model.eval()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1200
rng = random.Random(5)
feats, labels = [], []
for _ in range(n):
    scene = random_scene(rng, rng.randint(0, 3))
    r = adapter.render([{"role": "user", "content": [{"type": "image", "image": render(scene, 64)}, {"type": "text", "text": "Describe the picture."}]}],
                       add_generation_prompt=True)
    with torch.no_grad():
        out = adapter.model.model.get_image_features(pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw)
    f = out.pooler_output if hasattr(out, "pooler_output") else out
    feats.append(torch.cat(list(f)) if isinstance(f, (list, tuple)) else f)  # 9 merged tokens, raster order
    lab = torch.zeros(9, dtype=torch.long)
    for o in scene:
        lab[CELLS.index(o.cell)] = 1 + COLOURS.index(o.colour)
    labels.append(lab)
X, Y = torch.stack(feats), torch.stack(labels)
text_norm = adapter.model.get_input_embeddings().weight.norm(dim=-1).mean().item()
print(f"image token norm {X.norm(dim=-1).mean():.2f}, text embedding norm {text_norm:.2f} (ratio {X.norm(dim=-1).mean() / text_norm:.1f})")
cut = int(0.75 * n)
for cell in range(9):
    f = X[:, cell]
    f = (f - f[:cut].mean(0)) / (f[:cut].std(0) + 1e-6)
    W = torch.zeros(f.shape[1], 1 + len(COLOURS), requires_grad=True)
    b = torch.zeros(1 + len(COLOURS), requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=0.05)
    for _ in range(500):
        loss = torch.nn.functional.cross_entropy(f[:cut] @ W + b, Y[:cut, cell])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hit = (f[cut:] @ W + b).argmax(-1) == Y[cut:, cell]
    objs = Y[cut:, cell] > 0
    print(f"cell {CELLS[cell]}: colour or none read {hit.float().mean():.3f}, colour of the objects there {hit[objs].float().mean():.3f} (n={int(objs.sum())})")
