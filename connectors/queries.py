"""``connector=queries``: N learnable query embeddings appended after ``<|bov|>`` in the MLLM
input; their output states pass a small bidirectional transformer encoder, then go to
``text_dim``.

MetaQuery (Pan et al. 2025, "Transfer between Modalities with MetaQueries") and BLIP3-o
(Chen et al. 2025). The MLLM stays frozen: gradients flow through it into the query
embeddings only. The fused model runs the MLLM over ``context + queries`` (queries take
the text rope positions right after the context) and hands this module the query
positions' hidden states.
"""

from __future__ import annotations

import torch
from torch import nn

from connectors.common import ConnectorOutput, OutputNorm, Refiner, encoder


class Queries(nn.Module):
    uses_queries = True

    def __init__(self, mllm_dim: int, text_dim: int, num_mllm_layers: int, dit_dim: int | None = None,
                 num_queries: int = 64, encoder_layers: int = 2, encoder_heads: int = 4, layers: list[int] | None = None,
                 out_norm: str = "rms", out_gain: float = 1.0, init_std: float = 0.02, refiner_layers: int = 0, refiner_heads: int = 4,
                 refiner_width: int | None = None):
        super().__init__()
        if num_queries <= 0:
            raise ValueError(f"connector.num_queries must be positive, got {num_queries}")
        self.layers = list(layers) if layers else [-1]
        self.queries = nn.Parameter(torch.randn(num_queries, mllm_dim) * init_std)
        self.encoder = encoder(mllm_dim, encoder_layers, encoder_heads)
        self.proj = nn.Linear(mllm_dim, text_dim)
        self.refiner = Refiner(text_dim, refiner_layers, refiner_heads, refiner_width)
        self.norm = OutputNorm(text_dim, out_norm, out_gain)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def query_embeds(self) -> torch.Tensor:
        """The embeddings appended after ``<|bov|>``: [N, D]."""
        return self.queries

    def forward(self, query_hidden: torch.Tensor, mask: torch.Tensor | None = None) -> ConnectorOutput:
        """query_hidden [B, n_layers, N, D]: the MLLM's states at the query positions."""
        h = self.encoder(query_hidden[:, -1])
        ones = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        return ConnectorOutput(self.norm(self.refiner(self.proj(h), ones)), ones)
