"""SANA adapter: ``SanaTransformer2DModel`` + ``AutoencoderDC`` (SANA 1600M, SANA1.5 1.6B).

Timestep scale: one timestep per sample, ``t * 1000`` (SanaPipeline passes the flow
scheduler's ``sigmas * 1000``); the model predicts ``eps - x0``.

Condition modes (``condition_mode``):

* ``mllm_only``: earlier images reach the DiT only through the MLLM's hidden states (the
  MetaQuery / BLIP3-o / Ming-Lite-Uni setup); condition frames are ignored.
* ``spatial_concat``: in-context, the clean condition latents and the noisy target side by
  side along the width; the target's slice of the output is its velocity (the condition
  slices' velocity is replaced by 0 and carries no loss). The 512/1024 px models have no
  positional embedding, so the layout is read through the feed-forward convolutions.

Latents: ``vae.encode(x).latent * scaling_factor`` (DC-AE), decoded after ``/ scaling_factor``.
Text: ``encoder_attention_mask`` (1 = keep) is the connector's mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from backbones.generator.base import FlowGenerator, load_parts
from backbones.generator.text_encoder import pipeline_text_length
from backbones.generator.wan import DTYPES

CONDITION_MODES = ("mllm_only", "spatial_concat")


class SanaGenerator(FlowGenerator):
    """SANA DiT + DC-AE under the toolkit's flow convention."""

    @property
    def published_buckets(self):
        """SANA's 1024 aspect-ratio bins (the pipeline's ``ASPECT_RATIO_1024_BIN``, from PixArt-alpha)."""
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN

        return tuple((int(h), int(w)) for h, w in ASPECT_RATIO_1024_BIN.values())

    timestep_scale = 1000.0

    def __init__(self, transformer, vae, scheduler: Any = None, image_size: int = 512, condition_mode: str = "mllm_only"):
        super().__init__(transformer, vae, scheduler, image_size)
        if condition_mode not in CONDITION_MODES:
            raise ValueError(f"generator.condition_mode must be one of {CONDITION_MODES}, got {condition_mode!r}")
        self.condition_mode = condition_mode
        self.uses_condition_frames = condition_mode == "spatial_concat"

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        text_dim: int | None = None,
        dtype: str = "float32",
        scheduler: Any = None,
        image_size: int = 512,
        condition_mode: str = "mllm_only",
        device: str | None = None,
        architecture: dict | None = None,
        text_length: int | None = None,
    ) -> SanaGenerator:
        from diffusers import SanaTransformer2DModel

        transformer, vae = load_parts(SanaTransformer2DModel, path, "caption_channels", text_dim, DTYPES[dtype], architecture, device)
        gen = cls(transformer, vae, scheduler, image_size, condition_mode)
        gen.text_length = text_length if text_length is not None else pipeline_text_length(path)
        return gen.to(device) if device else gen

    @property
    def text_dim(self) -> int:
        return self.transformer.config.caption_channels

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.out_channels

    def dit_blocks(self):
        return self.transformer.transformer_blocks

    def target_grid(self, tokens, frames_shape):
        b, f, c, h, w = frames_shape
        p = self.transformer.config.patch_size
        return tokens.reshape(b, h // p, f * w // p, tokens.shape[-1])[:, :, -(w // p):]

    def _frames_velocity(self, frames, t, n_cond, text_states, text_mask, text_lengths=None):
        # batch padding (text_lengths) is already masked out: pad_text gives it mask 0, and SANA never attends a masked token
        b, f, c, h, w = frames.shape
        x = frames.permute(0, 2, 3, 1, 4).reshape(b, c, h, f * w)  # side by side along the width
        out = self.transformer(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=text_states.to(self.dtype),
            timestep=(t * self.timestep_scale).to(self.dtype),
            encoder_attention_mask=text_mask,
            return_dict=False,
        )[0]
        v = out.reshape(b, c, h, f, w).permute(0, 3, 1, 2, 4)
        if n_cond:
            v = torch.cat([torch.zeros_like(v[:, :n_cond]), v[:, n_cond:]], dim=1)
        return v


def make_tiny(out_dir: str | Path, seed: int = 0, name: str = "sana") -> Path:
    """Tiny SANA (``transformer/``, ``vae/`` DC-AE with 8x compression, ``scheduler/``)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

    root = Path(out_dir) / name
    torch.manual_seed(seed)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=16, attention_head_dim=8, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16, 16, 32), decoder_block_out_channels=(8, 16, 16, 32),
        encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4, scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.5, sample_size=8, patch_size=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    index = {"_class_name": "SanaPipeline", "_diffusers_version": "0.42.1", "transformer": ["diffusers", "SanaTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderDC"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    from backbones.generator.text_encoder import make_tiny_text_encoder

    make_tiny_text_encoder(root, "Gemma2Model", transformer.config.caption_channels, seed=seed)  # the pipeline's own encoder class: the distillation teacher
    return root
