"""``connector=multiscale_queries``: query groups for several grids (default 4x4, 8x8, 16x16),
each wrapped in its own learnable start/end markers, with fixed 2-D grid position encodings,
plus the multi-scale representation alignment loss.

Ming-Lite-Uni (inclusionAI 2025, "Ming-Lite-Uni: Advancements in Unified Architecture for
Natural Multimodal Interaction"). The alignment loss: the hidden states of a configured
intermediate DiT block on the target's token grid, average-pooled to each scale's grid
and projected to the MLLM width, regress (MSE) onto the MLLM's final states at that
scale's query positions (stop-gradient on that target, as in REPA), weight from config.
"""

from __future__ import annotations

import torch
from torch import nn

from connectors.common import ConnectorOutput, OutputNorm, Refiner, encoder, sincos_2d


class MultiscaleQueries(nn.Module):
    uses_queries = True

    def __init__(self, mllm_dim: int, text_dim: int, num_mllm_layers: int, dit_dim: int | None = None,
                 scales: list[int] = (4, 8, 16), encoder_layers: int = 2, encoder_heads: int = 4,
                 layers: list[int] | None = None, align_layer: int = 1, align_weight: float = 0.5,
                 out_norm: str = "rms", out_gain: float = 1.0, init_std: float = 0.02, refiner_layers: int = 0, refiner_heads: int = 4,
                 refiner_width: int | None = None):
        super().__init__()
        self.scales = [int(s) for s in scales]
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"connector.scales must be positive grid sides, got {list(scales)}")
        self.layers = list(layers) if layers else [-1]
        self.queries = nn.ParameterList([nn.Parameter(torch.randn(s * s, mllm_dim) * init_std) for s in self.scales])
        self.markers = nn.Parameter(torch.randn(len(self.scales), 2, mllm_dim) * init_std)  # start, end per scale
        for i, s in enumerate(self.scales):
            self.register_buffer(f"pos_{i}", sincos_2d(s, mllm_dim) * init_std, persistent=False)
        self.encoder = encoder(mllm_dim, encoder_layers, encoder_heads)
        self.proj = nn.Linear(mllm_dim, text_dim)
        self.refiner = Refiner(text_dim, refiner_layers, refiner_heads, refiner_width)
        self.norm = OutputNorm(text_dim, out_norm, out_gain)
        self.align_layer = align_layer
        self.align_weight = align_weight
        if align_weight > 0:
            if dit_dim is None:
                raise ValueError("connector.align_weight > 0 needs the generator's hidden width (dit_dim)")
            self.align_proj = nn.Sequential(nn.Linear(dit_dim, mllm_dim), nn.GELU(approximate="tanh"), nn.Linear(mllm_dim, mllm_dim))

    @property
    def num_queries(self) -> int:
        return sum(s * s + 2 for s in self.scales)

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each scale's grid queries inside the query sequence (markers excluded)."""
        out, i = [], 0
        for s in self.scales:
            out.append((i + 1, i + 1 + s * s))
            i += s * s + 2
        return out

    def query_embeds(self) -> torch.Tensor:
        """[start_1, grid_1 + pos, end_1, start_2, ...]: [N, D]."""
        parts = []
        for i, q in enumerate(self.queries):
            parts += [self.markers[i, :1], q + getattr(self, f"pos_{i}").to(q.dtype), self.markers[i, 1:]]
        return torch.cat(parts, dim=0)

    def forward(self, query_hidden: torch.Tensor, mask: torch.Tensor | None = None) -> ConnectorOutput:
        """query_hidden [B, n_layers, N, D]: the MLLM's states at the query positions."""
        h = self.encoder(query_hidden[:, -1])
        ones = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        return ConnectorOutput(self.norm(self.refiner(self.proj(h), ones)), ones)

    def alignment_loss(self, dit_grid: torch.Tensor, query_hidden: torch.Tensor) -> torch.Tensor:
        """dit_grid [B, gh, gw, C_dit] (target tokens of block ``align_layer``); query_hidden as in forward."""
        semantic = query_hidden[:, -1].detach().float()
        x = dit_grid.permute(0, 3, 1, 2).float()
        losses = []
        for s, (a, b) in zip(self.scales, self.spans()):
            pooled = nn.functional.adaptive_avg_pool2d(x, (s, s)).flatten(2).transpose(1, 2)  # [B, s*s, C_dit]
            losses.append(nn.functional.mse_loss(self.align_proj(pooled), semantic[:, a:b]))
        return torch.stack(losses).mean()
