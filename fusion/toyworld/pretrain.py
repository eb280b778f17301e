"""Toy "pretraining" of backbones on the toy world, so the fusion stages start from models
that know something (as real runs start from published checkpoints).

``pretrain_vae``: a small 2-D ``AutoencoderKL`` (16/32/64 channels, f=4, 8 latent channels) trained to
reconstruct rendered toy scenes; saved in the diffusers layout and scored by reading its
reconstructions back into scenes (the evaluator's reader).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.optim._muon import _adjust_lr as muon_lr  # torch's per-shape Muon rate (GroupedMuon applies it as Muon does)
from tqdm.auto import tqdm

from fusion import cpushare
from fusion.config import TOY_OPTIMIZERS
from fusion.toyworld.conversations import EditMix, edited_object
from fusion.toyworld.reader import read_scene
from fusion.toyworld.scenes import random_scene, render


#: bumped whenever a pretraining recipe changes in code, so cached parts built by an older one are rebuilt
RECIPES = {"vae": 2, "mllm": 2, "dit": 4}


def warmup_cosine(steps: int, warmup: int, floor: float = 0.1):
    """LR factor: linear warm-up, then cosine decay to ``floor`` at ``steps``."""

    def f(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(step, steps) / max(1, steps))))

    return f


def scene_batch(rng: random.Random, n: int, size: int = 64) -> tuple[torch.Tensor, list]:
    scenes = [random_scene(rng, rng.randint(0, 3)) for _ in range(n)]
    x = torch.stack([torch.from_numpy(np.array(render(s, size))).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    return x, scenes


def toy_vae(latent_channels: int = 8, channels: tuple[int, ...] = (32, 64, 128), image_size: int = 64):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=channels, layers_per_block=1, latent_channels=latent_channels, norm_num_groups=min(16, min(channels)),
                         sample_size=image_size)


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
                 channels: tuple[int, ...] = (16, 32, 64), latent_channels: int = 8, progress: bool = True, image_size: int = 64) -> dict:
    """Train and save ``<out>`` (a diffusers AutoencoderKL folder) on scenes of ``image_size`` pixels; returns its stats.

    Measured on a 2-core CPU with these defaults (0.69 M parameters, warm-up + cosine decay):
    1200 steps in 241 s, 63 of 64 held-out random scenes read back exactly from their
    reconstructions (constant lr 2e-3: 1000 steps 80%, 2000 steps in 405 s 100%).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = toy_vae(latent_channels, tuple(channels), image_size)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, 20))
    t0, losses = time.time(), []
    bar = tqdm(range(steps), desc="toy VAE", disable=not progress)
    for step in bar:
        cpushare.poll()
        x, _ = scene_batch(rng, batch, image_size)
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
        z = vae.encode(scene_batch(random.Random(seed + 1), 64, image_size)[0]).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=float(z.mean()))
    stats = {"steps": steps, "seconds": round(time.time() - t0, 1), "first_loss": losses[0], "last_loss": sum(losses[-20:]) / min(20, len(losses)),
             "reader_accuracy": reader_accuracy(vae, size=image_size), "params": sum(p.numel() for p in vae.parameters()),
             "image_size": image_size}
    vae.save_pretrained(out)
    (Path(out) / "pretrain.json").write_text(json.dumps(stats, indent=2))
    return stats


# ----------------------------------------------------------------------------- the toy DiTs
FAMILIES = ("wan", "cosmos", "sana")
OPS = ("move", "recolour", "add", "remove")


# The toy DiTs' own text encoder: what UMT5 / T5 / Gemma2 are to the published ones, in those
# classes, saved as text_encoder/ + tokenizer/ of the generator folder and padded like the
# family's pipeline pads. The DiT learns to find the few tokens about objects among many.
TEXT_LENGTH = 48  # the toy pipelines' max_sequence_length (Wan pads to 512, SANA to 300)


def toy_vocabulary() -> list[str]:
    """Every word the toy world's requests and replies use (lower case), plus punctuation."""
    from fusion.toyworld import conversations as cv
    from fusion.toyworld.scenes import CELL_NAMES, COLOURS, SHAPES

    text = " ".join([*cv.DRAW, *cv.DRAW_REPLY, *cv.EDIT_REPLY, *cv.MOVE, *cv.RECOLOUR, *cv.ADD, *cv.REMOVE, *cv.BACK,
                     *(q + " " + a for q, a in cv.DISTRACT), *CELL_NAMES.values(), *COLOURS, *SHAPES, *STEP_WORDS,
                     "a an the at and one object time now also empty"])
    return sorted({w for w in re.findall(r"[a-z]+|[^\sa-z{}]", text.lower())})


STEP_WORDS = ("Now {obj}.", "Draw {objs}, one object at a time.")


#: the family adapters' own text-encoder classes (published pipelines: Wan UMT5, Cosmos-Predict2 T5, SANA Gemma2)
TEXT_ENCODERS = {"wan": "UMT5EncoderModel", "cosmos": "T5EncoderModel", "sana": "Gemma2Model"}


def toy_tokenizer(max_length: int = TEXT_LENGTH):
    """A word-level tokenizer over :func:`toy_vocabulary` (T5 conventions: ``</s>`` appended, ``<pad>`` 0)."""
    from backbones.generator.text_encoder import word_tokenizer

    return word_tokenizer(toy_vocabulary(), max_length)


def toy_text_encoder(family: str, vocab_size: int, dim: int = 64, layers: int = 2, heads: int = 4):
    """The family's own text-encoder class (Wan: UMT5, Cosmos-Predict2: T5, SANA: Gemma2), tiny."""
    from backbones.generator.text_encoder import tiny_encoder

    if family not in TEXT_ENCODERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return tiny_encoder(TEXT_ENCODERS[family], vocab_size, dim, layers, heads)


