"""``connector=last_mlp``: last-layer hidden states -> MLP -> ``text_dim``.

The simplest bridge: the output head of MetaQuery / BLIP3o-NEXT style models, applied to
every context token (Pan et al. 2025, "Transfer between Modalities with MetaQueries";
Chen et al. 2025, "BLIP3-o").
"""

from __future__ import annotations

import torch
from torch import nn

from connectors.common import ConnectorOutput, OutputNorm, Refiner, mlp


class LastMLP(nn.Module):
    uses_queries = False

    def __init__(self, mllm_dim: int, text_dim: int, num_mllm_layers: int, dit_dim: int | None = None,
                 hidden_mult: float = 1.0, mlp_depth: int = 2, out_norm: str = "rms", out_gain: float = 1.0,
                 refiner_layers: int = 0, refiner_heads: int = 4,
                 refiner_width: int | None = None):
        super().__init__()
        self.layers = [-1]
        hidden = max(1, int(round(hidden_mult * text_dim)))
        self.proj = mlp(mllm_dim, hidden, text_dim, mlp_depth)
        self.refiner = Refiner(text_dim, refiner_layers, refiner_heads, refiner_width)
        self.norm = OutputNorm(text_dim, out_norm, out_gain)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> ConnectorOutput:
        """hidden [B, 1, L, D] (the last layer), mask [B, L]."""
        return ConnectorOutput(self.norm(self.refiner(self.proj(hidden[:, -1]), mask)), mask)
