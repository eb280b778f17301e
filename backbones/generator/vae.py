"""VAE slots: each diffusers autoencoder class with its family's latent normalisation.

The class is the checkpoint's own (``vae/config.json`` ``_class_name``, as diffusers'
``model_index.json`` names it), so a toy generator can put a plain ``AutoencoderKL`` in the
slot a Wan DiT normally fills with ``AutoencoderKLWan`` without any code change.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fusion.errors import CheckpointError


class WanVAE(nn.Module):
    """``AutoencoderKLWan``: one latent frame per image, ``(mode - latents_mean) / latents_std``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    @property
    def spatial_factor(self) -> int:
        c = self.vae.config
        return 2 ** (len(c.dim_mult) - 1) * (c.patch_size or 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(x[:, :, None]).latent_dist.mode()
        return ((z - self.mean.to(z)) / self.std.to(z))[:, :, 0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z[:, :, None] * self.std.to(z) + self.mean.to(z)).sample[:, :, 0]


class KLVAE(nn.Module):
    """``AutoencoderKL`` (2-D): ``(mode - shift_factor) * scaling_factor``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        return (self.vae.encode(x).latent_dist.mode() - (c.shift_factor or 0.0)) * c.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c = self.vae.config
        return self.vae.decode(z / c.scaling_factor + (c.shift_factor or 0.0)).sample


class DCVAE(nn.Module):
    """``AutoencoderDC`` (DC-AE): ``latent * scaling_factor``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    @property
    def spatial_factor(self) -> int:
        return self.vae.spatial_compression_ratio

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent * self.vae.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.vae.config.scaling_factor).sample


SLOTS = {"AutoencoderKLWan": WanVAE, "AutoencoderKL": KLVAE, "AutoencoderDC": DCVAE}


def load_vae(path: str, subfolder: str = "vae") -> nn.Module:
    """The VAE of a pipeline folder (or hub id) wrapped in its slot, float32."""
    import diffusers

    local = Path(path) / subfolder / "config.json"
    try:
        name = json.loads(local.read_text())["_class_name"] if local.is_file() else diffusers.AutoencoderKL.load_config(path, subfolder=subfolder)["_class_name"]
    except OSError as e:
        raise CheckpointError(f"generator.path: could not read {subfolder}/config.json from {path!r}: {str(e).splitlines()[0]}") from None
    if name not in SLOTS:
        raise CheckpointError(f"generator.path: VAE class {name} is not supported; supported: {', '.join(SLOTS)}")
    vae = getattr(diffusers, name).from_pretrained(path, subfolder=subfolder, torch_dtype=torch.float32)
    return SLOTS[name](vae)
