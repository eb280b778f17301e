"""A quick trial of a connector design against the distillation teacher, without a stage-2 run: a fresh
``multilayer_concat`` connector trained by aligned distillation alone (``stage.distill_target=aligned``,
the toy recipe's 6000 warm-up steps: AdamW lr 2e-3, 30 warm-up steps, cosine, 8 samples a step, each a
conversation of the train split and one of its images at random) on the frozen MLLM's states of every
train turn, then its error on the test split's turns by kind (mean squared error on the tokens the
teacher's words land on). The states, targets and windows come once from a fused model's MLLM and its
generator's own text encoder and are kept in a cache file. What the error does not show: how the DiT
draws from the states (run the stage 2 for that). Not part of the toolkit.

Run as: python docs/dev/toy_connector_trial.py <name> [steps] [key=value ...]
    keys: the connector's constructor arguments (refiner_layers=4, window=3, ...), span=1 (the window after
    the last image, stage.connector_span=since_image), seed=N, wd=<AdamW weight decay> (0), model=<fused model>
    (outputs/lab7_align/final), toy_dir=<toy world> (checkpoints/toy), cache=<file> (outputs/toy_connector_trial_turns.pt),
    extra=<jsonl> (more conversations whose turns join the training pool, drawn alike: e.g. a corpus of text-to-image
    requests over every pair written by fusion.toyworld.conversations.write_split(..., 'test', n, kinds=('t2i',)))
    Turns whose scenes hold a (colour, shape) pair the train split never holds are reported apart ("(held-out pair)").
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import sys
import time
from dataclasses import replace

import torch

from backbones.generator.text_encoder import TextEncoder
from connectors.multilayer_concat import MultilayerConcat
from fusion.data import drawings_as_placeholders, load_images, read_jsonl
from fusion.distill import aligned_distill_loss
from fusion.model import FusedModel
from fusion.toyworld.conversations import HELD_OUT

NAME = sys.argv[1]
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 6000
over = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
SPAN = over.pop("span", "0") == "1"
SEED = int(over.pop("seed", "0"))
MODEL = over.pop("model", "outputs/lab7_align/final")
CACHE = over.pop("cache", "outputs/toy_connector_trial_turns.pt")
WD = float(over.pop("wd", "0"))
TOY = over.pop("toy_dir", "checkpoints/toy")
EXTRA = over.pop("extra", None)  # more conversations whose turns join the training turns (e.g. a text-only distillation corpus)
SPLITS = {"train": f"{TOY}/toyworld/train.jsonl", "test": f"{TOY}/toyworld/test.jsonl"}


def collect(model: FusedModel, path: str) -> list[dict]:
    """Every assistant image of a split with the true history: the MLLM's states of its context, the
    teacher's states laid on the context (aligned target), the window start, the turn's group (text-only lines too:
    a drawing without a file is a stand-in, ``fusion.data.drawings_as_placeholders``)."""
    out = []
    for ci, (conv, line) in enumerate(zip(read_jsonl(path, convert=drawings_as_placeholders), open(path))):
        raw = json.loads(line)
        kind, turns = raw["meta"]["kind"], raw["meta"]["turns"]
        targets = [k for k, (r, _) in enumerate(conv.image_items()) if r == "assistant"]
        scenes = [t for t in turns for _ in t["images"]]
        for k, turn in zip(targets, scenes):
            g = "back" if turn.get("refers_back") else ("steps" if kind == "steps" else ("edit" if "edit" in turn else "draw"))
            if g in ("back", "edit") and turn["edit"]["op"] == "recolour":
                g += " recolour"
            if any((d["colour"], d["shape"]) in HELD_OUT for im in turn["images"] for d in im):
                g += " (held-out pair)"  # a (colour, shape) pair the train split never holds
            s = replace(model.prepare_align_sample(load_images(conv.until_image(k))), request=conv.text_before_image(k))
            with torch.no_grad():
                s = model.packed_context_states([s])[0]
                t_states, t_mask = model._teacher_states(s.request)
                tgt, real = model.aligned_teacher(s, t_states, t_mask, s.ctx_hidden.shape[1])
            out.append(dict(conv=ci, g=g, h=s.ctx_hidden.clone(), t=tgt, r=real, a=s.neg_len))
    return out


def cached_turns(cache: str, *paths: str) -> list:
    """``collect`` of each path, kept in ``cache`` (read back when it exists)."""
    if os.path.exists(cache):
        return torch.load(cache)
    fused = FusedModel.from_pretrained(MODEL).eval()
    fused.settings["connector_span"] = "all"  # the cache keeps the whole context's states (span=1 cuts the window)
    fused.set_teacher(TextEncoder.from_pretrained(fused.generator_source, device=fused.generator.device))
    fused.settings["target_image"] = "last"
    out = [collect(fused, p) for p in paths]
    torch.save(out if len(out) > 1 else out[0], cache)
    return out if len(out) > 1 else out[0]


train, test = cached_turns(CACHE, SPLITS["train"], SPLITS["test"])
if EXTRA:
    extra = cached_turns(CACHE.replace(".pt", f"_extra_{os.path.basename(EXTRA)}.pt"), EXTRA)
    train = train + [dict(x, conv=1_000_000 + x["conv"]) for x in extra]
n_layers, _, width = train[0]["h"].shape
spec = dict(mllm_dim=width, text_dim=train[0]["t"].shape[-1], num_mllm_layers=n_layers, out_norm="rms_gated", refiner_layers=2)
spec.update({k: (int(v) if v.isdigit() else v) for k, v in over.items()})
torch.manual_seed(SEED)
con = MultilayerConcat(**spec)


def run(x: dict):
    a = x["a"] if SPAN else 0
    h = x["h"][None, :, a:]
    return con(h, torch.ones(1, h.shape[2], dtype=torch.long))[0][0], x["t"][a:], x["r"][a:]


def report(items: list[dict], tag: str) -> None:
    by = collections.defaultdict(list)
    with torch.no_grad():
        for x in items:
            st, t, r = run(x)
            by[x["g"]].append(float((st.float()[r] - t[r]).pow(2).mean()))
    print(NAME, tag, " ".join(f"{g}: {sum(v) / len(v):.4f}" for g, v in sorted(by.items())), flush=True)


byconv = collections.defaultdict(list)
for x in train:
    byconv[x["conv"]].append(x)
convs = sorted(byconv)
opt = torch.optim.AdamW(con.parameters(), lr=2e-3, weight_decay=WD)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / 30) * 0.5 * (1 + math.cos(math.pi * i / STEPS)))
rng = random.Random(SEED)
t0 = time.time()
for step in range(1, STEPS + 1):
    batch = [rng.choice(byconv[c]) for c in rng.sample(convs, 8)]
    loss = torch.stack([aligned_distill_loss(*run(x)) for x in batch]).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
report(test, f"{STEPS} steps {time.time() - t0:.0f}s test")
report(train[::4], "train/4")
