"""One toy-MLLM pretraining trial and its greedy answers to 192 held-out questions by kind (docs/toyworld_log.md,
"the toy MLLM reads its pictures"). The loop of ``fusion.toyworld.pretrain.pretrain_mllm``
(same data, seeds and optimizer: with the same settings it writes the same weights) plus options it
does not have: ``vlr`` scales the vision tower's learning rate (0 freezes it). Not part of the toolkit.

Run as: python docs/dev/toy_mllm_trial.py name=lr5e4 lr=5e-4 [steps=1500] [init=0.1] [vision_out_scale=1]
        [interleaved=0] [vlr=1] [seed=0]          -> /tmp/toy_mllm_trials/<name>/qwen2_5_vl, one RESULT line
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter

import numpy as np
import torch

from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
from backbones.mllm.tiny_qwen2_5_vl import make_tiny
from fusion.toyworld.pretrain import TOY_MLLM_PIXELS, collate_rendered, mllm_sample, warmup_cosine

args = dict(a.split("=", 1) for a in sys.argv[1:])
name, steps, lr, seed = args["name"], int(args.get("steps", 1500)), float(args.get("lr", 2e-3)), int(args.get("seed", 0))
vlr = float(args.get("vlr", 1.0))
root = f"/tmp/toy_mllm_trials/{name}"
make_tiny(root, seed, "qwen2_5_vl", 128, 4, 64, TOY_MLLM_PIXELS, TOY_MLLM_PIXELS, float(args.get("init", 0.1)), 10000.0,
          bool(int(args.get("interleaved", 0))), float(args.get("vision_out_scale", 1.0)))
adapter = Qwen25VLAdapter.from_pretrained(f"{root}/qwen2_5_vl", add_bov=False)
vision = adapter.model.model.visual
in_vision = {id(p) for p in vision.parameters()}
groups = [{"params": [p for p in adapter.model.parameters() if id(p) not in in_vision], "lr": lr}]
if vlr:
    groups.append({"params": list(vision.parameters()), "lr": lr * vlr})
else:
    vision.requires_grad_(False)
torch.manual_seed(seed)
rng = random.Random(seed)
opt = torch.optim.AdamW(groups, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 50))
adapter.model.train()
losses, t0 = [], time.time()
for step in range(steps):
    inputs, labels = collate_rendered([adapter.render(mllm_sample(rng)) for _ in range(8)], adapter.tokenizer.pad_token_id)
    loss = adapter(**inputs, labels=labels)["loss"]
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(adapter.model.parameters(), 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    if step % 250 == 0:
        print(name, step, round(float(np.mean(losses[-50:])), 4), flush=True)
adapter.model.eval()
adapter.save_pretrained(f"{root}/qwen2_5_vl")
rng, counts, eot = random.Random(30_011), Counter(), adapter.end_of_turn_id  # the questions of docs/dev/toy_mllm_questions.py
for _ in range(192):
    msgs = mllm_sample(rng)
    q, a = msgs[0]["content"][1]["text"], msgs[1]["content"][0]["text"]
    kind = "caption" if q.startswith(("Describe", "What is in", "What do")) else " ".join(q.split()[:2])
    r = adapter.render(msgs[:1], add_generation_prompt=True)
    with torch.no_grad():
        out = adapter.model.generate(**{k: v for k, v in r.model_inputs().items() if k != "labels"}, max_new_tokens=24, do_sample=False,
                                     eos_token_id=eot, pad_token_id=eot)
    counts[kind, adapter.tokenizer.decode(out[0, r.input_ids.shape[1]:], skip_special_tokens=True).strip() == a] += 1
right = sum(v for (_, ok), v in counts.items() if ok)
print("RESULT", name, f"{time.time() - t0:.0f} s", "loss (last 50 steps)", round(float(np.mean(losses[-50:])), 4), "held-out", round(right / 192, 3),
      {k: f"{counts[k, True]}/{counts[k, True] + counts[k, False]}" for k in sorted({k for k, _ in counts})}, flush=True)
