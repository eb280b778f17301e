"""Cosmos adapter: ``CosmosTransformer3DModel`` + the Wan2.1 VAE (Predict2 T2I / Video2World, Predict2.5).

Timestep mapping. Predict2 pipelines run an EDM schedule (``x = x0 + s*eps``) and feed the
transformer ``c_in * x`` with ``c_in = 1 - t``, ``t = s / (s + 1)``, then form
``x0 = (1 - t) x - t * out``. Since ``(1 - t)(x0 + s eps) = (1 - t) x0 + t eps``, the
transformer input is exactly the flow interpolant at ``t`` and ``out = eps - x0``: in the
toolkit's convention the Predict2 mapping is timestep = ``t``, output = velocity. The
Predict2.5 pipeline passes the raw flow sigma (also ``t``) and reads a velocity. So both
versions take ``t`` unscaled; they differ only in their schedulers (EDM Karras sigmas
80..0.002 mapped to flow for Predict2, UniPC flow Karras 200..0.01 for Predict2.5), which the
yaml names.

Condition frames: the ``condition_mask`` channel (1 on clean frames), per-frame timesteps
``[B,1,F,1,1]`` with ``cond_timestep`` (the pipelines' conditional-frame timestep, 1e-4) on
clean frames, and the velocity on condition frames replaced (by 0, the clean frames' own
flow) so they carry no loss. Text2Image checkpoints (no mask channel) take no condition frames.

Text width: Predict2 cross-attends to ``text_embed_dim``; Predict2.5 first projects
``crossattn_proj_in_channels`` (all Qwen2.5-VL layers concatenated: 28 x 3584 = 100352).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from backbones.generator.base import FlowGenerator, length_mask, load_parts, transformer_config
from backbones.generator.text_encoder import pipeline_text_length
from backbones.generator.wan import DTYPES


def _width_key(config) -> str:
    return "crossattn_proj_in_channels" if config.get("use_crossattn_projection", False) else "text_embed_dim"


class CosmosGenerator(FlowGenerator):
    """Cosmos-Predict DiT + Wan2.1 VAE under the toolkit's flow convention."""

    attends_text_padding = True  # no text mask: the pipeline's zero padding is attended

    #: Cosmos-Predict2.5's 16:9 size (diffusers' Cosmos2_5 pipeline default, 704x1280) and its portrait transpose
    published_buckets = ((704, 1280), (1280, 704))

    def __init__(self, transformer, vae, scheduler: Any = None, image_size: int = 512, cond_timestep: float = 1e-4):
        super().__init__(transformer, vae, scheduler, image_size)
        self.cond_timestep = cond_timestep

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        text_dim: int | None = None,
        dtype: str = "float32",
        scheduler: Any = None,
        image_size: int = 512,
        cond_timestep: float = 1e-4,
        device: str | None = None,
        architecture: dict | None = None,
        text_length: int | None = None,
    ) -> CosmosGenerator:
        from diffusers import CosmosTransformer3DModel

        key = _width_key(transformer_config(CosmosTransformer3DModel, path, architecture))
        transformer, vae = load_parts(CosmosTransformer3DModel, path, key, text_dim, DTYPES[dtype], architecture, device)
        gen = cls(transformer, vae, scheduler, image_size, cond_timestep)
        gen.text_length = text_length if text_length is not None else pipeline_text_length(path)
        return gen.to(device) if device else gen

    @property
    def has_condition_channel(self) -> bool:
        return self.transformer.config.in_channels == self.transformer.config.out_channels + 1

    @property
    def uses_condition_frames(self) -> bool:  # type: ignore[override]
        return self.has_condition_channel

    def text_width_notes(self, mllm_layers: int, mllm_width: int) -> list[str]:
        c = self.transformer.config
        if not c.get("use_crossattn_projection", False) or c.crossattn_proj_in_channels == mllm_layers * mllm_width:
            return []
        return [f"Cosmos-Predict2.5's crossattn_proj_in_channels {c.crossattn_proj_in_channels:,} is the width it was trained on "
                "(28 Qwen2.5-VL-7B layers x 3584); this MLLM gives "
                f"{mllm_layers} x {mllm_width} = {mllm_layers * mllm_width:,}. As configured the connector maps into "
                f"{c.crossattn_proj_in_channels:,} and the projection keeps its weights; generator.text_dim={mllm_layers * mllm_width} "
                "re-initialises the projection alone (every other DiT weight loads) to read all of this MLLM's layers"]

    @property
    def text_dim(self) -> int:
        c = self.transformer.config
        return c.crossattn_proj_in_channels if c.get("use_crossattn_projection", False) else c.text_embed_dim

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.out_channels

    def dit_blocks(self):
        return self.transformer.transformer_blocks

    def target_grid(self, tokens, frames_shape):
        b, f, c, h, w = frames_shape
        _, ph, pw = self.transformer.config.patch_size
        return tokens.reshape(b, f, h // ph, w // pw, tokens.shape[-1])[:, -1]

    def _frames_velocity(self, frames, t, n_cond, text_states, text_mask, text_lengths=None):
        b, f, c, h, w = frames.shape
        x = frames.permute(0, 2, 1, 3, 4).to(self.dtype)
        text = (text_states * text_mask[..., None].to(text_states.dtype)).to(self.dtype)
        kwargs: dict[str, Any] = {}
        if self.has_condition_channel:
            cond_mask = torch.zeros(b, 1, f, h, w, device=x.device, dtype=x.dtype)
            cond_mask[:, :, :n_cond] = 1
            timestep = t.view(b, 1, 1, 1, 1).expand(b, 1, f, 1, 1).clone()
            timestep[:, :, :n_cond] = self.cond_timestep
            kwargs["condition_mask"] = cond_mask
        else:
            if n_cond:
                raise ValueError("this Cosmos checkpoint (Text2Image, no condition-mask channel) takes no condition frames")
            timestep = t
        keep = length_mask(text_lengths, text.shape[1])
        if keep is not None:  # batch padding only: the model's own cross-attention mask keeps each row on its own tokens
            kwargs["attention_mask"] = keep
        if self.transformer.config.concat_padding_mask:
            kwargs["padding_mask"] = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
        out = self.transformer(hidden_states=x, timestep=timestep.to(x.dtype), encoder_hidden_states=text, return_dict=False, **kwargs)[0]
        v = out.permute(0, 2, 1, 3, 4)
        if n_cond:
            v = torch.cat([torch.zeros_like(v[:, :n_cond]), v[:, n_cond:]], dim=1)
        return v


def make_tiny(out_dir: str | Path, seed: int = 0, name: str = "cosmos", variant: str = "2.5") -> Path:
    """Tiny Cosmos-Predict (``2.5`` with the cross-attention projection, ``2`` Video2World, ``2_t2i``)."""
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    root = Path(out_dir) / name
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    kw = dict(in_channels=16 if variant == "2_t2i" else 17, out_channels=16, num_attention_heads=2, attention_head_dim=12,
              num_layers=2, mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2),
              rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None)
    if variant == "2.5":
        kw.update(use_crossattn_projection=True, crossattn_proj_in_channels=48, encoder_hidden_states_channels=32)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, use_karras_sigmas=True,
                                            sigma_max=200.0, sigma_min=0.01)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    transformer = CosmosTransformer3DModel(**kw)
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    pipe = {"2.5": "Cosmos2_5_PredictBasePipeline", "2": "Cosmos2VideoToWorldPipeline", "2_t2i": "Cosmos2TextToImagePipeline"}[variant]
    index = {"_class_name": pipe, "_diffusers_version": "0.42.1", "transformer": ["diffusers", "CosmosTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", type(scheduler).__name__]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    if variant == "2":  # Cosmos-Predict2 reads T5 (Predict2.5 reads Cosmos-Reason, a Qwen2.5-VL: no tiny teacher here)
        from backbones.generator.text_encoder import make_tiny_text_encoder

        make_tiny_text_encoder(root, "T5EncoderModel", transformer.config.text_embed_dim, seed=seed)
    return root
