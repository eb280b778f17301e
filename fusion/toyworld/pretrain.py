"""Toy "pretraining" of backbones on the toy world, so the fusion stages start from models
that know something (as real runs start from published checkpoints).

``pretrain_vae``: a small 2-D ``AutoencoderKL`` (16/32/64 channels, f=4, 8 latent channels) trained to
reconstruct rendered toy scenes; saved in the diffusers layout and scored by reading its
reconstructions back into scenes (the evaluator's reader).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import random_scene, render


#: bumped whenever a pretraining recipe changes in code, so cached parts built by an older one are rebuilt
RECIPES = {"vae": 2, "mllm": 2, "dit": 1}


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1):
    """LR factor: linear warm-up, then cosine decay to ``floor`` at ``steps``."""

    def f(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(step, steps) / max(1, steps))))

    return f


def scene_batch(rng: random.Random, n: int, size: int = 64) -> tuple[torch.Tensor, list]:
    scenes = [random_scene(rng, rng.randint(0, 3)) for _ in range(n)]
    x = torch.stack([torch.from_numpy(np.array(render(s, size))).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    return x, scenes


def toy_vae(latent_channels: int = 8, channels: tuple[int, ...] = (32, 64, 128)):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=channels, layers_per_block=1, latent_channels=latent_channels, norm_num_groups=min(16, min(channels)),
                         sample_size=64)


@torch.no_grad()
def reader_accuracy(vae, n: int = 64, seed: int = 10_007, size: int = 64) -> float:
    """Fraction of random scenes read back exactly from their reconstructions."""
    from backbones.generator.base import to_pil

    rng = random.Random(seed)
    x, scenes = scene_batch(rng, n, size)
    vae.eval()
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return sum(read_scene(im) == s for im, s in zip(to_pil(rec), scenes)) / n


def pretrain_vae(out: str | Path, steps: int = 1200, batch: int = 8, lr: float = 3e-3, seed: int = 0, kl_weight: float = 1e-6,
                 channels: tuple[int, ...] = (16, 32, 64), latent_channels: int = 8, progress: bool = True) -> dict:
    """Train and save ``<out>`` (a diffusers AutoencoderKL folder); returns its stats.

    Measured on a 2-core CPU with these defaults (0.69 M parameters, warm-up + cosine decay):
    1200 steps in 241 s, 63 of 64 held-out random scenes read back exactly from their
    reconstructions (constant lr 2e-3: 1000 steps 80%, 2000 steps in 405 s 100%).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = toy_vae(latent_channels, tuple(channels))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 20))
    t0, losses = time.time(), []
    bar = tqdm(range(steps), desc="toy VAE", disable=not progress)
    for step in bar:
        x, _ = scene_batch(rng, batch)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample  # a deterministic autoencoder learns the toy world far faster than with sampling
        loss = torch.nn.functional.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    # scale the latents to unit variance, as published VAEs do with scaling_factor
    with torch.no_grad():
        z = vae.encode(scene_batch(random.Random(seed + 1), 64)[0]).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=float(z.mean()))
    stats = {"steps": steps, "seconds": round(time.time() - t0, 1), "first_loss": losses[0], "last_loss": sum(losses[-20:]) / min(20, len(losses)),
             "reader_accuracy": reader_accuracy(vae), "params": sum(p.numel() for p in vae.parameters())}
    vae.save_pretrained(out)
    (Path(out) / "pretrain.json").write_text(json.dumps(stats, indent=2))
    return stats


# ----------------------------------------------------------------------------- the toy DiTs
FAMILIES = ("wan", "cosmos", "sana")
OPS = ("move", "recolour", "add", "remove")


