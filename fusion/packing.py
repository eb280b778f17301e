"""Batching rendered conversations for one MLLM forward: packed rows or right-padded rows.

Stage 1 (and stage 2's MLLM pass when features are not cached) sends a micro-batch of
conversations of very different lengths (a text-only question is a few dozen tokens, a
step-by-step answer with three images several hundred). Two layouts, one loss:

* **packed** (``stage.batching=packed``, the default): samples are laid end to end in rows
  of at most ``capacity`` tokens (first-fit decreasing; by default the longest sample's
  length, so no row is longer than a padded one), so few slots are padding.
  Qwen2.5-VL gets ``position_ids`` of shape ``[4, R, L]``: row 0 is each sample's own
  text position (0, 1, 2 ... restarting at every sample), rows 1-3 its 3-D rope positions
  from the model's ``get_rope_index`` over that sample alone. With no 2-D attention mask,
  transformers' mask builder reads the restarts of row 0 as sample boundaries and gives a
  block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``): no token
  attends across samples (tested), and every sample sees exactly the positions it would
  see alone.
* **padded** (``stage.batching=padded``): one sample per row, right-padded to the longest,
  with a 2-D attention mask and the same per-sample 3-D positions.

The loss is the same in every layout: each sample's mean next-token loss over its
supervised tokens (what the model's own ``labels=`` loss gives for the sample alone), then
the mean over samples. Targets are shifted per sample before packing, so no sample is
trained to predict the first token of its neighbour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100


@dataclass
class TokenBatch:
    """Model inputs for several samples in ``R`` rows of ``L`` slots, and how to score them."""

    inputs: dict[str, Any]  # input_ids [R, L], position_ids [3|4, R, L], attention_mask [R, L] or None, pixels, grids
    targets: torch.Tensor  # [R, L] the next token each slot must predict (IGNORE where none)
    segments: torch.Tensor  # [R, L] index of the sample a slot belongs to (-1: padding)
    spans: list[tuple[int, int, int]]  # per sample, in input order: (row, start, length)
    layout: str

    @property
    def n_samples(self) -> int:
        return len(self.spans)

    @property
    def real_tokens(self) -> int:
        return int((self.segments >= 0).sum())

    @property
    def slots(self) -> int:
        return self.segments.numel()

    @property
    def pad_fraction(self) -> float:
        """Share of the slots the forward spends on padding."""
        return 1.0 - self.real_tokens / max(1, self.slots)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels [L] -> next-token targets [L]: slot ``p`` predicts ``labels[p + 1]``; the last slot nothing."""
    return torch.cat([labels[1:], labels.new_full((1,), IGNORE)])


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row holding at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"a sample of {lengths[i]} tokens does not fit a packed row of {capacity} (stage.pack_length)")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate(rendered: Sequence[Any], rope_positions: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], pad_id: int,
            layout: str = "packed", capacity: int | None = None) -> TokenBatch:
    """Lay rendered conversations (``RenderedConversation``) out as ``layout`` (packed or padded).

    ``rope_positions(ids [1, L], grids)`` gives one sample's 3-D positions [3, 1, L]; the
    adapter's :meth:`~backbones.mllm.base.MLLMAdapter.rope_positions`.
    """
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be packed or padded, got {layout!r}")
    lengths = [r.input_ids.shape[1] for r in rendered]
    if layout == "packed":
        rows = plan_rows(lengths, capacity or sum(lengths))
    else:
        rows = [[i] for i in range(len(rendered))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    n_rows = len(rows)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    targets = torch.full((n_rows, width), IGNORE, dtype=torch.long)
    segments = torch.full((n_rows, width), -1, dtype=torch.long)
    mm = torch.zeros((n_rows, width), dtype=torch.long)
    rope = torch.ones((3, n_rows, width), dtype=torch.long)
    text_pos = torch.zeros((n_rows, width), dtype=torch.long)
    spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(rendered)
    pixels, grids = [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            s, n = rendered[i], lengths[i]
            ids[r, at : at + n] = s.input_ids[0]
            targets[r, at : at + n] = shifted_targets(s.labels[0])
            segments[r, at : at + n] = i
            mm[r, at : at + n] = s.mm_token_type_ids[0]
            pos = getattr(s, "position_ids", None)  # kept with a sample rendered once (the trainer's render cache)
            rope[:, r, at : at + n] = (pos if pos is not None else rope_positions(s.input_ids, s.image_grid_thw))[:, 0].cpu()
            text_pos[r, at : at + n] = torch.arange(n)
            spans[i] = (r, at, n)
            if s.pixel_values is not None:
                pixels.append(s.pixel_values)
                grids.append(s.image_grid_thw)
            at += n
        if layout == "packed" and at < width:  # the tail is its own (ignored) segment: positions restart at 0
            text_pos[r, at:] = torch.arange(width - at)
    inputs: dict[str, Any] = {"input_ids": ids, "mm_token_type_ids": mm,
                              "pixel_values": torch.cat(pixels) if pixels else None,
                              "image_grid_thw": torch.cat(grids) if grids else None}
    if layout == "packed":
        inputs["position_ids"] = torch.cat([text_pos[None], rope])  # [4, R, L]: text positions mark the samples
        inputs["attention_mask"] = None
    else:
        inputs["position_ids"] = rope
        inputs["attention_mask"] = (segments >= 0).long()
    return TokenBatch(inputs, targets, segments, spans, layout)


def per_sample_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy over its supervised tokens: [n_samples]."""
    flat = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.targets.reshape(-1).to(logits.device),
                                             ignore_index=IGNORE, reduction="none")
    seg = batch.segments.reshape(-1).to(logits.device)
    valid = (batch.targets.reshape(-1).to(logits.device) != IGNORE) & (seg >= 0)
    idx = seg.clamp(min=0)
    total = torch.zeros(batch.n_samples, device=logits.device).index_add(0, idx, flat * valid)
    count = torch.zeros(batch.n_samples, device=logits.device).index_add(0, idx, valid.float())
    return total / count.clamp(min=1)
