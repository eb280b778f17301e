"""Seconds per step of the toy Wan's pretraining loop (the same parts as fusion.toyworld.pretrain.pretrain_dit: its
own UMT5 encoder, the object probe, the flow loss per kind group, AdamW, clipping) at a given batch, on a small pool.

    python docs/dev/toy_dit_step_cost.py <toy_dir> [batch=16] [patch=2] [layers=4] [threads=N] [size=64] [heads=4] [frozen_text] [muon] [fused] [compile] [static] [profile]

Prints s/step over 40 steps after 5 warm-up steps (``compile``: torch.compile of the DiT and its encoder first, the
warm-up then includes the compiling; ``static``: every step draws the same group sizes, 30% text-to-image and the rest
edits, so every shape is fixed and ``compile`` compiles with ``dynamic=False``; ``size``: the scenes' side in
pixels, encoded by the same VAE; ``heads``: the DiT's attention heads of 32 channels (its width 32 x heads); ``frozen_text``: the text encoder runs without gradients and the object probe is
off, the DiT alone trains; ``muon``: the pretraining's ``optimizer=muon``; ``profile``: a torch.profiler table of 10 more steps). docs/toyworld_log.md, "A larger batch
for the toy DiT": 0.261 s at batch 16, 0.385 at 32, 0.677 at 64 on the 2-core machine.
"""

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from backbones.generator.text_encoder import TextEncoder
from fusion.flow import sample_t
from fusion.toyworld import pretrain as P
from fusion.toyworld.conversations import EditMix


def main(toy: Path, batch: int, threads: int | None, compile_: bool, profile: bool, patch: int = 2, layers: int = 4, fused: bool = False,
         static: bool = False, size: int = 64, frozen_text: bool = False, heads: int = 4, muon: bool = False) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae_dir = toy / "vae"
    lc = json.loads((vae_dir / "config.json").read_text())["latent_channels"]
    tok = P.toy_tokenizer(48)
    out = Path(tempfile.mkdtemp()) / "wan"
    P.save_generator(out, "wan", P.toy_transformer("wan", lc, 64, layers, heads=heads, coord_freqs=3, patch=patch), vae_dir, P.toy_text_encoder("wan", len(tok), 64, 2), tok)
    gen = P.load_toy_generator("wan", out, size)
    text = TextEncoder.from_pretrained(out)
    text.encoder.train().requires_grad_(not frozen_text)
    probe = P.ObjectProbe(64)
    params = [*gen.transformer.parameters(), *([] if frozen_text else [*text.encoder.parameters(), *probe.parameters()])]
    if muon:  # the recipe's split (fusion.toyworld.pretrain.toy_optimizers)
        opts = P.toy_optimizers("muon", [gen.transformer] + ([] if frozen_text else [text.encoder]), 1e-3, plain=() if frozen_text else (probe,))
    else:
        opts = [torch.optim.AdamW(params, lr=1e-3, fused=fused or None)]
    pool = P._latent_pool(gen, tok, random.Random(0), 256, 0.7, False, 0.0, 0.25, EditMix(0, 0.5, 0))
    g = torch.Generator().manual_seed(0)
    gen.transformer.train()

    counts = {"t2i": round(0.3 * batch), "edit": batch - round(0.3 * batch)}

    def draw_static():
        for kind, n in counts.items():
            target, cond, ids, mask, labels = pool[kind]
            idx = torch.randint(len(target), (n,), generator=g)
            yield target[idx], (cond[idx] if cond is not None else None), ids[idx], mask[idx], labels[idx], n / batch

    def step():
        loss, probe_loss = 0.0, 0.0
        for target, cond, ids, mask, labels, share in (draw_static() if static else P._draw(pool, batch, g)):
            with torch.set_grad_enabled(not frozen_text):
                states = text.states(ids, mask)
            if not frozen_text:
                probe_loss = probe_loss + probe.loss(states, labels) * share
            t = sample_t(len(states), "shifted", g, "cpu", shift=3.0)
            loss = loss + gen.flow_loss(target, cond, states, mask, t, torch.randn(target.shape, generator=g)) * share
        for opt in opts:
            opt.zero_grad()
        (loss + 0.1 * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in opts:
            opt.step()

    if compile_:
        gen.transformer.compile(dynamic=not static)
        text.encoder.compile(dynamic=not static)
    t0 = time.time()
    for _ in range(5):
        step()
    print(f"threads {torch.get_num_threads()}, batch {batch}, patch {patch}, layers {layers}, heads {heads}, size {size}, frozen text {frozen_text}, Muon {muon}, fused AdamW {fused}, static {static}: warm-up {time.time() - t0:.1f} s")
    t0 = time.time()
    for _ in range(40):
        step()
    print(f"s/step {(time.time() - t0) / 40:.3f}")
    if profile:
        from torch.profiler import profile as prof

        with prof() as p:
            for _ in range(10):
                step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    args = sys.argv[2:]
    kv = dict(a.split("=", 1) for a in args if "=" in a)
    main(Path(sys.argv[1]), int(kv.get("batch", 16)), int(kv["threads"]) if "threads" in kv else None, "compile" in args, "profile" in args,
         int(kv.get("patch", 2)), int(kv.get("layers", 4)), "fused" in args, "static" in args, int(kv.get("size", 64)),
         "frozen_text" in args, int(kv.get("heads", 4)), "muon" in args)
