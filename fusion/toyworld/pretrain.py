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


def pretrain_vae(out: str | Path, steps: int = 2000, batch: int = 8, lr: float = 2e-3, seed: int = 0, kl_weight: float = 1e-6,
                 channels: tuple[int, ...] = (16, 32, 64), latent_channels: int = 8, progress: bool = True) -> dict:
    """Train and save ``<out>`` (a diffusers AutoencoderKL folder); returns its stats.

    Measured on a 2-core CPU with these defaults (0.69 M parameters): 2000 steps in 405 s,
    every one of 64 held-out random scenes read back exactly from its reconstruction
    (1000 steps: 220 s, 80%).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = toy_vae(latent_channels, tuple(channels))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
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