class ToyText:
    """The toy DiTs' own "text encoder" (what T5 / Gemma are to the published ones).

    One token per object: the sum of fixed random vectors for its shape, colour, row and
    column (scaled to unit variance), so binding never depends on word order; an edit is
    ``[op, object]``. Only the DiT pretraining uses it; the fused model replaces it with the
    connector's output at the same width.
    """

    def __init__(self, dim: int, seed: int = 0, max_tokens: int = 4):
        from fusion.toyworld.scenes import COLOURS, SHAPES

        g = torch.Generator().manual_seed(seed)
        self.dim, self.max_tokens = dim, max_tokens
        self.tables = {name: torch.randn(len(keys), dim, generator=g) for name, keys in
                       (("shape", SHAPES), ("colour", COLOURS), ("row", range(3)), ("col", range(3)), ("op", OPS))}
        self.index = {"shape": {k: i for i, k in enumerate(SHAPES)}, "colour": {k: i for i, k in enumerate(COLOURS)}}

    def obj(self, o) -> torch.Tensor:
        t = self.tables
        return (t["shape"][self.index["shape"][o.shape]] + t["colour"][self.index["colour"][o.colour]] + t["row"][o.row] + t["col"][o.col]) / 2

    def encode(self, token_lists: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        states = torch.zeros(len(token_lists), self.max_tokens, self.dim)
        mask = torch.zeros(len(token_lists), self.max_tokens, dtype=torch.long)
        for i, toks in enumerate(token_lists):
            for j, v in enumerate(toks[: self.max_tokens]):
                states[i, j], mask[i, j] = v, 1
        return states, mask

    def scene(self, scene) -> list[torch.Tensor]:
        return [self.obj(o) for o in scene]

    def edit(self, op: str, target) -> list[torch.Tensor]:
        return [self.tables["op"][OPS.index(op)], self.obj(target)]


def toy_transformer(family: str, latent_channels: int, text_dim: int = 64, layers: int = 4, heads: int = 4, head_dim: int = 32):
    """A small DiT of the family's own diffusers class, with an absolute position signal."""
    from diffusers import (
        CosmosTransformer3DModel,
        SanaTransformer2DModel,
        WanTransformer3DModel,
    )

    if family == "wan":  # two coordinate input channels (see backbones/generator/wan.py)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=latent_channels + 2,
                                     out_channels=latent_channels, text_dim=text_dim, freq_dim=64, ffn_dim=2 * heads * head_dim, num_layers=layers,
                                     rope_max_seq_len=64)
    if family == "cosmos":  # learnable absolute position embedding (Predict2's extra_pos_embed_type)
        return CosmosTransformer3DModel(in_channels=latent_channels + 1, out_channels=latent_channels, num_attention_heads=heads, attention_head_dim=head_dim,
                                        num_layers=layers, mlp_ratio=2.0, text_embed_dim=text_dim, adaln_lora_dim=32, max_size=(8, 32, 32),
                                        patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable")
    if family == "sana":  # sin-cos absolute position embedding (interpolation_scale set)
        return SanaTransformer2DModel(in_channels=latent_channels, out_channels=latent_channels, num_attention_heads=heads, attention_head_dim=head_dim,
                                      num_layers=layers, num_cross_attention_heads=heads, cross_attention_head_dim=head_dim,
                                      cross_attention_dim=heads * head_dim, caption_channels=text_dim, mlp_ratio=2.0, sample_size=16, patch_size=2,
                                      interpolation_scale=1)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


PIPELINES = {"wan": "WanPipeline", "cosmos": "Cosmos2VideoToWorldPipeline", "sana": "SanaPipeline"}


def save_generator(root: Path, family: str, transformer, vae_dir: Path) -> None:
    """The diffusers folder layout: transformer/, vae/ (a copy of the toy VAE), scheduler/, model_index.json."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer.save_pretrained(root / "transformer")
    shutil.copytree(vae_dir, root / "vae", ignore=shutil.ignore_patterns("*.json.tmp", "pretrain.json", "settings.json"), dirs_exist_ok=True)
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(root / "scheduler")
    index = {"_class_name": PIPELINES[family], "_diffusers_version": "0.42.1", "transformer": ["diffusers", type(transformer).__name__],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def load_toy_generator(family: str, root: str | Path, image_size: int = 64):
    """A toy generator folder through the family adapter's own from_pretrained."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    if family == "wan":
        from backbones.generator.wan import WanGenerator as G
    elif family == "cosmos":
        from backbones.generator.cosmos import CosmosGenerator as G
    else:
        from backbones.generator.sana import SanaGenerator as G

        return G.from_pretrained(str(root), scheduler=sched, image_size=image_size, condition_mode="spatial_concat")
    return G.from_pretrained(str(root), scheduler=sched, image_size=image_size)


def dit_batch(rng: random.Random, n: int, p_edit: float, held_out=frozenset()):
    """(t2i items, edit items): t2i = (scene,), edit = (source, edited, op, target)."""
    from fusion.toyworld.conversations import random_edit_scenes

    t2i, edits = [], []
    for _ in range(n):
        if rng.random() < p_edit:
            edits.append(random_edit_scenes(rng, held_out))
        else:
            t2i.append(random_scene(rng, rng.choice([1, 1, 2, 3]), held_out))
    return t2i, edits


def _images(scenes, size: int = 64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(render(s, size))).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1


@torch.no_grad()
def dit_accuracy(gen, text: ToyText, n: int = 32, seed: int = 20_011, steps: int = 20, guidance: float = 3.0) -> dict:
    """Exact-scene accuracy of sampled images (read back by the evaluator's reader): t2i and edits."""
    from backbones.generator.base import to_pil

    rng = random.Random(seed)
    scenes = [random_scene(rng, rng.choice([1, 2, 3])) for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    states, mask = text.encode([text.scene(s) for s in scenes])
    imgs = to_pil(gen.sample(states, mask, steps=steps, guidance=guidance, generator=g))
    out = {"t2i": sum(read_scene(im) == s for im, s in zip(imgs, scenes)) / n,
           "t2i_1obj": _frac([read_scene(im) == s for im, s in zip(imgs, scenes) if len(s) == 1])}
    if gen.uses_condition_frames:
        _, edits = dit_batch(rng, n, 1.0)
        states, mask = text.encode([text.edit(op, tgt) for _, _, op, tgt in edits])
        cond = gen.encode(_images([src for src, *_ in edits]))[:, None]
        imgs = to_pil(gen.sample(states, mask, cond, steps=steps, guidance=guidance, generator=g))
        ok = [read_scene(im) == e[1] for im, e in zip(imgs, edits)]
        out["edit"] = _frac(ok)
        out["edit_no_move"] = _frac([k for k, e in zip(ok, edits) if e[2] != "move"])
    return out


@torch.no_grad()
def _latent_pool(gen, text: ToyText, rng: random.Random, n: int, p_edit: float, progress: bool = True) -> dict:
    """``n`` training items encoded once (the VAE is deterministic): t2i and edit latents with their tokens."""
    t2i, edits = dit_batch(rng, n, p_edit)
    pool = {}
    chunks = 256
    bar = tqdm(total=len(t2i) + 2 * len(edits), desc="toy DiT: encode pool", disable=not progress)

    def enc(scenes):
        out = []
        for i in range(0, len(scenes), chunks):
            out.append(gen.encode(_images(scenes[i : i + chunks])))
            bar.update(len(scenes[i : i + chunks]))
        return torch.cat(out) if out else None

    if t2i:
        pool["t2i"] = (enc(t2i), None, *text.encode([text.scene(s) for s in t2i]))
    if edits:
        pool["edit"] = (enc([e[1] for e in edits]), enc([e[0] for e in edits])[:, None], *text.encode([text.edit(op, tgt) for _, _, op, tgt in edits]))
    bar.close()
    return pool


def _draw(pool: dict, batch: int, g: torch.Generator):
    """Random items of one batch, grouped by kind: (target, cond, states, mask, share of the batch)."""
    sizes = {k: len(v[0]) for k, v in pool.items()}
    total = sum(sizes.values())
    picks = torch.randint(total, (batch,), generator=g)
    start = 0
    for k, size in sizes.items():
        idx = picks[(picks >= start) & (picks < start + size)] - start
        start += size
        if len(idx):
            target, cond, states, mask = pool[k]
            yield target[idx], (cond[idx] if cond is not None else None), states[idx], mask[idx], len(idx) / batch


def _frac(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def pretrain_dit(family: str, out: str | Path, vae_dir: str | Path, steps: int = 3000, batch: int = 16, lr: float = 1e-3, seed: int = 0,
                 text_dim: int = 64, p_edit: float = 0.5, p_drop_text: float = 0.1, layers: int = 4, pool_size: int = 4096,
                 progress: bool = True) -> dict:
    """Pretrain a toy DiT of ``family`` to render toy scenes from :class:`ToyText` tokens and to
    apply edits to a clean condition frame; save it (with the VAE) in the diffusers layout."""
    from fusion.flow import sample_t

    out = Path(out)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    latent_channels = json.loads((Path(vae_dir) / "config.json").read_text())["latent_channels"]
    transformer = toy_transformer(family, latent_channels, text_dim, layers)
    save_generator(out, family, transformer, Path(vae_dir))
    gen = load_toy_generator(family, out)
    text = ToyText(text_dim, seed)
    opt = torch.optim.AdamW(gen.transformer.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 100))
    t0, losses = time.time(), []
    pool = _latent_pool(gen, text, rng, pool_size, p_edit if gen.uses_condition_frames else 0.0, progress)
    bar = tqdm(range(steps), desc=f"toy DiT ({family})", disable=not progress)
    g = torch.Generator().manual_seed(seed)
    gen.transformer.train()
    for step in bar:
        loss = 0.0
        for target, cond, states, mask, share in _draw(pool, batch, g):
            states = states.clone()
            states[torch.rand(len(states), generator=g) < p_drop_text] = 0
            t = sample_t(len(states), "logit_normal", g, "cpu")
            noise = torch.randn(target.shape, generator=g)
            loss = loss + gen.flow_loss(target, cond, states, mask, t, noise) * share
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    gen.transformer.eval()
    acc = dit_accuracy(gen, text)
    stats = {"family": family, "steps": steps, "seconds": round(time.time() - t0, 1), "first_loss": losses[0],
             "last_loss": float(np.mean(losses[-50:])), "params": sum(p.numel() for p in gen.transformer.parameters()), "accuracy": acc}
    gen.transformer.save_pretrained(out / "transformer")
    (out / "pretrain.json").write_text(json.dumps(stats, indent=2))
    return stats


# ----------------------------------------------------------------------------- the toy MLLM
TOY_MLLM_PIXELS = 84 * 84  # 6x6 patches of 14 px -> 3x3 merged vision tokens: one per grid cell
NUMBERS = ("zero", "one", "two", "three")


def caption(scene) -> str:
    from fusion.toyworld.conversations import list_objs

    return f"{list_objs(scene)}." if scene else "An empty picture."


def mllm_sample(rng: random.Random, size: int = 64) -> list[dict]:
    """One captioning / question-answering exchange about a random scene (the MLLM's pretraining)."""
    from fusion.toyworld.conversations import ref
    from fusion.toyworld.scenes import CELL_NAMES, CELLS

    while True:
        scene = random_scene(rng, rng.randint(0, 3))
        keys = [(o.colour, o.shape) for o in scene]
        if len(set(keys)) == len(keys):
            break
    kind = rng.choice(["caption", "caption", "count", "colour", "where", "what"]) if scene else rng.choice(["caption", "count", "what"])
    if kind == "caption":
        q, a = rng.choice(["Describe the picture.", "What is in the picture?", "What do you see?"]), caption(scene)
    elif kind == "count":
        q, a = "How many objects are in the picture?", f"{NUMBERS[len(scene)].capitalize()}."
    elif kind == "colour":
        o = rng.choice(scene)
        q, a = f"What colour is the {o.shape} at the {o.where}?", f"{o.colour.capitalize()}."
    elif kind == "where":
        o = rng.choice(scene)
        q, a = f"Where is the {ref(o)}?", f"{o.where.capitalize()}."
    else:
        cell = rng.choice(CELLS)
        hit = [o for o in scene if o.cell == cell]
        q, a = f"What is at the {CELL_NAMES[cell]}?", (f"{hit[0].describe().capitalize()}." if hit else "Nothing.")
    a = a[0].upper() + a[1:]
    return [{"role": "user", "content": [{"type": "image", "image": render(scene, size)}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]}]


def collate_rendered(items: list, pad_id: int) -> tuple[dict, torch.Tensor]:
    """Right-padded batch of rendered conversations (model inputs, labels)."""
    n = max(r.input_ids.shape[1] for r in items)

    def pad(x, value):
        return torch.cat([x, torch.full((1, n - x.shape[1]), value, dtype=x.dtype)], dim=1)

    inputs = {"input_ids": torch.cat([pad(r.input_ids, pad_id) for r in items]),
              "attention_mask": torch.cat([pad(r.attention_mask, 0) for r in items]),
              "mm_token_type_ids": torch.cat([pad(r.mm_token_type_ids, 0) for r in items])}
    pv = [r.pixel_values for r in items if r.pixel_values is not None]
    inputs["pixel_values"] = torch.cat(pv) if pv else None
    inputs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in items if r.image_grid_thw is not None]) if pv else None
    return inputs, torch.cat([pad(r.labels, -100) for r in items])


