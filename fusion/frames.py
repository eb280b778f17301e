"""Which earlier image the next drawing starts from (``stage.frame_select``).

Every earlier image of a conversation can be a condition frame of the DiT. With several of
them the DiT has to find the one the request means ("in the first picture, ..."), and DiTs
pretrained on single-frame edits do not (toy world, tracking after other drawings: 0.100
exact with all frames, 0.400 when an oracle hands the DiT only the right one).

* ``all``: every earlier image is a condition frame (the DiT chooses);
* ``latest``: only the most recent one;
* ``learned``: :class:`FrameSelector`, a small head on the frozen MLLM's states (the layers
  the connector reads), scores each earlier image and *none* against the request; the DiT
  gets the one it picks, or no frame.

``learned`` trains in stage 2 without labels: for each sample with earlier images the DiT
itself says which single frame (or none) explains the target best, the lowest flow loss at
``t = stage.frame_select_t`` with the sample's noise and no gradient (:func:`best_frames`);
the head learns that choice by cross-entropy and the DiT's flow loss is computed with that
frame (teacher forcing). At generation (:class:`fusion.generate.Chat`) the head picks.
One frame at most: requests that need two images at once are not served by ``learned``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backbones.generator.base import DiTRow
from fusion.flow import add_noise, target_velocity

def image_spans(ids: torch.Tensor, start_id: int, end_id: int) -> list[tuple[int, int]]:
    """(first, last) token index of every complete image (vision start .. vision end) in ``ids``."""
    starts = (ids == start_id).nonzero().flatten().tolist()
    ends = (ids == end_id).nonzero().flatten().tolist()
    return [(s, e) for s, e in zip(starts, ends)]


class FrameSelector(nn.Module):
    """Scores [earlier image 0 .. N-1, none] for the drawing that follows a context.

    query: the context's last token and the request (the tokens after its last image) read by
    ``request_heads`` learned attention-pooling queries, through a small MLP; key of image i: the
    mean of its tokens plus embeddings of its index from the start and from the end of the
    conversation (requests say "the first", "the previous"); the key of *none* is learned.
    Logits are scaled dot products. ``request_heads=0`` is the first head of this toolkit (the
    request's mean, a linear query), kept so that models saved with it load. On the toy world's 223
    test turns with earlier images, trained alone on the same labels, it picked 4-5 wrong frames
    where the pooled head picks 0-2 (most of them adds of an earlier picture, drawn from nothing);
    in stage 2 the pooled head picks 1 wrong (docs/toyworld_log.md, "The frame head's gradients").
    """

    def __init__(self, mllm_dim: int, dim: int = 128, max_frames: int = 8, request_heads: int = 4):
        super().__init__()
        self.mllm_dim, self.dim, self.max_frames = int(mllm_dim), int(dim), int(max_frames)
        self.request_heads = int(request_heads)
        if self.request_heads < 0:
            raise ValueError(f"FrameSelector: request_heads must be >= 0, got {request_heads}")
        self.norm = nn.LayerNorm(mllm_dim)
        if self.request_heads:
            self.request_queries = nn.Parameter(torch.randn(self.request_heads, mllm_dim) / math.sqrt(mllm_dim))
            width = (self.request_heads + 1) * mllm_dim
            self.query = nn.Sequential(nn.Linear(width, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        else:
            self.query = nn.Linear(2 * mllm_dim, dim)
        self.key = nn.Linear(mllm_dim, dim)
        self.from_start = nn.Embedding(max_frames, dim)
        self.from_end = nn.Embedding(max_frames, dim)
        self.none = nn.Parameter(torch.zeros(dim))

    def config(self) -> dict:
        return {"mllm_dim": self.mllm_dim, "dim": self.dim, "max_frames": self.max_frames, "request_heads": self.request_heads}

    def zero_anchor(self) -> torch.Tensor:
        """0 x the logits of a one-image dummy context: every weight in the graph with a zero gradient, through the
        module's own forward (so ZeRO-3, which partitions the head's weights, gathers them for it)."""
        hidden = torch.zeros(1, 3, self.mllm_dim, device=self.none.device, dtype=self.none.dtype)
        return self(hidden, [(0, 1)]).sum() * 0.0

    def read_request(self, tokens: torch.Tensor) -> torch.Tensor:
        """The request's tokens [La, D] (normalised) as one vector: the attention-pooled reads, or their mean."""
        if not self.request_heads:
            return tokens.mean(0)
        weights = torch.softmax(self.request_queries @ tokens.T / math.sqrt(self.mllm_dim), dim=-1)  # [heads, La]
        return (weights @ tokens).reshape(-1)

    def forward(self, hidden: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
        """``hidden`` [n_layers, L, D] (the connector's layers) and the images' token spans: logits [N + 1], the last for none."""
        h = self.norm(hidden.to(self.none.dtype).mean(0))  # [L, D]
        after = h[spans[-1][1] + 1:] if spans else h
        request = self.read_request(after if len(after) else h[-1:])
        q = self.query(torch.cat([h[-1], request]))
        n, cap = len(spans), self.max_frames - 1
        keys = self.none[None]
        if spans:  # the index embeddings through their modules' own forward (ZeRO-3 gathers a module's weights there)
            idx = torch.arange(n, device=h.device)
            frames = self.key(torch.stack([h[s : e + 1].mean(0) for s, e in spans]))
            keys = torch.cat([frames + self.from_start(idx.clamp(max=cap)) + self.from_end((n - 1 - idx).clamp(max=cap)), keys])
        return keys @ q / math.sqrt(self.dim)


@torch.no_grad()
def best_frames(gen, probes: list[tuple], t: float, batch: bool = True) -> list[tuple[int, torch.Tensor]]:
    """For each probe ``(x [1, C, h, w], noise, cond [N, C, h, w], states [T, D], mask [T])``: which single condition
    frame (or none: index N) gives the DiT the lowest flow loss for target ``x`` at time ``t`` with ``noise``.
    Returns one (best index, losses [N + 1]) per probe; every candidate of every probe goes through
    :meth:`~backbones.generator.base.FlowGenerator.batched_velocity` together (two DiT passes: one frame, none)."""
    rows, spans = [], []
    for x, noise, cond, states, mask in probes:
        tt = torch.full((1,), float(t), device=x.device)
        x_t = add_noise(x, noise, tt)
        candidates = [cond[i : i + 1] for i in range(cond.shape[0])] + [None]
        spans.append((len(rows), len(candidates)))
        rows += [DiTRow(x_t[0], tt[0], c, states, mask) for c in candidates]
    if not rows:
        return []
    velocities, _ = gen.batched_velocity(rows, batch=batch)
    out = []
    for (x, noise, *_), (start, n) in zip(probes, spans):
        v_true = target_velocity(x, noise)[0].float()
        losses = torch.stack([nn.functional.mse_loss(v.float(), v_true) for v in velocities[start : start + n]])
        out.append((int(losses.argmin()), losses))
    return out
