"""``stage.distill_target=aligned``: the teacher's states placed on the MLLM tokens that say the same words.

The generator's own text encoder (the distillation teacher) reads the request, e.g.
``"Draw a red circle at the top left. Here it is."``; the MLLM reads the whole conversation, in
which the same words appear as the tail of its context (the user turn, then the assistant's
words before ``<|bov|>``). A per-token connector emits one state per context token, so the
natural target is token-aligned: each teacher token's state on the context token that ends the
same word, zeros on every other context token (the zero padding the DiT saw beside its real
text tokens: Wan pads with zeros and has no text mask). Wan, Cosmos and SANA apply no position
signal to their text, so this layout is exactly the teacher's up to order and padding count.

The alignment is by characters, never by ids, so it holds across tokenizers (Qwen's byte-level
BPE against UMT5's sentencepiece or a toy word-level one): every context token is decoded, and
the teacher's tokens (their character spans in the request, from the teacher tokenizer's offset
mapping) are found right to left in the context text, case-insensitively, each strictly before
the previous one and never before ``start`` (the end of the previous image: the request is the
text since then). A teacher token with no text of its own (``</s>``) goes to the context's last
token (``<|bov|>``), the one that has read the whole request. Teacher tokens that land on the
same context token are averaged; one that is not found is left out (counted in ``missed``).
The causal MLLM has not read the words after a token yet, while the teacher is bidirectional:
``connector.refiner_layers`` gives the connector the bidirectional block that closes that gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Alignment:
    positions: list[int]  # per teacher real token: the context position it lands on (-1: not found)
    missed: int  # teacher tokens with text that were not found in the context


def per_token(connector) -> bool:
    """Whether a connector emits one state per context token (what ``distill_target=aligned`` needs)."""
    return not getattr(connector, "uses_queries", False) and getattr(connector, "num_queries", None) is None


def context_pieces(tokenizer, ids: torch.Tensor | list[int]) -> list[str]:
    """Each context token decoded on its own (special tokens as their own text)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def align_request(pieces: list[str], request: str, teacher_tokenizer, start: int = 0, max_length: int | None = None) -> Alignment:
    """Where each of the teacher's real tokens for ``request`` lands among the context ``pieces``.

    ``start``: the first context position the request may occupy (after the previous image);
    ``max_length``: the teacher's padded length (its tokens beyond it are truncated, as in its states)."""
    enc = teacher_tokenizer(request, return_offsets_mapping=True, add_special_tokens=True, truncation=True,
                            max_length=max_length or getattr(teacher_tokenizer, "model_max_length", None) or 512)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    specials = set(getattr(teacher_tokenizer, "all_special_ids", []))
    pad = getattr(teacher_tokenizer, "pad_token_id", None)
    bounds = [0]
    for p in pieces:
        bounds.append(bounds[-1] + len(p))
    text = "".join(pieces).lower()
    owner = [0] * len(text)  # context token of each character
    for k in range(len(pieces)):
        owner[bounds[k]:bounds[k + 1]] = [k] * (bounds[k + 1] - bounds[k])
    floor = bounds[min(start, len(pieces))]
    cursor, last = len(text), len(pieces) - 1
    positions = [-1] * len(ids)
    missed = 0
    for j in range(len(ids) - 1, -1, -1):
        a, b = offsets[j]
        word = request[a:b].strip().lower()
        if ids[j] == pad:
            continue
        if not word:
            if ids[j] in specials or a == b:
                positions[j] = last
            continue
        at = text.rfind(word, floor, cursor)
        if at < 0:
            missed += 1
            continue
        positions[j] = owner[at + len(word) - 1]
        cursor = at
    return Alignment(positions, missed)


def aligned_target(t_states: torch.Tensor, positions: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target [length, D], real [length] bool): teacher states on their positions (averaged where
    several land on one), zeros elsewhere. ``t_states``: the teacher's real tokens [K, D], in order."""
    d = t_states.shape[-1]
    target = t_states.new_zeros(length, d)
    count = t_states.new_zeros(length)
    for j, p in enumerate(positions[: len(t_states)]):
        if 0 <= p < length:
            target[p] += t_states[j]
            count[p] += 1
    real = count > 0
    target[real] /= count[real, None]
    return target, real


def aligned_distill_loss(states: torch.Tensor, target: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the aligned tokens plus that on the rest (onto zero), each a mean over its
    own tokens, so a long context of template tokens does not drown the few that carry the request."""
    s = states.float()
    parts = []
    if real.any():
        parts.append(nn.functional.mse_loss(s[real], target[real].float()))
    if (~real).any():
        parts.append(s[~real].pow(2).mean())
    return torch.stack(parts).mean() if parts else s.sum() * 0.0
