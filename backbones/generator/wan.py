"""Wan adapter: ``WanTransformer3DModel`` + ``AutoencoderKLWan`` (Wan2.1 T2V, Wan2.2 TI2V).

Timestep scale: the transformer takes ``t * 1000`` (diffusers' flow schedulers use
``timesteps = sigmas * num_train_timesteps``) and predicts ``eps - x0``: the toolkit's own
convention, so only the scale changes.

Condition frames (the TI2V ``expand_timesteps`` path): the clean latents of earlier images
are concatenated along time before the noisy target, and the timestep is given per patch
token, 0 on the clean frames and ``t * 1000`` on the target (pipeline_wan_i2v.py builds the
same ``first_frame_mask * t`` per token). Their velocity is replaced by 0, so they never
move under a flow solver and carry no loss. Wan has no text mask: padded text positions are
zeroed, as the pipeline's zero padding does. Rows batched with texts of different lengths
(``text_lengths``): the cross-attention of each block gets a key mask for the added padding
only (through a forward pre-hook on ``attn2``, whose processor takes ``attention_mask``; the
block itself passes none), so each row attends exactly the tokens it would alone. With the
DiT's gradient checkpointing on in a training forward the hook would be gone when backward
recomputes a block, so then :attr:`pads_text` is False and rows are grouped by length instead.

Coordinate channels (toy checkpoints): a transformer whose ``in_channels`` exceed its
``out_channels`` by 2 gets two fixed input channels holding each latent cell's (y, x) in
[-1, 1], an absolute position signal next to RoPE (small DiTs place objects on a grid far
more reliably with it); by ``2 + 4k``, also ``sin``/``cos`` of ``pi / 2 * 2**i * y`` and of
``x`` for ``i < k`` (Fourier features, the lowest period twice the span so the two edges
differ: a query/key projection can then peak at a given cell, which a bilinear form of the
ramps cannot; the toy Wan drew 86% of scenes with them against 66%, see docs/toyworld_log.md). Published
checkpoints have none; the choice is read from the config.

Latents: the VAE slot of the checkpoint (``AutoencoderKLWan``: ``(z - latents_mean) / latents_std``
of the posterior mode, one latent frame per image; a toy checkpoint may hold a 2-D ``AutoencoderKL``).

Run as: ``python tools/train.py generator=tiny_wan ...`` (published: ``generator=wan2_1_t2v_1_3b``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from backbones.generator.base import FlowGenerator, length_mask, load_parts
from backbones.generator.text_encoder import pipeline_text_length

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WanGenerator(FlowGenerator):
    """Wan DiT + VAE under the toolkit's flow convention."""

    attends_text_padding = True  # no text mask: the pipeline's zero padding is attended

    timestep_scale = 1000.0
    #: Wan2.1 T2V-1.3B's supported sizes (its configs' SUPPORTED_SIZES '832*480' and '480*832', width*height)
    published_buckets = ((480, 832), (832, 480))

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        text_dim: int | None = None,
        dtype: str = "float32",
        scheduler: Any = None,
        image_size: int = 512,
        device: str | None = None,
        architecture: dict | None = None,
        text_length: int | None = None,
    ) -> WanGenerator:
        from diffusers import WanTransformer3DModel

        transformer, vae = load_parts(WanTransformer3DModel, path, "text_dim", text_dim, DTYPES[dtype], architecture, device)
        gen = cls(transformer, vae, scheduler, image_size)
        gen.text_length = text_length if text_length is not None else pipeline_text_length(path)
        return gen.to(device) if device else gen

    @property
    def text_dim(self) -> int:
        return self.transformer.config.text_dim

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.out_channels

    @property
    def coord_channels(self) -> int:
        c = self.transformer.config
        extra = c.in_channels - c.out_channels
        if extra != 0 and (extra < 2 or (extra - 2) % 4):
            raise ValueError(f"Wan transformer: in_channels {c.in_channels} must equal out_channels {c.out_channels} "
                             f"(or exceed it by 2 + 4k coordinate channels: y, x and k sin/cos frequency pairs of each)")
        return extra

    def dit_blocks(self):
        return self.transformer.blocks

    def target_grid(self, tokens, frames_shape):
        b, f, c, h, w = frames_shape
        _, ph, pw = self.transformer.config.patch_size
        return tokens.reshape(b, f, h // ph, w // pw, tokens.shape[-1])[:, -1]

    @property
    def pads_text(self) -> bool:
        return not (getattr(self.transformer, "gradient_checkpointing", False) and torch.is_grad_enabled())

    @contextmanager
    def _cross_attention_keys(self, keep: torch.Tensor | None):
        """Every block's cross-attention attends only the ``keep`` [B, S] text positions (None: all)."""
        if keep is None:
            yield
            return
        mask = keep[:, None, None, :]  # [B, 1, 1, S] over the keys, broadcast over heads and queries

        def pre(module, args, kwargs):
            args = list(args)
            if len(args) > 2:
                args[2] = mask
            else:
                kwargs["attention_mask"] = mask
            return tuple(args), kwargs

        handles = [block.attn2.register_forward_pre_hook(pre, with_kwargs=True) for block in self.transformer.blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _frames_velocity(self, frames, t, n_cond, text_states, text_mask, text_lengths=None):
        b, f, c, h, w = frames.shape
        _, ph, pw = self.transformer.config.patch_size
        per_frame = t[:, None].expand(b, f).clone()
        per_frame[:, :n_cond] = 0.0
        timestep = (per_frame * self.timestep_scale).repeat_interleave((h // ph) * (w // pw), dim=1)  # [B, tokens]
        text = text_states * text_mask[..., None].to(text_states.dtype)
        x = frames
        if self.coord_channels:
            grid = coordinate_grid(h, w, self.coord_channels, x.device, x.dtype)
            x = torch.cat([x, grid.expand(b, f, *grid.shape)], dim=2)
        with self._cross_attention_keys(length_mask(text_lengths, text.shape[1])):
            out = self.transformer(
                hidden_states=x.permute(0, 2, 1, 3, 4).to(self.dtype),
                timestep=timestep,
                encoder_hidden_states=text.to(self.dtype),
                return_dict=False,
            )[0]
        v = out.permute(0, 2, 1, 3, 4)
        if n_cond:
            v = torch.cat([torch.zeros_like(v[:, :n_cond]), v[:, n_cond:]], dim=1)
        return v


def coordinate_grid(h: int, w: int, channels: int, device=None, dtype=None) -> torch.Tensor:
    """[channels, h, w] fixed position channels: (y, x) in [-1, 1], then for each frequency
    ``pi / 2 * 2**i`` (``i < (channels - 2) / 4``) sin and cos of it times y, then of it times x
    (the lowest period is 4, twice the span: with ``pi`` the rows at -1 and 1 would be alike)."""
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)[:, None].expand(h, w)
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)[None, :].expand(h, w)
    out = [ys, xs]
    for i in range((channels - 2) // 4):
        f = torch.pi / 2 * 2**i
        out += [torch.sin(f * ys), torch.cos(f * ys), torch.sin(f * xs), torch.cos(f * xs)]
    return torch.stack(out)


def make_tiny(out_dir: str | Path, seed: int = 0, name: str = "wan", variant: str = "2.1") -> Path:
    """Tiny Wan (``transformer/``, ``vae/``, ``scheduler/``, ``model_index.json``) in the diffusers layout."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
    )

    root = Path(out_dir) / name
    torch.manual_seed(seed)
    z = {"2.1": 16, "2.2": 48, "kl": 8}[variant]
    if variant == "kl":  # the toy slot: a plain 2-D AutoencoderKL (f=4), much cheaper than the causal 3-D VAE on stills
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                            latent_channels=z, norm_num_groups=8, sample_size=64)
    elif variant == "2.1":
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
             "vae": ["diffusers", type(vae).__name__], "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "expand_timesteps": variant == "2.2"}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    from backbones.generator.text_encoder import make_tiny_text_encoder

    make_tiny_text_encoder(root, "UMT5EncoderModel", transformer.config.text_dim, seed=seed)  # the pipeline's own encoder class: the distillation teacher
    return root
