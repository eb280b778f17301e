"""``connector=multilayer_concat``: every (or a chosen list of) MLLM layer, each normalised
per token, concatenated along channels and projected to ``text_dim``.

DuoGen / Cosmos-Predict2.5 style (NVIDIA 2025, Cosmos-Predict2.5 reads all 28 Qwen2.5-VL-7B
layers, 28 x 3584 = 100352 channels, into its ``crossattn_proj``). With
``projection: identity`` the concatenation goes straight to a DiT whose text width is
that sum (the DiT's own projection does the rest). ``window`` > 1 (linear projection only):
the projection is a 1-D convolution over the sequence, so each token's output reads its
``window - 1`` neighbours too (the colour word before a shape word, the place words after it)
before the refiner; padded tokens are zeroed first, so they are never read.
"""

from __future__ import annotations

import torch
from torch import nn

from connectors.common import ConnectorOutput, OutputNorm, Refiner, mlp


class MultilayerConcat(nn.Module):
    uses_queries = False

    def __init__(self, mllm_dim: int, text_dim: int, num_mllm_layers: int, dit_dim: int | None = None,
                 layers: list[int] | None = None, projection: str = "linear", hidden_mult: float = 1.0,
                 out_norm: str = "rms", out_gain: float = 1.0, refiner_layers: int = 0, refiner_heads: int = 4,
                 refiner_width: int | None = None, window: int = 1):
        super().__init__()
        self.layers = list(layers) if layers else list(range(1, num_mllm_layers + 1))
        width = mllm_dim * len(self.layers)
        if projection == "identity":
            if width != text_dim:
                raise ValueError(f"connector.projection=identity needs text_dim == {len(self.layers)} layers x {mllm_dim} = {width}, "
                                 f"but the generator's text_dim is {text_dim} (set generator.text_dim={width} or use a projection)")
            self.proj: nn.Module = nn.Identity()
        elif projection == "linear" and window > 1:
            if window % 2 == 0:
                raise ValueError(f"connector.window must be odd (the token in the middle), got {window}")
            self.proj = nn.Conv1d(width, text_dim, window, padding=window // 2)
        elif projection == "linear":
            self.proj = nn.Linear(width, text_dim)
        elif projection == "mlp":
            self.proj = mlp(width, max(1, int(hidden_mult * text_dim)), text_dim, 2)
        else:
            raise ValueError(f"connector.projection must be identity, linear or mlp, got {projection!r}")
        if window > 1 and projection != "linear":
            raise ValueError(f"connector.window={window} needs projection=linear, got {projection!r}")
        self.window = window
        if projection == "identity" and refiner_layers:
            raise ValueError("connector.refiner_layers needs a projection (linear or mlp): with projection=identity the tokens "
                             "go to the DiT's own projection as they are")
        self.refiner = Refiner(text_dim, refiner_layers, refiner_heads, refiner_width)
        self.norm = OutputNorm(text_dim, out_norm, out_gain) if projection != "identity" else nn.Identity()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> ConnectorOutput:
        """hidden [B, n_layers, L, D], mask [B, L]."""
        h = nn.functional.layer_norm(hidden.float(), hidden.shape[-1:]).to(hidden.dtype)  # per layer, per token
        b, n, length, d = h.shape
        h = h.permute(0, 2, 1, 3).reshape(b, length, n * d)
        if self.window > 1:  # a convolution over the sequence; padded tokens zeroed so that no token reads them
            h = self.proj((h * mask[..., None].to(h.dtype)).transpose(1, 2)).transpose(1, 2)
        else:
            h = self.proj(h)
        return ConnectorOutput(self.norm(self.refiner(h, mask)), mask)
