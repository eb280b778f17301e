"""Where the fused model's text-to-image misses come from: the test split's text-to-image requests
drawn by the fused model's DiT from (a) the connector's states (what the fused model does), (b) the
teacher's states laid on the context tokens that say the same words, zeros elsewhere (the aligned
distillation target: the ceiling of a connector that imitates it perfectly), (c) the connector's
states on those aligned tokens and zeros elsewhere, (d) the teacher's on the aligned tokens and the
connector's elsewhere. Also the connector's error on the aligned tokens (relative squared error)
and the energy it leaves on the others, single objects and several apart, and scenes with a (colour, shape)
pair that the train split never holds (``HELD_OUT``) apart. Not part of the toolkit.

Run as: python docs/dev/toy_t2i_oracle.py outputs/frames2/final [checkpoints/toy/toyworld/test.jsonl] [variants]
(variants: comma-separated, default connector,oracle,connector_real_only,teacher_real_connector_rest; none: the errors alone)
"""

from __future__ import annotations

import json
import sys

import torch

from backbones.generator.base import to_pil
from backbones.generator.text_encoder import TextEncoder
from fusion.data import load_images, read_jsonl
from fusion.distill import context_pieces
from fusion.model import FusedModel
from fusion.toyworld.conversations import HELD_OUT
from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import CELL_NAMES, COLOURS, SHAPES, scene_from_dicts

model = FusedModel.from_pretrained(sys.argv[1])
split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
model.set_teacher(TextEncoder.from_pretrained(model.generator_source))
model.connector.eval()
model.generator.transformer.eval()
gen = model.generator
ALL = ("connector", "oracle", "connector_real_only", "teacher_real_connector_rest")
chosen = [v for v in sys.argv[3].split(",") if v in ALL] if len(sys.argv) > 3 else list(ALL)
places = {w for name in CELL_NAMES.values() for w in name.split()}
kind_of = lambda w: "colour" if w in COLOURS else "shape" if w in SHAPES else "place" if w in places else "other"  # noqa: E731
word_err: dict[str, list[float]] = {}
metas = [json.loads(line)["meta"] for line in open(split) if line.strip()]
rows = []
with torch.no_grad():
    for k, (conv, meta) in enumerate(zip(read_jsonl(split), metas)):
        if meta["kind"] != "t2i":
            continue
        scene = scene_from_dicts(meta["turns"][0]["images"][0])
        sample = model.prepare_align_sample(load_images(conv))
        states, mask, _ = model.sample_states(sample)
        ref_states, ref_mask = model._teacher_states(sample.request)
        target, real = model.aligned_teacher(sample, ref_states, ref_mask, states.shape[1])
        target, real = target.to(states), real.to(states.device)
        r = real[None, :, None].to(states.dtype)
        variants = {"connector": states, "oracle": target[None], "connector_real_only": states * r,
                    "teacher_real_connector_rest": target[None] * r + states * (1 - r)}
        err = ((states[0][real] - target[real]).pow(2).sum(-1) / target[real].pow(2).sum(-1)).mean().item()
        rest = states[0][~real].pow(2).sum(-1).mean().item() / target[real].pow(2).sum(-1).mean().item()
        pieces = context_pieces(model.mllm.tokenizer, sample.ctx_ids)
        for p in real.nonzero().flatten().tolist():
            e = ((states[0, p] - target[p]).pow(2).sum() / target[p].pow(2).sum()).item()
            held = "held-out " if any((o.colour, o.shape) in HELD_OUT for o in scene) else ""
            word_err.setdefault(f"{held}{'several' if len(scene) > 1 else 'single'} {kind_of(pieces[p].strip().lower())}", []).append(e)
        row = {"n": len(scene), "held": any((o.colour, o.shape) in HELD_OUT for o in scene), "err": err, "rest": rest, "request": sample.request}
        for name, st in ((n, variants[n]) for n in chosen):
            img = to_pil(gen.sample(st, mask, steps=20, guidance=3.0, generator=torch.Generator().manual_seed(k)))[0]
            drawn = read_scene(img)
            row[name] = drawn == scene
            if name == "connector" and drawn != scene:
                print("  drawn", sorted(map(str, drawn)), "asked", sorted(map(str, scene)), flush=True)
        rows.append(row)
        print(k, {a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
for group, pick in (("single", lambda r: r["n"] == 1), ("several", lambda r: r["n"] > 1), ("all", lambda r: True),
                    ("with a pair never in train (HELD_OUT)", lambda r: r["held"]), ("without", lambda r: not r["held"])):
    sel = [r for r in rows if pick(r)]
    if not sel:
        continue
    print(f"{group} (n={len(sel)}): " + ", ".join(f"{v} {sum(r[v] for r in sel)}/{len(sel)}" for v in chosen)
          + f"; aligned-token relative error {sum(r['err'] for r in sel) / len(sel):.3f}, other tokens' energy"
          f" {sum(r['rest'] for r in sel) / len(sel):.4f} (of a real token's)")
print("aligned-token relative error by word:", ", ".join(f"{k} {sum(v) / len(v):.3f} (n={len(v)})" for k, v in sorted(word_err.items())))