def scene_prompt(rng: random.Random, scene) -> str:
    """A text-to-image request as the toy world phrases it (sometimes followed by the reply before the image)."""
    from fusion.toyworld import conversations as cv

    p = rng.choice(cv.DRAW).format(objs=cv.list_objs(scene)) if scene else "Draw an empty picture."
    return p + (" " + rng.choice(cv.DRAW_REPLY) if rng.random() < 0.5 else "")


def edit_prompt(rng: random.Random, source, op: str, target) -> str:
    """An edit request as the toy world phrases it (``target``: the object after the edit)."""
    from fusion.toyworld import conversations as cv

    if op == "add":
        p = rng.choice(cv.ADD).format(new=cv.place(target)) if rng.random() < 0.75 else f"Now {cv.place(target)}."
    elif op == "remove":
        p = rng.choice(cv.REMOVE).format(obj=cv.ref(target))
    elif op == "recolour":
        p = rng.choice(cv.RECOLOUR).format(obj=cv.ref(cv.edited_object(source, op, target)), colour=target.colour)
    else:
        p = rng.choice(cv.MOVE).format(obj=cv.ref(cv.edited_object(source, op, target)), where=target.where)
    return p + (" " + rng.choice(cv.EDIT_REPLY) if rng.random() < 0.5 else "")


def in_context(rng: random.Random, request: str, edit: bool) -> str:
    """A request as it reads in the middle of a conversation, where the teacher's prompt is every turn since the
    previous image (Conversation.text_before_image): an edit may refer back ("In the first picture, ..."), and an
    unrelated exchange may come before it ("Name a colour. Red."). At least one of the two."""
    from fusion.toyworld import conversations as cv
    from fusion.toyworld.scenes import SHAPES

    back = edit and rng.random() < 0.5
    if back:
        request = rng.choice(cv.BACK).format(edit=request[0].lower() + request[1:])
    if not back or rng.random() < 0.5:  # an exchange that names no shape (the object probe reads shape words in order)
        q, a = rng.choice([(q, a) for q, a in cv.DISTRACT if not any(w in f"{q} {a}".lower() for w in SHAPES)])
        request = f"{q} {a} {request}"
    return request


