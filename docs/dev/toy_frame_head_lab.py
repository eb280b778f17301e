"""The learned frame head trained alone, off stage 2: ``build`` stores, for every drawn image with earlier images of the
toy world's train and test splits (true history), the MLLM's states of its context and the DiT's flow loss with each
candidate frame (and none) at t = 0.8 for four noises (``fusion.frames.best_frames``, the teacher's states: stage 2's
labels); ``train`` fits a ``FrameSelector(request_heads=N)`` on the train split's labels (AdamW lr 2e-3, cosine, 4000 steps
of 8, one random noise's label per sample, as stage 2 draws them) and prints, per group, how often its pick is the frame
the ground truth starts from (``fusion.toyworld.conversations.drawn_images``). Not part of the toolkit.

Run as: python docs/dev/toy_frame_head_lab.py build outputs/demo/align/final [cache.pt]
        python docs/dev/toy_frame_head_lab.py train <request_heads> <seed> [cache.pt]
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import defaultdict

import torch
from torch import nn

from fusion.frames import FrameSelector, best_frames


def build(model_dir: str, out: str, noises: int = 4) -> None:
    from backbones.generator.text_encoder import TextEncoder
    from fusion.data import load_images, read_jsonl
    from fusion.model import FusedModel
    from fusion.toyworld.conversations import drawn_images

    model = FusedModel.from_pretrained(model_dir).eval()
    model.settings["target_image"] = "last"
    gen = model.generator
    model.set_teacher(TextEncoder.from_pretrained(model.generator_source, device=gen.device))
    g = torch.Generator().manual_seed(0)
    data = {}
    with torch.no_grad():
        for split in ("train", "test"):
            path, rows = f"checkpoints/toy/toyworld/{split}.jsonl", []
            for conv, line in zip(read_jsonl(path), open(path)):
                meta = json.loads(line)["meta"]
                for k, turn, _, start in drawn_images(meta, [role for role, _ in conv.image_items()]):
                    if k == 0:
                        continue
                    group = meta["kind"] + (f" {turn['edit']['op']}" if "edit" in turn else "")
                    sample = model.prepare_align_sample(load_images(conv.until_image(k)), g)
                    hidden = model.packed_context_states([sample])[0].ctx_hidden.half()
                    states, mask = model._teacher_states(sample.request)
                    x = sample.target[None].to(gen.dtype)
                    probes = [(x, torch.randn(x.shape, generator=g).to(gen.dtype), sample.cond, states[0], mask[0]) for _ in range(noises)]
                    losses = torch.stack([l for _, l in best_frames(gen, probes, 0.8)])
                    rows.append({"hidden": hidden, "spans": model.image_spans(sample.ctx_ids), "losses": losses,
                                 "want": k if start is None else start, "group": group})
            data[split] = rows
            print(split, len(rows), "turns", flush=True)
    torch.save(data, out)


def train(heads: int, seed: int, cache: str, steps: int = 4000, batch: int = 8, lr: float = 2e-3) -> None:
    data = torch.load(cache)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = FrameSelector(data["train"][0]["hidden"].shape[-1], request_heads=heads)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        loss = 0
        for r in rng.sample(data["train"], batch):
            label = int(r["losses"][rng.randrange(len(r["losses"]))].argmin())
            loss = loss + nn.functional.cross_entropy(head(r["hidden"], r["spans"])[None], torch.tensor([label]))
        opt.zero_grad()
        (loss / batch).backward()
        nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
    with torch.no_grad():
        for split in ("train", "test"):
            right = defaultdict(list)
            for r in data[split]:
                ok = int(head(r["hidden"], r["spans"]).argmax()) == r["want"]
                right[r["group"]].append(ok)
                right["ALL"].append(ok)
            wrong = {g: len(v) - sum(v) for g, v in sorted(right.items()) if len(v) - sum(v)}
            print(f"request_heads={heads} seed={seed} {split}: {sum(right['ALL'])}/{len(right['ALL'])} right; wrong by group {wrong}")


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "outputs/frame_head_lab.pt")
    else:
        train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "outputs/frame_head_lab.pt")
