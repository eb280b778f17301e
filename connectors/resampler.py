"""``connector=resampler``: a fixed number of learnable queries cross-attend to the MLLM's
context states (Perceiver resampler / Q-Former style) and become the DiT's text states.

Flamingo's Perceiver resampler (Alayrac et al. 2022, "Flamingo: a Visual Language Model
for Few-Shot Learning") and BLIP-2's Q-Former (Li et al. 2023, "BLIP-2: Bootstrapping
Language-Image Pre-training with Frozen Image Encoders and Large Language Models").

Unlike ``queries``/``multiscale_queries``, the queries never enter the MLLM: it runs over
the context alone (frozen, no gradient, packable, cacheable) and this module reads its
hidden states of the chosen ``layers`` (each LayerNorm-ed, concatenated along channels and
projected to ``width``). ``depth`` pre-norm residual blocks follow, each = cross-attention
(queries -> context tokens, masked positions ignored) + self-attention among the queries +
MLP; then a final LayerNorm, a projection to ``text_dim`` and the output norm. The output
is always ``num_queries`` tokens with an all-ones mask, whatever the context length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from connectors.common import ConnectorOutput, OutputNorm, Refiner
from fusion.config import ConnectorBase
from fusion.errors import ConfigError


@dataclass
class ResamplerConfig(ConnectorBase):
    """resampler: learnable queries cross-attending to the context states (Perceiver resampler / Q-Former)."""

    _target_: str = "connectors.resampler.Resampler"
    out_norm: str = "rms_gated"
    """Output norm: rms_gated by default (see conf/connector/resampler.yaml), rms or none."""
    num_queries: int = 32
    """Learnable queries = text tokens handed to the DiT (BLIP-2: 32, Flamingo: 64)."""
    layers: list[int] | None = None
    """MLLM layers the queries read (0 = embeddings, -1 = last; None: the last). Several are
    LayerNorm-ed one by one, concatenated along channels and projected to width."""
    width: int | None = None
    """Working width of the queries and the attention blocks (None: the MLLM width)."""
    depth: int = 2
    """Blocks of cross-attention + self-attention + MLP."""
    heads: int = 4
    """Attention heads (must divide width)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of width."""
    init_std: float = 0.02
    """Standard deviation of the queries' initialisation."""
    positions: str = "none"
    """none: the queries read the context by content alone (cross-attention is blind to order); window: each
    context token also carries its index counted from the first and from the last token of the connector's
    window (sinusoids through a zero-initialised projection), so a query can read "the i-th word of the
    request", which an ordered target (``stage.distill_target=states``) asks of it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_queries <= 0:
            raise ConfigError(f"connector.num_queries must be positive, got {self.num_queries}")
        if self.layers is not None and len(self.layers) == 0:
            raise ConfigError("connector.layers must name at least one MLLM layer (or be null for the last)")
        if self.depth <= 0:
            raise ConfigError(f"connector.depth must be positive, got {self.depth}")
        if self.heads <= 0:
            raise ConfigError(f"connector.heads must be positive, got {self.heads}")
        if self.width is not None and self.width <= 0:
            raise ConfigError(f"connector.width must be positive (or null for the MLLM width), got {self.width}")
        if self.width is not None and self.width % self.heads:
            raise ConfigError(f"connector.heads={self.heads} must divide connector.width={self.width}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"connector.mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.init_std < 0:
            raise ConfigError(f"connector.init_std must be >= 0, got {self.init_std}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"connector.positions must be {' or '.join(POSITIONS)}, got {self.positions!r}")


POSITIONS = ("none", "window")
POSITION_FREQS = 16  # sin/cos pairs per count (from the window's start, from its end): periods of ~6 to ~4000 tokens


def window_positions(mask: torch.Tensor, freqs: int = POSITION_FREQS) -> torch.Tensor:
    """Sinusoidal features [B, L, 4 * freqs] of each token's index among the kept tokens of ``mask`` [B, L],
    counted from the first kept token and from the last (0 there); tokens not kept get the features of
    their neighbours' counts (the caller zeroes them)."""
    keep = mask.to(torch.bool)
    seen = keep.long().cumsum(1)
    counts = torch.stack([seen - 1, seen[:, -1:] - seen], dim=-1).clamp(min=0).float()  # [B, L, 2]
    div = torch.exp(-math.log(1000.0) * torch.arange(freqs, device=mask.device, dtype=torch.float) / freqs)
    angles = counts[..., None] * div  # [B, L, 2, freqs]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)