def toy_transformer(family: str, latent_channels: int, text_dim: int = 64, layers: int = 4, heads: int = 4, head_dim: int = 32,
                    coord_freqs: int = 0, patch: int = 2, latent_side: int = 16):
    """A small DiT of the family's own diffusers class, with an absolute position signal (Wan:
    ``coord_freqs`` sin/cos frequency pairs per axis besides the two coordinate ramps); ``patch``: the
    spatial patch side in latent pixels (2: 64 tokens a frame on the toy VAE's 16x16 latents of a 64-pixel scene, 4: 16);
    ``latent_side``: the latents' side (SANA's sample_size)."""
    from diffusers import (
        CosmosTransformer3DModel,
        SanaTransformer2DModel,
        WanTransformer3DModel,
    )

    if family == "wan":  # coordinate input channels (see backbones/generator/wan.py)
        return WanTransformer3DModel(patch_size=(1, patch, patch), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=latent_channels + 2 + 4 * coord_freqs,
                                     out_channels=latent_channels, text_dim=text_dim, freq_dim=64, ffn_dim=2 * heads * head_dim, num_layers=layers,
                                     rope_max_seq_len=64)
    if family == "cosmos":  # learnable absolute position embedding (Predict2's extra_pos_embed_type)
        return CosmosTransformer3DModel(in_channels=latent_channels + 1, out_channels=latent_channels, num_attention_heads=heads, attention_head_dim=head_dim,
                                        num_layers=layers, mlp_ratio=2.0, text_embed_dim=text_dim, adaln_lora_dim=32, max_size=(8, 32, 32),
                                        patch_size=(1, patch, patch), rope_scale=(1.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable")
    if family == "sana":  # sin-cos absolute position embedding (interpolation_scale set)
        return SanaTransformer2DModel(in_channels=latent_channels, out_channels=latent_channels, num_attention_heads=heads, attention_head_dim=head_dim,
                                      num_layers=layers, num_cross_attention_heads=heads, cross_attention_head_dim=head_dim,
                                      cross_attention_dim=heads * head_dim, caption_channels=text_dim, mlp_ratio=2.0, sample_size=latent_side, patch_size=patch,
                                      interpolation_scale=1)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


@torch.no_grad()
def init_copy_heads(transformer, latent_channels: int, gain: float = 4.0, frame_bias: float = 4.0) -> None:
    """Start one self-attention head per block of a toy Wan DiT as a *copy head*: its queries and
    keys read the sin/cos coordinate channels (the same cell matches best, the Fourier kernel
    peaks there) and a rotary offset of one frame (a target token prefers the frame before it), so
    from the first step a target token reads the condition frame's token at its own cell.
    Published DiTs learn this from video; the toy learns it too slowly from flow loss alone (one
    head of 16 put 27% of its attention on the same cell after 3000 steps). Trained as usual after.

    The residual stream's first ``4k`` channels carry the coordinate features (the patch
    embedding averages each over its patch), head 0 of every block maps them into its row / column
    rotary dimensions, its temporal rotary pair gets the frame offset as a bias, and its RMSNorm
    gains are ``gain`` (the norm is across heads: the other heads are left as they were)."""
    c = transformer.config
    fourier = c.in_channels - latent_channels - 2
    if fourier <= 0:
        raise ValueError("copy heads need Fourier coordinate channels (coord_freqs > 0)")
    d = c.attention_head_dim
    rope_h = 2 * (d // 6)
    rope_t = d - 2 * rope_h
    k = fourier // 4
    if 2 * k > rope_h:
        raise ValueError(f"{k} frequency pairs per axis do not fit the {rope_h // 2} rotary pairs of an axis (attention_head_dim {d})")
    pe = transformer.patch_embedding
    pe.weight[:fourier] = 0.0
    pe.bias[:fourier] = 0.0
    n_patch = pe.weight[0, 0].numel()
    for j in range(fourier):
        pe.weight[j, latent_channels + 2 + j] = 1.0 / n_patch
    # feature j: frequency i = j // 4, [sin y, cos y, sin x, cos x][j % 4]; y into the row dims, x into the column dims
    dims = [rope_t + (0 if j % 4 < 2 else rope_h) + 2 * (j // 4) + j % 2 for j in range(fourier)]
    for block in transformer.blocks:
        attn = block.attn1
        for proj in (attn.to_q, attn.to_k):
            proj.weight[:d] = 0.0
            proj.bias[:d] = 0.0
            for j, dim in enumerate(dims):
                proj.weight[dim, j] = 1.0
        attn.to_q.bias[0] = frame_bias  # temporal pair 0 turns one radian per frame: k = q turned by +1 rad
        attn.to_k.bias[0], attn.to_k.bias[1] = frame_bias * math.cos(1.0), frame_bias * math.sin(1.0)
        attn.norm_q.weight[:d] = gain
        attn.norm_k.weight[:d] = gain


PIPELINES = {"wan": "WanPipeline", "cosmos": "Cosmos2VideoToWorldPipeline", "sana": "SanaPipeline"}


def save_generator(root: Path, family: str, transformer, vae_dir: Path, text_encoder=None, tokenizer=None) -> None:
    """The diffusers folder layout: transformer/, vae/ (a copy of the toy VAE), scheduler/, text_encoder/,
    tokenizer/, model_index.json (naming each part's class, as a published pipeline folder does)."""
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer.save_pretrained(root / "transformer")
    shutil.copytree(vae_dir, root / "vae", ignore=shutil.ignore_patterns("*.json.tmp", "pretrain.json", "settings.json"), dirs_exist_ok=True)
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(root / "scheduler")
    index = {"_class_name": PIPELINES[family], "_diffusers_version": "0.42.1", "transformer": ["diffusers", type(transformer).__name__],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    if text_encoder is not None:
        from backbones.generator.text_encoder import save_text_encoder

        save_text_encoder(root, text_encoder, tokenizer)


def save_early_generator(root: Path, family: str, transformer, vae_dir: Path, text_encoder, tokenizer_dir: Path, step: int,
                         image_size: int = 64) -> None:
    """:func:`save_generator` into ``root`` through a temporary sibling folder renamed at the end (a folder that is
    there is whole), with ``early.json`` saying at which step (pretrain_dit's ``text_freeze_step``). The tokenizer is
    the folder already saved (``tokenizer_dir``), copied: a fast tokenizer saved after use records its last padding."""
    import shutil
    import tempfile

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        save_generator(tmp, family, transformer, vae_dir)
        text_encoder.save_pretrained(tmp / "text_encoder")
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        shutil.copy2(tokenizer_dir.parent / "model_index.json", tmp / "model_index.json")  # naming the encoder and tokenizer too
        (tmp / "early.json").write_text(json.dumps({"step": step, "note": "the toy DiT part-way through its pretraining, with "
                                                    "its text encoder as finally saved (frozen from this step on)"}))
        (tmp / "pretrain.json").write_text(json.dumps({"image_size": image_size, "early_step": step}))  # (toy_image_size reads it)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_toy_generator(family: str, root: str | Path, image_size: int | None = None):
    """A toy generator folder through the family adapter's own from_pretrained; ``image_size``: None reads the side
    it was pretrained at from its ``pretrain.json`` (64 where that does not say)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fusion.config import toy_image_size

    if image_size is None:
        image_size = toy_image_size(str(root))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    if family == "wan":
        from backbones.generator.wan import WanGenerator as G
    elif family == "cosmos":
        from backbones.generator.cosmos import CosmosGenerator as G
    else:
        from backbones.generator.sana import SanaGenerator as G

        return G.from_pretrained(str(root), scheduler=sched, image_size=image_size, condition_mode="spatial_concat")
    return G.from_pretrained(str(root), scheduler=sched, image_size=image_size)


def dit_batch(rng: random.Random, n: int, p_edit: float, held_out=frozenset(), mix: EditMix = EditMix()):
    """(t2i items, edit items): t2i = (scene,), edit = (source, edited, op, target); ``mix``: see
    :func:`fusion.toyworld.conversations.random_edit_scenes`."""
    from fusion.toyworld.conversations import random_edit_scenes

    t2i, edits = [], []
    for _ in range(n):
        if rng.random() < p_edit:
            edits.append(random_edit_scenes(rng, held_out, mix))
        else:
            t2i.append(random_scene(rng, rng.choice([1, 1, 2, 3]), held_out))
    return t2i, edits


def frame_edits(rng: random.Random, n: int, held_out=frozenset()) -> list[tuple]:
    """``n`` edits with several condition frames, as conversations hold them: ``(frames, edited, op,
    target, source index, request)``. Half refer back to the first of 2-3 frames ("In the first
    picture, ...", the toy world's tracking turns, other drawings after it); half edit the latest,
    drawings before it (step-by-step turns). The other frames are one- or two-object scenes."""
    from fusion.toyworld import conversations as cv

    out = []
    for _ in range(n):
        source, edited, op, target = cv.random_edit_scenes(rng, held_out)
        others = [cv.sample_scene(rng, rng.choice([1, 2]), held_out) for _ in range(rng.choice([1, 2]))]
        request = edit_prompt(rng, source, op, target)
        if rng.random() < 0.5:
            request = rng.choice(cv.BACK).format(edit=request[0].lower() + request[1:])
            out.append(([source, *others], edited, op, target, 0, request))
        else:
            out.append(([*others, source], edited, op, target, len(others), request))
    return out


def _images(scenes, size: int = 64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(render(s, size))).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1


@torch.no_grad()
def dit_accuracy(gen, text, n: int = 32, seed: int = 20_011, steps: int = 20, guidance: float = 3.0, frames: bool = False) -> dict:
    """Exact-scene accuracy of sampled images (read back by the evaluator's reader): t2i (single objects
    apart) and edits, by operation. ``text``: the generator's own :class:`TextEncoder`."""
    from backbones.generator.base import to_pil

    rng = random.Random(seed)
    scenes = [random_scene(rng, rng.choice([1, 2, 3])) for _ in range(n)]
    g = torch.Generator().manual_seed(seed)
    states, mask = text.encode([scene_prompt(rng, s) for s in scenes])
    imgs = to_pil(gen.sample(states, mask, steps=steps, guidance=guidance, generator=g))
    ok = [read_scene(im) == s for im, s in zip(imgs, scenes)]
    out = {"t2i": _frac(ok), "t2i_1obj": _frac([k for k, s in zip(ok, scenes) if len(s) == 1]),
           "t2i_multi": _frac([k for k, s in zip(ok, scenes) if len(s) > 1])}
    if gen.uses_condition_frames:
        _, edits = dit_batch(rng, n, 1.0)
        states, mask = text.encode([edit_prompt(rng, src, op, tgt) for src, _, op, tgt in edits])
        cond = gen.encode(_images([src for src, *_ in edits], gen.image_size))[:, None]
        imgs = to_pil(gen.sample(states, mask, cond, steps=steps, guidance=guidance, generator=g))
        reads = [read_scene(im) for im in imgs]
        ok = [r == e[1] for r, e in zip(reads, edits)]
        kept = [all(o in r for o in src if o != edited_object(src, op, tgt)) for r, (src, _, op, tgt) in zip(reads, edits)]
        out["edit"] = _frac(ok)
        out["edit_preserved"] = _frac(kept)
        for op in OPS:
            out[f"edit_{op}"] = _frac([k for k, e in zip(ok, edits) if e[2] == op])
        # the same edits phrased in the middle of a conversation (in_context: referring back, after an unrelated exchange)
        crng = random.Random(seed + 1)
        states, mask = text.encode([in_context(crng, edit_prompt(crng, src, op, tgt), True) for src, _, op, tgt in edits])
        imgs = to_pil(gen.sample(states, mask, cond, steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(seed)))
        out["edit_in_context"] = _frac([read_scene(im) == e[1] for im, e in zip(imgs, edits)])
        if frames:  # edits with 2-3 condition frames (frame_edits): the first one referred back to, or the latest
            multi = frame_edits(rng, n)
            hits = {"back": [], "latest": []}
            for k in (2, 3):
                group = [m for m in multi if len(m[0]) == k]
                if not group:
                    continue
                states, mask = text.encode([m[5] for m in group])
                cond = gen.encode(_images([f for m in group for f in m[0]], gen.image_size))
                cond = cond.reshape(len(group), k, *cond.shape[1:])
                imgs = to_pil(gen.sample(states, mask, cond, steps=steps, guidance=guidance, generator=g))
                for im, m in zip(imgs, group):
                    hits["back" if m[4] == 0 else "latest"].append(read_scene(im) == m[1])
            out["edit_first_of_frames"] = _frac(hits["back"])
            out["edit_latest_of_frames"] = _frac(hits["latest"])
    return out


@torch.no_grad()
def _latent_pool(gen, tokenizer, rng: random.Random, n: int, p_edit: float, progress: bool = True, p_frames: float = 0.0,
                 p_context: float = 0.0, mix: EditMix = EditMix()) -> dict:
    """``n`` training items encoded once (the VAE is deterministic): t2i and edit latents with their
    tokenized requests (the text encoder trains, so its states are computed at each step); with
    ``p_frames``, that share of the edits again as :func:`frame_edits` (kinds ``edit_2f``, ``edit_3f``);
    ``p_context``: that share of the requests phrased :func:`in_context`."""
    t2i, edits = dit_batch(rng, n, p_edit, mix=mix)
    pool = {}
    chunks = 256
    multi = frame_edits(rng, round(len(edits) * p_frames / (1 - p_frames))) if edits and p_frames else []
    bar = tqdm(total=len(t2i) + 2 * len(edits) + sum(len(m[0]) + 1 for m in multi), desc="toy DiT: encode pool", disable=not progress)

    def enc(scenes):
        out = []
        for i in range(0, len(scenes), chunks):
            out.append(gen.encode(_images(scenes[i : i + chunks], gen.image_size)))
            bar.update(len(scenes[i : i + chunks]))
        return torch.cat(out) if out else None

    def tok(prompts, described):
        t = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        return t.input_ids, t.attention_mask, object_labels(t.input_ids, described, tokenizer)

    def ctx(request: str, edit: bool) -> str:
        return in_context(rng, request, edit) if p_context and rng.random() < p_context else request

    if t2i:
        pool["t2i"] = (enc(t2i), None, *tok([ctx(scene_prompt(rng, s), False) for s in t2i], [[(o, True) for o in s] for s in t2i]))
    if edits:
        pool["edit"] = (enc([e[1] for e in edits]), enc([e[0] for e in edits])[:, None],
                        *tok([ctx(edit_prompt(rng, src, op, tgt), True) for src, _, op, tgt in edits],
                             [edit_described(src, op, tgt) for src, _, op, tgt in edits]))
    for k in sorted({len(m[0]) for m in multi}):
        group = [m for m in multi if len(m[0]) == k]
        frames = enc([f for m in group for f in m[0]])
        pool[f"edit_{k}f"] = (enc([m[1] for m in group]), frames.reshape(len(group), k, *frames.shape[1:]),
                              *tok([m[5] for m in group], [edit_described(m[0][m[4]], m[2], m[3]) for m in group]))
    bar.close()
    return pool


@torch.no_grad()
def fit_losses(gen, text, pools: dict[str, dict], n: int = 256, ts=(0.3, 0.5, 0.7, 0.9), seed: int = 40_013) -> dict:
    """Flow loss of the trained DiT (its own encoder's states, no text dropout) at fixed ``t`` and
    noise on the first ``n`` items of each pool, by kind: ``{"t2i": {"train": .., "held_out": ..}, ...}``.
    Training and held-out items level: the model is under-fitted (more steps or width help, more
    data does not); held-out far above training: it memorised its pool (more data helps)."""
    out: dict = {}
    for name, pool in pools.items():
        for kind, (target, cond, ids, mask, _) in pool.items():
            g = torch.Generator().manual_seed(seed)
            total, count = 0.0, 0
            for t in ts:
                for i in range(0, min(n, len(target)), 64):
                    j = min(i + 64, n, len(target))
                    states = text.states(ids[i:j], mask[i:j])
                    noise = torch.randn(target[i:j].shape, generator=g)
                    loss = gen.flow_loss(target[i:j], None if cond is None else cond[i:j], states, mask[i:j], torch.full((j - i,), t), noise)
                    total, count = total + loss.item() * (j - i), count + (j - i)
            out.setdefault(kind, {})[name] = round(total / count, 5)
    return out


def edit_described(source, op: str, target) -> list[tuple]:
    """The object an edit request names, for :func:`object_labels`: ``[(obj, position_in_text)]``. Add and
    move name the target with its (new) place; remove names the removed object; recolour names the object
    *as it is* ("Recolour the yellow triangle to blue." describes a yellow triangle: the new colour is its
    own word), so the probe never asks the shape word's state to carry a colour its own words contradict."""
    if op == "recolour":
        return [(edited_object(source, op, target), False)]
    return [(target, op in ("add", "move"))]


def object_labels(ids: torch.Tensor, described: list[list[tuple]], tokenizer) -> torch.Tensor:
    """[N, L, 4] targets (shape, colour, row, col; -100: none) at each shape word of each request: the k-th
    shape word names the k-th described object (``(obj, position_in_text)``; a position the text does not
    give, as in "Remove the red circle.", is not a target)."""
    from fusion.toyworld.scenes import COLOURS, SHAPES

    shape_ids = {tokenizer.convert_tokens_to_ids(w): w for w in SHAPES}
    out = torch.full((*ids.shape, 4), -100, dtype=torch.long)
    for i, objs in enumerate(described):
        pos = [j for j, t in enumerate(ids[i].tolist()) if t in shape_ids]
        for j, (o, placed) in zip(pos, objs):
            out[i, j, 0], out[i, j, 1] = SHAPES.index(o.shape), COLOURS.index(o.colour)
            if placed:
                out[i, j, 2], out[i, j, 3] = o.row, o.col
    return out


class ObjectProbe(torch.nn.Module):
    """Linear read-outs of an object's shape, colour, row and column from a text-encoder state: the toy
    encoder's stand-in for the language pretraining a published T5 / Gemma brings (its states already
    say which words belong together). Used only while pretraining; not saved."""

    def __init__(self, dim: int):
        from fusion.toyworld.scenes import COLOURS, SHAPES

        super().__init__()
        self.sizes = (len(SHAPES), len(COLOURS), 3, 3)
        self.head = torch.nn.Linear(dim, sum(self.sizes))

    def loss(self, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(states).split(self.sizes, dim=-1)
        terms = [torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[..., k].reshape(-1), ignore_index=-100)
                 for k, lg in enumerate(logits) if (labels[..., k] >= 0).any()]
        return torch.stack(terms).mean() if terms else states.sum() * 0.0


def _draw(pool: dict, batch: int, g: torch.Generator):
    """Random items of one batch, grouped by kind: (target, cond, ids, mask, object labels, share of the batch)."""
    sizes = {k: len(v[0]) for k, v in pool.items()}
    total = sum(sizes.values())
    picks = torch.randint(total, (batch,), generator=g)
    start = 0
    for k, size in sizes.items():
        idx = picks[(picks >= start) & (picks < start + size)] - start
        start += size
        if len(idx):
            target, cond, ids, mask, labels = pool[k]
            yield target[idx], (cond[idx] if cond is not None else None), ids[idx], mask[idx], labels[idx], len(idx) / batch


def _frac(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class GroupedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with its Newton-Schulz orthogonalisation run once per matrix shape, over every matrix
    of that shape stacked, instead of once per matrix (torch's ``foreach`` path is not implemented: it raises).
    The toy Wan has 59 hidden matrices in 5 shapes: ~590 small bf16 matmuls a step became ~75 batched ones.
    Per matrix the arithmetic is torch's own, in the same order (momentum, Nesterov, bf16, the Frobenius
    normalisation of each matrix alone, the same coefficients and steps, ``adjust_lr_fn``, decoupled weight
    decay): the updates equal ``torch.optim.Muon``'s bit for bit (tests/fusion/test_toy_backbones.py);
    ``python tools/bench.py sections=[muon]`` prints the time of the two steps side by side."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            lr, wd, momentum, eps = group["lr"], group["weight_decay"], group["momentum"], group["eps"]
            lr = lr.item() if isinstance(lr, torch.Tensor) else lr
            a, b, c = group["ns_coefficients"]
            shapes: dict[tuple, list] = {}  # oriented shape (wide: rows <= columns) -> [(param, tall)]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - momentum)
                update = (g.lerp(buf, momentum) if group["nesterov"] else buf).bfloat16()
                tall = update.size(0) > update.size(1)
                if tall:
                    update = update.T
                update.div_(update.norm().clamp(min=eps))
                shapes.setdefault(tuple(update.shape), []).append((p, tall, update))
            for members in shapes.values():
                x = torch.stack([u for _, _, u in members])
                for _ in range(group["ns_steps"]):
                    gram = x @ x.transpose(1, 2)
                    x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                for (p, tall, _), u in zip(members, x):
                    p.mul_(1 - lr * wd)
                    p.add_(u.T if tall else u, alpha=-muon_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def toy_optimizers(kind: str, modules: list, lr: float, plain: tuple = (), outputs: tuple[str, ...] = ("proj_out", "lm_head")) -> list:
    """The optimizers of a toy backbone's pretraining over the parameters of ``modules`` and ``plain``.
    ``adamw``: AdamW over every parameter. ``muon``: Muon (:class:`GroupedMuon`, ``torch.optim.Muon``'s update: orthogonalised momentum,
    scaled to AdamW's RMS so ``lr`` means the same) over the weights of the hidden ``nn.Linear`` layers of
    ``modules``, AdamW over the rest: embeddings, convolutions, norms, modulation tables, biases, the output layers
    (named ``outputs``) and every parameter of ``plain`` (Muon is for hidden 2-D weights only)."""
    if kind not in TOY_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {TOY_OPTIMIZERS}, got {kind!r}")
    params = list(dict.fromkeys(p for m in (*modules, *plain) for p in m.parameters() if p.requires_grad))
    if kind == "adamw":
        return [torch.optim.AdamW(params, lr=lr, weight_decay=0.0)]
    hidden = {id(mod.weight): mod.weight for m in modules for name, mod in m.named_modules()
              if isinstance(mod, torch.nn.Linear) and mod.weight.requires_grad and name.split(".")[-1] not in outputs}
    for m in plain:  # a weight shared with a plain module (tied embeddings) stays with AdamW
        for p in m.parameters():
            hidden.pop(id(p), None)
    return [GroupedMuon(list(hidden.values()), lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW([p for p in params if id(p) not in hidden], lr=lr, weight_decay=0.0)]


def pretrain_dit(family: str, out: str | Path, vae_dir: str | Path, steps: int = 3000, batch: int = 16, lr: float = 1e-3, seed: int = 0,
                 text_dim: int = 64, p_edit: float = 0.7, p_drop_text: float = 0.1, layers: int = 4, pool_size: int = 4096,
                 text_layers: int = 2, text_length: int = TEXT_LENGTH, eval_n: int = 32, probe_weight: float = 0.1,
                 fit_n: int = 256, coord_freqs: int = 0, t_sampling: str = "shifted", t_shift: float = 3.0, copy_heads: float = 0.0,
                 p_frames: float = 0.0, p_context: float = 0.0, progress: bool = True, edit_mix: EditMix = EditMix(),
                 ema_decay: float = 0.0, patch: int = 2, image_size: int = 64, optimizer: str = "adamw",
                 text_freeze_step: int = 0, early_dir: str | Path | None = None) -> dict:
    """Pretrain a toy DiT of ``family`` together with its own text encoder (the family's class) to draw
    toy scenes from the toy world's requests (padded to ``text_length`` tokens) and to apply edits to a
    clean condition frame; save both (with the VAE, tokenizer and scheduler) in the diffusers layout.

    ``t_sampling`` / ``t_shift``: training timesteps (:func:`fusion.flow.sample_t`). Shifted by 3, a
    quarter of the steps fall above t = 0.9, where sampling starts and an edit must copy its
    condition frame from pure noise; SD3's logit-normal puts 1.4% there, and a DiT trained with it
    kept the source's other objects in a one-step prediction at t = 1 a fifth of the time (docs/toyworld_log.md,
    "Why the toy DiT did not edit, and the fix"). ``copy_heads``: :func:`init_copy_heads` with that RMSNorm gain (Wan; 0: off).
    ``ema_decay``: keep an exponential moving average of the DiT's and its encoder's weights
    (diffusers' ``EMAModel``) and save it; the last weights are scored too (``accuracy_last``).
    ``p_frames``: the share of edits with 2-3 condition frames (:func:`frame_edits`; scored as
    ``edit_first_of_frames`` / ``edit_latest_of_frames``). ``optimizer``: :func:`toy_optimizers`.
    ``text_freeze_step``: from this step on the text encoder no longer trains (its states computed without gradients, the
    object probe dropped), and the generator folder as it stands then (the DiT so far, the text encoder as it will be
    saved) is written to ``early_dir`` (atomically): stage 2's distillation reads only the text encoder, so make demo
    runs its warm-up from there beside the DiT's remaining steps (0: the encoder trains throughout)."""
    from diffusers.training_utils import EMAModel

    from backbones.generator.text_encoder import TextEncoder
    from fusion.flow import sample_t

    out = Path(out)
    if early_dir is not None and Path(early_dir).exists():  # an earlier build's snapshot: this one writes its own (or none)
        import shutil

        shutil.rmtree(early_dir)
    if text_freeze_step and ema_decay:
        raise ValueError("text_freeze_step with ema_decay: the saved (averaged) text encoder would differ from the one written at the "
                         "freeze step; use one or the other")
    if text_freeze_step and not 0 < text_freeze_step < steps:
        raise ValueError(f"text_freeze_step must be in (0, steps={steps}), got {text_freeze_step}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae_config = json.loads((Path(vae_dir) / "config.json").read_text())
    latent_channels = vae_config["latent_channels"]
    side = image_size // 2 ** (len(vae_config["block_out_channels"]) - 1)  # the latents' side
    tokenizer = toy_tokenizer(text_length)
    transformer = toy_transformer(family, latent_channels, text_dim, layers, coord_freqs=coord_freqs, patch=patch, latent_side=side)
    if copy_heads:
        init_copy_heads(transformer, latent_channels, copy_heads)
    encoder = toy_text_encoder(family, len(tokenizer), text_dim, text_layers)
    save_generator(out, family, transformer, Path(vae_dir), encoder, tokenizer)
    gen = load_toy_generator(family, out, image_size)
    text = TextEncoder.from_pretrained(out)
    text.encoder.train().requires_grad_(True)
    probe = ObjectProbe(text_dim)  # object read-outs that shape the encoder's states (probe_weight; 0: the flow loss alone)
    weights = [*gen.transformer.parameters(), *text.encoder.parameters()]  # what is saved (and averaged with ema_decay)
    params = [*weights, *probe.parameters()]
    opts = toy_optimizers(optimizer, [gen.transformer, text.encoder], lr, plain=(probe,))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(steps, 100)) for o in opts]
    ema = EMAModel(weights, decay=ema_decay) if ema_decay else None
    t0, losses, probes = time.time(), [], []
    p_edit, frames = (p_edit, p_frames) if gen.uses_condition_frames else (0.0, 0.0)
    pool = _latent_pool(gen, tokenizer, rng, pool_size, p_edit, progress, frames, p_context, edit_mix)
    bar = tqdm(range(steps), desc=f"toy DiT ({family})", disable=not progress)
    g = torch.Generator().manual_seed(seed)
    gen.transformer.train()
    for step in bar:
        cpushare.poll()
        if text_freeze_step and step == text_freeze_step:
            text.encoder.eval().requires_grad_(False)  # from here on the encoder is what will be saved
            for p in text.encoder.parameters():
                p.grad = None
            if early_dir is not None:
                save_early_generator(Path(early_dir), family, gen.transformer, Path(vae_dir), text.encoder, out / "tokenizer", step,
                                     image_size)
            probe_before_freeze = float(np.mean(probes[-50:])) if probes else 0.0
        frozen_text = bool(text_freeze_step) and step >= text_freeze_step
        loss, probe_loss = 0.0, 0.0
        for target, cond, ids, mask, labels, share in _draw(pool, batch, g):
            with torch.no_grad() if frozen_text else contextlib.nullcontext():
                states = text.states(ids, mask)
            if probe_weight and not frozen_text:
                probe_loss = probe_loss + probe.loss(states, labels) * share
            keep = (torch.rand(len(states), generator=g) >= p_drop_text).float()[:, None, None]
            states = states * keep  # a dropped request is all zeros: the null condition of guidance
            t = sample_t(len(states), t_sampling, g, "cpu", shift=t_shift)
            noise = torch.randn(target.shape, generator=g)
            loss = loss + gen.flow_loss(target, cond, states, mask, t, noise) * share
        for o in opts:
            o.zero_grad()
        (loss + probe_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
        if ema is not None:
            ema.step(weights)
        losses.append(loss.item())
        probes.append(float(probe_loss.detach()) if isinstance(probe_loss, torch.Tensor) else 0.0)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", probe=f"{np.mean(probes[-50:]):.3f}")
    gen.transformer.eval()
    text.encoder.eval().requires_grad_(False)
    last = None
    if ema is not None:  # the last weights scored on the same items, then the average put in their place
        last = dit_accuracy(gen, text, n=eval_n, frames=bool(frames))
        ema.copy_to(weights)
    acc = dit_accuracy(gen, text, n=eval_n, frames=bool(frames))
    held_out = _latent_pool(gen, tokenizer, random.Random(seed + 54_321), min(fit_n, pool_size), p_edit, False, frames, p_context,
                            edit_mix)
    fit = fit_losses(gen, text, {"train": pool, "held_out": held_out}, n=fit_n)
    stats = {"family": family, "steps": steps, "seconds": round(time.time() - t0, 1), "first_loss": losses[0],
             "last_loss": float(np.mean(losses[-50:])), "params": sum(p.numel() for p in gen.transformer.parameters()),
             "text_encoder": type(text.encoder).__name__, "text_encoder_params": sum(p.numel() for p in text.encoder.parameters()),
             "text_length": text_length, "probe_weight": probe_weight, "coord_freqs": coord_freqs if family == "wan" else None,
             "patch": patch, "image_size": image_size, "optimizer": optimizer, "text_freeze_step": text_freeze_step, "t_sampling": t_sampling, "t_shift": t_shift, "copy_heads": copy_heads, "p_frames": frames, "p_context": p_context, "p_edit": p_edit,
             **{k: v for k, v in asdict(edit_mix).items() if v},
             "last_probe_loss": probe_before_freeze if text_freeze_step else float(np.mean(probes[-50:])), "accuracy": acc, "fit": fit,
             **({"ema_decay": ema_decay, "accuracy_last": last} if ema is not None else {})}
    gen.transformer.save_pretrained(out / "transformer")
    text.encoder.save_pretrained(out / "text_encoder")
    (out / "pretrain.json").write_text(json.dumps(stats, indent=2))
    return stats


# ----------------------------------------------------------------------------- the toy MLLM
TOY_MLLM_PIXELS = 84 * 84  # 6x6 patches of 14 px -> 3x3 merged vision tokens: one per grid cell
NUMBERS = ("zero", "one", "two", "three")


def caption(scene) -> str:
    from fusion.toyworld.conversations import list_objs

    return f"{list_objs(scene)}." if scene else "An empty picture."


ORDINALS = ("first", "second", "third")


def text_exercise(rng: random.Random) -> list[dict]:
    """One text-only exchange in the toy world's words: repeat a description, pick its n-th object, or look an
    object's colour or place up in it. The language skills (copying, indexing, lookup) a published MLLM brings from
    its text pretraining and a toy MLLM trained on pictures alone lacks; with them stage 1 copies more of a request's
    objects into its own words (docs/toyworld_log.md: an option, ``MakeToyConfig.mllm_p_text``)."""
    from fusion.toyworld.conversations import list_objs, place

    scene = random_scene(rng, rng.randint(1, 3))
    objs, said = list(scene), list_objs(scene)
    kind = rng.choice(["repeat", "nth", "colour", "where"])
    if kind == "repeat":
        q, a = f"{rng.choice(['Repeat', 'Say', 'Copy this'])}: {said}.", f"{said}."
    elif kind == "nth":
        i = rng.randrange(len(objs))
        word = "last" if i == len(objs) - 1 and len(objs) > 1 and rng.random() < 0.5 else ORDINALS[i]
        q, a = f"Which is the {word} object in: {said}?", f"{place(objs[i])}."
    else:
        o = rng.choice(objs)
        if kind == "colour":
            q, a = f"There is {said}. What colour is the {o.shape} at the {o.where}?", f"{o.colour}."
        else:
            q, a = f"There is {said}. Where is the {o.colour} {o.shape}?", f"{o.where}."
    return [{"role": "user", "content": [{"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a[0].upper() + a[1:]}]}]


def mllm_sample(rng: random.Random, size: int = 64, p_text: float = 0.0) -> list[dict]:
    """One captioning / question-answering exchange about a random scene (the MLLM's pretraining); with probability
    ``p_text`` a :func:`text_exercise` instead."""
    from fusion.toyworld.conversations import ref
    from fusion.toyworld.scenes import CELL_NAMES, CELLS

    if p_text > 0 and rng.random() < p_text:
        return text_exercise(rng)
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
def mllm_accuracy(adapter, n: int = 64, seed: int = 30_011, text_only: bool = False, image_size: int = 64) -> float:
    """Fraction of held-out pretraining questions (``text_only``: text exercises) answered exactly (greedy decoding)."""
    rng = random.Random(seed)
    hits = 0
    eot = adapter.end_of_turn_id
    for _ in range(n):
        msgs = text_exercise(rng) if text_only else mllm_sample(rng, image_size)
        r = adapter.render(msgs[:1], add_generation_prompt=True)
        inputs = {k: v for k, v in r.model_inputs().items() if k != "labels" and v is not None}  # text-only: no pixels
        out = adapter.model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        text = adapter.tokenizer.decode(out[0, r.input_ids.shape[1]:], skip_special_tokens=True).strip()
        hits += text == msgs[1]["content"][0]["text"]
    return hits / n


def pretrain_mllm(out: str | Path, steps: int = 1500, batch: int = 8, lr: float = 2e-3, seed: int = 0, hidden_size: int = 128,
                  num_layers: int = 4, vision_hidden_size: int = 64, initializer_range: float = 0.1, rope_theta: float = 10000.0,
                  mrope_interleaved: bool = False, p_text: float = 0.0, vision_out_scale: float = 1.0, progress: bool = True,
                  image_size: int = 64, optimizer: str = "adamw") -> dict:
    """Build a tiny Qwen2.5-VL (real classes, real folder layout) and pretrain it on captions and
    questions about toy scenes of ``image_size`` pixels (and, a ``p_text`` share, :func:`text_exercise`); save it with its
    processor. No ``<|bov|>`` yet: stage 1 adds it, as it does to a published checkpoint. ``optimizer``: :func:`toy_optimizers`."""
    from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
    from backbones.mllm.tiny_qwen2_5_vl import make_tiny

    out = Path(out)
    make_tiny(out.parent, seed, out.name, hidden_size, num_layers, vision_hidden_size, TOY_MLLM_PIXELS, TOY_MLLM_PIXELS, initializer_range, rope_theta,
              mrope_interleaved, vision_out_scale)
    adapter = Qwen25VLAdapter.from_pretrained(str(out), add_bov=False)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opts = toy_optimizers(optimizer, [adapter.model], lr)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(steps, 50)) for o in opts]
    t0, losses = time.time(), []
    adapter.model.train()
    bar = tqdm(range(steps), desc="toy MLLM", disable=not progress)
    for step in bar:
        cpushare.poll()
        inputs, labels = collate_rendered([adapter.render(mllm_sample(rng, image_size, p_text=p_text)) for _ in range(batch)], adapter.tokenizer.pad_token_id)
        loss = adapter(**inputs, labels=labels)["loss"]
        for o in opts:
            o.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.model.parameters(), 1.0)
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    adapter.model.eval()
    seconds = round(time.time() - t0, 1)
    adapter.save_pretrained(out)  # before scoring it: a failure there loses no training
    stats = {"steps": steps, "seconds": seconds, "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:])),
             "params": sum(p.numel() for p in adapter.model.parameters()), "answer_accuracy": mllm_accuracy(adapter, image_size=image_size),
             "image_size": image_size, "optimizer": optimizer}
    if p_text:
        stats.update(p_text=p_text, text_accuracy=mllm_accuracy(adapter, text_only=True))
    (out / "pretrain.json").write_text(json.dumps(stats, indent=2))
    return stats
