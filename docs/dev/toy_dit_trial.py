"""One trial of the toy Wan DiT's pretraining with a single change, as measured in docs/toyworld_log.md
("Is the toy DiT under-fitted or memorising?"). A copy of ``pretrain_dit``'s loop with knobs;
not part of the toolkit. Needs the toy VAE (``python tools/make_toy.py``).

Run as (from the repository root):
    python docs/dev/toy_dit_trial.py name=base steps=1000
    python docs/dev/toy_dit_trial.py name=lr3 steps=1000 lr=0.003
    python docs/dev/toy_dit_trial.py name=lr2_3k steps=3000 lr=0.002 pool=4096
    python docs/dev/toy_dit_trial.py name=e_base steps=800 p_edit=1.0 pool=1024
    python docs/dev/toy_dit_trial.py name=e_qk2 steps=800 p_edit=1.0 pool=1024 qk_gain=2
    python docs/dev/toy_dit_trial.py name=f3b_lr2_3k steps=3000 lr=0.002 pool=4096 coord_freqs=3
    python docs/dev/toy_dit_trial.py name=copy4_3k steps=3000 lr=0.002 pool=4096 coord_freqs=3 copy_init=4
    python docs/dev/toy_dit_trial.py name=tshift3_3k steps=3000 lr=0.002 pool=4096 coord_freqs=3 t_mode=shifted t_shift=3   (make_toy's defaults since)
    python docs/dev/toy_dit_trial.py name=tshift3_copy4_3k steps=3000 lr=0.002 pool=4096 coord_freqs=3 t_mode=shifted t_shift=3 copy_init=4

Prints the flow loss every 200 steps (text-to-image and edit items apart), the fit figures
(training vs held-out items), then exact read-back of sampled scenes for the raw and the EMA
weights. Writes the trial's generator folder to outputs/toy_dit_trials/<name>.
"""

from __future__ import annotations

import copy
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backbones.generator.text_encoder import TextEncoder
from fusion.flow import sample_t
from fusion.toyworld import pretrain as P

cfg = dict(name="base", steps=1000, lr=1e-3, batch=16, p_edit=0.5, pool=2048, ema=0.995, qk_gain=1.0, coord_freqs=0, copy_init=0.0, t_mode="logit_normal", t_shift=1.0, p_frames=0.0, eval_n=64, vae="checkpoints/toy/vae")
for arg in sys.argv[1:]:
    key, value = arg.split("=", 1)
    if key not in cfg:
        sys.exit(f"unknown setting {key!r}; expected one of {sorted(cfg)}")
    cfg[key] = type(cfg[key])(value)
print(cfg, flush=True)
out = Path("outputs/toy_dit_trials") / cfg["name"]
shutil.rmtree(out, ignore_errors=True)
torch.manual_seed(0)
rng = random.Random(0)
tok = P.toy_tokenizer(48)
transformer = P.toy_transformer("wan", 8, 64, 4, coord_freqs=cfg["coord_freqs"])
if cfg["qk_gain"] != 1.0:  # self-attention query/key RMSNorm gains: sharper attention from the first step
    with torch.no_grad():
        for block in transformer.blocks:
            block.attn1.norm_q.weight.fill_(cfg["qk_gain"])
            block.attn1.norm_k.weight.fill_(cfg["qk_gain"])
if cfg["copy_init"]:  # copy heads from the first step (P.init_copy_heads), RMSNorm gain copy_init
    P.init_copy_heads(transformer, 8, cfg["copy_init"])
encoder = P.toy_text_encoder("wan", len(tok), 64, 2)
P.save_generator(out, "wan", transformer, Path(cfg["vae"]), encoder, tok)
gen = P.load_toy_generator("wan", out)
text = TextEncoder.from_pretrained(out)
text.encoder.train().requires_grad_(True)
probe = P.ObjectProbe(64)
pool = P._latent_pool(gen, tok, rng, cfg["pool"], cfg["p_edit"], False, cfg["p_frames"])
params = [*gen.transformer.parameters(), *text.encoder.parameters(), *probe.parameters()]
opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, P.warmup_cosine(cfg["steps"], 100))
g = torch.Generator().manual_seed(0)
ema = [copy.deepcopy(m).requires_grad_(False) for m in (gen.transformer, text.encoder)]
gen.transformer.train()
t0, losses = time.time(), {"t2i": [], "edit": [], "frames": []}
for step in range(cfg["steps"]):
    loss, probe_loss = 0.0, 0.0
    for target, cond, ids, mask, labels, share in P._draw(pool, cfg["batch"], g):
        states = text.states(ids, mask)
        probe_loss = probe_loss + probe.loss(states, labels) * share
        states = states * (torch.rand(len(states), generator=g) >= 0.1).float()[:, None, None]
        t = sample_t(len(states), cfg["t_mode"], g, "cpu", shift=cfg["t_shift"])
        item = gen.flow_loss(target, cond, states, mask, t, torch.randn(target.shape, generator=g))
        losses["t2i" if cond is None else "edit" if cond.shape[1] == 1 else "frames"].append(item.item())
        loss = loss + item * share
    opt.zero_grad()
    (loss + 0.1 * probe_loss).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        for model, avg in zip((gen.transformer, text.encoder), ema):
            for p, q in zip(model.parameters(), avg.parameters()):
                q.lerp_(p, 1 - cfg["ema"])
    if step % 200 == 199:
        print(step + 1, f"{time.time() - t0:.0f}s", " ".join(f"{k} {np.mean(v[-200:]):.4f}" for k, v in losses.items() if v), flush=True)
gen.transformer.eval()
text.encoder.eval().requires_grad_(False)
held_out = P._latent_pool(gen, tok, random.Random(54_321), 512, cfg["p_edit"], False, cfg["p_frames"])
print("fit", P.fit_losses(gen, text, {"train": pool, "held_out": held_out}, n=256), flush=True)
print("raw", {k: round(v, 3) for k, v in P.dit_accuracy(gen, text, n=cfg["eval_n"], frames=bool(cfg["p_frames"])).items()}, flush=True)
gen.transformer.save_pretrained(out / "transformer")
text.encoder.save_pretrained(out / "text_encoder")
gen.transformer.load_state_dict(ema[0].state_dict())
text.encoder.load_state_dict(ema[1].state_dict())
print("ema", {k: round(v, 3) for k, v in P.dit_accuracy(gen, text, n=cfg["eval_n"], frames=bool(cfg["p_frames"])).items()}, flush=True)
print("seconds", round(time.time() - t0))
