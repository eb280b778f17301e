"""``connector=layer_mix``: a learned softmax-weighted mix of MLLM layers, then an MLP.

The "scalar mix" of ELMo (Peters et al. 2018) applied as an MLLM-to-DiT bridge: the
weights start uniform and learn which depths carry what the DiT needs.
"""

from __future__ import annotations

import torch
from torch import nn

from connectors.common import ConnectorOutput, OutputNorm, Refiner, mlp


class LayerMix(nn.Module):
    uses_queries = False

    def __init__(self, mllm_dim: int, text_dim: int, num_mllm_layers: int, dit_dim: int | None = None,
                 layers: list[int] | None = None, hidden_mult: float = 1.0, mlp_depth: int = 2,
                 out_norm: str = "rms", out_gain: float = 1.0, refiner_layers: int = 0, refiner_heads: int = 4,
                 refiner_width: int | None = None):
        super().__init__()
        self.layers = list(layers) if layers else list(range(1, num_mllm_layers + 1))
        self.logits = nn.Parameter(torch.zeros(len(self.layers)))
        self.proj = mlp(mllm_dim, max(1, int(hidden_mult * text_dim)), text_dim, mlp_depth)
        self.refiner = Refiner(text_dim, refiner_layers, refiner_heads, refiner_width)
        self.norm = OutputNorm(text_dim, out_norm, out_gain)

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> ConnectorOutput:
        """hidden [B, n_layers, L, D], mask [B, L]."""
        h = nn.functional.layer_norm(hidden, hidden.shape[-1:])
        mixed = torch.einsum("n,bnld->bld", self.weights.to(h.dtype), h)
        return ConnectorOutput(self.norm(self.refiner(self.proj(mixed), mask)), mask)