class ResamplerBlock(nn.Module):
    """Pre-norm residual: cross-attention to the context, self-attention among the queries, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = max(1, int(round(mlp_ratio * width)))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ignore: torch.Tensor, any_kept: torch.Tensor) -> torch.Tensor:
        """x [B, N, W] queries, ctx [B, L, W], ignore [B, L] (True = masked out), any_kept [B]."""
        kv = self.norm_ctx(ctx)
        a = self.cross(self.norm_q(x), kv, kv, key_padding_mask=ignore, need_weights=False)[0]
        x = x + a * any_kept[:, None, None].to(a.dtype)  # a context with no kept token contributes nothing
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class Resampler(nn.Module):
    uses_queries = False

    def __init__(self, mllm_dim: int, text_dim: int, num_mllm_layers: int, dit_dim: int | None = None,
                 num_queries: int = 32, layers: list[int] | None = None, width: int | None = None, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 4.0, init_std: float = 0.02, positions: str = "none",
                 out_norm: str = "rms_gated", out_gain: float = 1.0, refiner_layers: int = 0, refiner_heads: int = 4,
                 refiner_width: int | None = None):
        super().__init__()
        if num_queries <= 0:
            raise ValueError(f"connector.num_queries must be positive, got {num_queries}")
        if depth <= 0:
            raise ValueError(f"connector.depth must be positive, got {depth}")
        width = int(width) if width else mllm_dim
        if heads <= 0 or width % heads:
            raise ValueError(f"connector.heads={heads} must divide the working width {width} "
                             f"(connector.width, null: the MLLM width {mllm_dim})")
        if positions not in POSITIONS:
            raise ValueError(f"connector.positions must be {' or '.join(POSITIONS)}, got {positions!r}")
        self.layers = list(layers) if layers else [-1]
        n = len(self.layers)
        self.layer_norms = nn.ModuleList(nn.LayerNorm(mllm_dim) for _ in range(n))  # one per MLLM layer
        self.ctx_proj: nn.Module = nn.Identity() if n == 1 and width == mllm_dim else nn.Linear(n * mllm_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * init_std)
        self.blocks = nn.ModuleList(ResamplerBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, text_dim)
        self.refiner = Refiner(text_dim, refiner_layers, refiner_heads, refiner_width)
        self.norm = OutputNorm(text_dim, out_norm, out_gain)
        # zero-initialised, and made last so every other weight draws the numbers it draws without it:
        # training starts from the content-only resampler
        self.pos_proj: nn.Linear | None = None
        if positions == "window":
            self.pos_proj = nn.Linear(4 * POSITION_FREQS, width)
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> ConnectorOutput:
        """hidden [B, n_layers, L, D] (the layers in ``self.layers``' order), mask [B, L] (1 = keep)
        -> states [B, num_queries, text_dim], mask [B, num_queries] (all ones)."""
        b, n, length, _ = hidden.shape
        if n != len(self.layers):
            raise ValueError(f"resampler expects {len(self.layers)} MLLM layers (connector.layers), got {n}")
        h = hidden.to(self.queries.dtype)
        ctx = torch.cat([norm(h[:, i]) for i, norm in enumerate(self.layer_norms)], dim=-1)  # [B, L, n*D]
        ctx = self.ctx_proj(ctx)
        if self.pos_proj is not None:
            ctx = ctx + self.pos_proj(window_positions(mask).to(ctx.dtype))
        keep = mask.to(torch.bool)
        ctx = torch.where(keep[..., None], ctx, torch.zeros((), dtype=ctx.dtype, device=ctx.device))
        any_kept = keep.any(dim=1)
        # a row with no kept token would make every attention weight NaN: let it see its (zeroed)
        # tokens and drop the cross-attention's output for it instead
        ignore = ~keep & any_kept[:, None]
        x = self.queries[None].expand(b, -1, -1)
        for block in self.blocks:
            x = block(x, ctx, ignore, any_kept)
        ones = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        return ConnectorOutput(self.norm(self.refiner(self.proj(self.final_norm(x)), ones)), ones)
