"""The toolkit's one flow-matching convention and its timestep samplers.

Rectified flow: ``x_t = (1 - t) * x0 + t * eps``, target velocity ``v = eps - x0``,
``t`` in [0, 1] (t = 1 is pure noise). Every generator adapter maps ``t`` onto its own
family's timestep scale, so nothing outside ``backbones/generator`` knows the family.
The diffusers flow schedulers (``FlowMatchEulerDiscreteScheduler``, ``UniPCMultistepScheduler``
with ``use_flow_sigmas``) use the same convention: their ``sigmas`` are our ``t``.
"""

from __future__ import annotations

import math

import torch


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` with ``t`` broadcast from [B] over the other dims."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def target_velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3/Wan time shift: ``s t / (1 + (s - 1) t)`` (more steps at high noise for s > 1)."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(
    batch: int,
    mode: str = "logit_normal",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Training timesteps in (0, 1): ``uniform``, ``logit_normal`` (SD3) or ``shifted`` (uniform then shift)."""
    if mode == "uniform":
        t = torch.rand(batch, generator=generator)
    elif mode == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator) * std + mean)
    elif mode == "shifted":
        t = shift_t(torch.rand(batch, generator=generator), shift)
    else:
        raise ValueError(f"timestep sampling must be uniform, logit_normal or shifted, got {mode!r}")
    return t.clamp(eps, 1 - eps).to(device)


def logit_normal_density(t: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution (for tests and weighting)."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * t * (1 - t))