@torch.no_grad()
def mllm_accuracy(adapter, n: int = 64, seed: int = 30_011) -> float:
    """Fraction of held-out pretraining questions answered exactly (greedy decoding)."""
    rng = random.Random(seed)
    hits = 0
    eot = adapter.end_of_turn_id
    for _ in range(n):
        msgs = mllm_sample(rng)
        r = adapter.render(msgs[:1], add_generation_prompt=True)
        inputs = {k: v for k, v in r.model_inputs().items() if k != "labels"}
        out = adapter.model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        text = adapter.tokenizer.decode(out[0, r.input_ids.shape[1]:], skip_special_tokens=True).strip()
        hits += text == msgs[1]["content"][0]["text"]
    return hits / n


def pretrain_mllm(out: str | Path, steps: int = 1500, batch: int = 8, lr: float = 2e-3, seed: int = 0, hidden_size: int = 128,
                  num_layers: int = 4, vision_hidden_size: int = 64, initializer_range: float = 0.1, progress: bool = True) -> dict:
    """Build a tiny Qwen2.5-VL (real classes, real folder layout) and pretrain it on captions and
    questions about toy scenes; save it with its processor. No ``<|bov|>`` yet: stage 1 adds it,
    as it does to a published checkpoint."""
    from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
    from backbones.mllm.tiny_qwen2_5_vl import make_tiny

    out = Path(out)
    make_tiny(out.parent, seed, out.name, hidden_size, num_layers, vision_hidden_size, TOY_MLLM_PIXELS, TOY_MLLM_PIXELS, initializer_range)
    adapter = Qwen25VLAdapter.from_pretrained(str(out), add_bov=False)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(adapter.model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 50))
    t0, losses = time.time(), []
    adapter.model.train()
    bar = tqdm(range(steps), desc="toy MLLM", disable=not progress)
    for step in bar:
        inputs, labels = collate_rendered([adapter.render(mllm_sample(rng)) for _ in range(batch)], adapter.tokenizer.pad_token_id)
        loss = adapter(**inputs, labels=labels)["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    adapter.model.eval()
    stats = {"steps": steps, "seconds": round(time.time() - t0, 1), "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
             "params": sum(p.numel() for p in adapter.model.parameters()), "answer_accuracy": mllm_accuracy(adapter)}
    adapter.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(stats, indent=2))
    return stats
