"""Pieces the connector designs share: the output norm, an MLP, 2-D position encodings.

Every connector maps MLLM hidden states (layers x tokens x width, with a mask) to DiT text
states (tokens x ``text_dim``, with a mask). Constructors take the widths from the two
backbones (``mllm_dim``, ``text_dim``, ``dit_dim``, ``num_mllm_layers``), never from a
config written by hand; the design's own knobs come from ``conf/connector/<name>.yaml``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class ConnectorOutput(NamedTuple):
    states: torch.Tensor  # [B, T, text_dim]
    mask: torch.Tensor  # [B, T], 1 = keep


OUT_NORMS = ("rms", "rms_gated", "none")


class OutputNorm(nn.Module):
    """The connector's last step: ``kind='rms'``, ``'rms_gated'`` or ``'none'``.

    * ``rms``: RMSNorm with its gain initialised to ``gain``. DiTs were trained on
      text-encoder states of a particular scale (T5/UMT5 and Gemma outputs are roughly
      unit-RMS per token); the gain sets where training starts from. Every token is forced
      to the same RMS, so none can say "nothing".
    * ``rms_gated``: the same RMSNorm times a per-token gate ``sigmoid(Linear(x))`` computed
      from the token before the norm, so a token can fade to ~0: the zero padding published
      DiTs saw at unused text positions (Wan pads its 512 text slots with zeros and has no
      text mask). The gate's weight starts at 0 and its bias at ``gate_bias`` (default +2:
      every gate starts at sigmoid(2) = 0.88, open-ish, and learns which tokens to close).
    * ``none``: nothing.
    """

    def __init__(self, dim: int, kind: str = "rms", gain: float = 1.0, eps: float = 1e-6, gate_bias: float = 2.0):
        super().__init__()
        if kind not in OUT_NORMS:
            raise ValueError(f"connector.out_norm must be one of {', '.join(OUT_NORMS)}, got {kind!r}")
        self.kind = kind
        self.norm = nn.RMSNorm(dim, eps=eps) if kind != "none" else nn.Identity()
        if kind != "none":
            nn.init.constant_(self.norm.weight, gain)
        if kind == "rms_gated":
            self.gate = nn.Linear(dim, 1)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rms_gated":
            return self.norm(x) * torch.sigmoid(self.gate(x))
        return self.norm(x)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """Linear (-> GELU -> Linear) x (depth - 1)."""
    if depth < 1:
        raise ValueError(f"connector.mlp_depth must be >= 1, got {depth}")
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(d, hidden_dim), nn.GELU(approximate="tanh")]
        d = hidden_dim
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position encodings of a ``grid x grid`` lattice: [grid*grid, dim]."""
    if dim % 4:
        raise ValueError(f"2-D position encodings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    out = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        ang = pos[:, None] * omega[None]
        out += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(out, dim=1).float() / math.sqrt(2)


def encoder(dim: int, layers: int, heads: int) -> nn.TransformerEncoder:
    """A small bidirectional (unmasked) pre-norm transformer encoder."""
    if dim % heads:
        raise ValueError(f"connector.encoder_heads={heads} must divide the MLLM width {dim}")
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def sincos_1d(length: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 1-D sine-cosine position encodings of ``length`` tokens: [length, dim]."""
    half = dim // 2
    omega = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64, device=device) / max(1, half)))
    ang = torch.arange(length, dtype=torch.float64, device=device)[:, None] * omega[None]
    out = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    return torch.nn.functional.pad(out, (0, dim - 2 * half)).float()


class Refiner(nn.Module):
    """``connector.refiner_layers``: a small bidirectional transformer over a connector's projected
    output tokens (the context refiner of Lumina-Image 2.0 / OmniGen2, here on the MLLM side).

    A causal MLLM's state at a word has not read the words after it, while the DiT's own text
    encoder (T5 / UMT5 / Gemma read bidirectionally by the DiT) gives every token its whole
    sentence: "circle" in "a red circle at the top left" carries its place. The refiner lets each
    token read the others (1-D sine-cosine positions added to its input, masked keys ignored).
    Residual throughout, so with its output layers near zero it starts close to the identity.
    ``layers=0``: no refiner (the module is the identity). ``width`` (``connector.refiner_width``;
    None: the text width): the refiner's own width, wider or narrower (a 4096-wide DiT text width
    makes each full-width layer ~200 M parameters); the tokens are lifted into it by a linear map
    and its output, normed, is added back through a projection that starts near zero.
    """

    def __init__(self, dim: int, layers: int = 0, heads: int = 4, width: int | None = None):
        super().__init__()
        if layers < 0:
            raise ValueError(f"connector.refiner_layers must be >= 0, got {layers}")
        width = width or dim
        if width < 1:
            raise ValueError(f"connector.refiner_width must be positive, got {width}")
        if layers and width % heads:
            raise ValueError(f"connector.refiner_heads={heads} must divide the refiner's width {width} "
                             f"(connector.refiner_width, else the generator's text width)")
        self.layers = layers
        self.encoder = encoder(width, layers, heads) if layers else None
        self.lift = self.drop = None
        if layers and width != dim:  # tokens lifted into the refiner's width, its stream normed at the end, added back
            self.encoder.norm = nn.LayerNorm(width)  # through a projection that starts near zero (the identity plus a little)
            self.lift = nn.Linear(dim, width)
            self.drop = nn.Linear(width, dim)
            nn.init.normal_(self.drop.weight, std=1e-3)
            nn.init.zeros_(self.drop.bias)
        if layers:
            for blk in self.encoder.layers:  # residual branches start small: the identity plus a little
                nn.init.normal_(blk.self_attn.out_proj.weight, std=1e-3)
                nn.init.zeros_(blk.self_attn.out_proj.bias)
                nn.init.normal_(blk.linear2.weight, std=1e-3)
                nn.init.zeros_(blk.linear2.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], mask [B, L] (1 = a real token)."""
        if self.encoder is None:
            return x
        if self.lift is not None:
            h = self.lift(x)
            pos = sincos_1d(h.shape[1], h.shape[2], h.device).to(h.dtype)
            return x + self.drop(self.encoder(h + pos[None], src_key_padding_mask=~mask.bool()))
        pos = sincos_1d(x.shape[1], x.shape[2], x.device).to(x.dtype)
        h = self.encoder(x + pos[None], src_key_padding_mask=~mask.bool())
        return h - pos[None]
