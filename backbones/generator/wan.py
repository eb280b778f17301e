"""Wan adapter: ``WanTransformer3DModel`` + ``AutoencoderKLWan`` (Wan2.1 T2V, Wan2.2 TI2V).

Timestep scale: the transformer takes ``t * 1000`` (diffusers' flow schedulers use
``timesteps = sigmas * num_train_timesteps``) and predicts ``eps - x0``: the toolkit's own
convention, so only the scale changes.

Condition frames (the TI2V ``expand_timesteps`` path): the clean latents of earlier images
are concatenated along time before the noisy target, and the timestep is given per patch
token, 0 on the clean frames and ``t * 1000`` on the target (pipeline_wan_i2v.py builds the
same ``first_frame_mask * t`` per token). Their velocity is replaced by 0, so they never
move under a flow solver and carry no loss. Wan has no text mask: padded text positions are
zeroed, as the pipeline's zero padding does.

Latents: ``(z - latents_mean) / latents_std`` of the posterior mode, one latent frame per image.

Run as: ``python tools/train.py generator=tiny_wan ...`` (published: ``generator=wan2_1_t2v_1_3b``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from backbones.generator.base import FlowGenerator, load_transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def wan_vae_encode(vae, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] -> ``(mode - mean) / std`` latents [B,C,h,w] (one latent frame per image)."""
    z = vae.encode(x[:, :, None]).latent_dist.mode()
    return ((z - mean.to(z)) / std.to(z))[:, :, 0]


def wan_vae_decode(vae, mean: torch.Tensor, std: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B,C,h,w] -> images [B,3,H,W]."""
    return vae.decode(z[:, :, None] * std.to(z) + mean.to(z)).sample[:, :, 0]


class WanGenerator(FlowGenerator):
    """Wan DiT + VAE under the toolkit's flow convention."""

    timestep_scale = 1000.0

    def __init__(self, transformer, vae, scheduler: Any = None, image_size: int = 512):
        super().__init__(transformer, vae, scheduler, image_size)
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        text_dim: int | None = None,
        dtype: str = "float32",
        scheduler: Any = None,
        image_size: int = 512,
        device: str | None = None,
    ) -> WanGenerator:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel

        transformer = load_transformer(WanTransformer3DModel, path, "text_dim", text_dim, DTYPES[dtype])
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        gen = cls(transformer, vae, scheduler, image_size)
        return gen.to(device) if device else gen

    @property
    def text_dim(self) -> int:
        return self.transformer.config.text_dim

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.out_channels

    @property
    def spatial_factor(self) -> int:
        c = self.vae.config
        return 2 ** (len(c.dim_mult) - 1) * (c.patch_size or 1)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return wan_vae_encode(self.vae, self.latents_mean, self.latents_std, x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return wan_vae_decode(self.vae, self.latents_mean, self.latents_std, z)

    def dit_blocks(self):
        return self.transformer.blocks

    def target_grid(self, tokens, frames_shape):
        b, f, c, h, w = frames_shape
        _, ph, pw = self.transformer.config.patch_size
        return tokens.reshape(b, f, h // ph, w // pw, tokens.shape[-1])[:, -1]

    def _frames_velocity(self, frames, t, n_cond, text_states, text_mask):
        b, f, c, h, w = frames.shape
        _, ph, pw = self.transformer.config.patch_size
        per_frame = t[:, None].expand(b, f).clone()
        per_frame[:, :n_cond] = 0.0
        timestep = (per_frame * self.timestep_scale).repeat_interleave((h // ph) * (w // pw), dim=1)  # [B, tokens]
        text = text_states * text_mask[..., None].to(text_states.dtype)
        out = self.transformer(
            hidden_states=frames.permute(0, 2, 1, 3, 4).to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=text.to(self.dtype),
            return_dict=False,
        )[0]
        v = out.permute(0, 2, 1, 3, 4)
        if n_cond:
            v = torch.cat([torch.zeros_like(v[:, :n_cond]), v[:, n_cond:]], dim=1)
        return v


def make_tiny(out_dir: str | Path, seed: int = 0, name: str = "wan", variant: str = "2.1") -> Path:
    """Tiny Wan (``transformer/``, ``vae/``, ``scheduler/``, ``model_index.json``) in the diffusers layout."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    root = Path(out_dir) / name
    torch.manual_seed(seed)
    z = 16 if variant == "2.1" else 48
    if variant == "2.1":
        vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               latents_mean=[0.0] * z, latents_std=[1.0] * z)
    else:  # Wan2.2 TI2V: residual VAE, 2x2 patchified pixels, 16x spatial
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                               latents_mean=[0.0] * z, latents_std=[1.0] * z)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z, out_channels=z,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "expand_timesteps": variant != "2.1"}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
