"""The interface every MLLM adapter implements: everything ``fusion/`` (the fused model, packing, the
feature cache, generation, the planner, the validator) calls on an MLLM, and nothing else.

An adapter is an ``nn.Module`` subclass of :class:`MLLMAdapter` built by a ``from_pretrained`` class
method named by its config's ``_target_`` (``conf/mllm/*.yaml``). ``fusion/`` imports this module only;
family-specific details (chat template, processor, rope positions, vision tokens) stay in the adapter's
own file (``qwen2_5_vl.py``).

Layer indices (``hidden_layers``) follow transformers' ``output_hidden_states``: 0 is the embedding
output, ``i`` the output of decoder layer ``i``; the last entry is after the final norm; negative
indices count from the end (-1 = last).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from fusion.data import Conversation

BOV_TOKEN = "<|bov|>"
"""Begin-of-vision: the token after which the generator draws; every adapter adds it once."""


@dataclass
class RenderedConversation:
    """One conversation as model inputs (batch dimension 1)."""

    input_ids: torch.Tensor  # [1, L]
    labels: torch.Tensor  # [1, L], -100 where not supervised
    attention_mask: torch.Tensor  # [1, L]
    mm_token_type_ids: torch.Tensor  # [1, L], 1 on image tokens
    pixel_values: torch.Tensor | None  # [sum(patches), C*T*P*P]
    image_grid_thw: torch.Tensor | None  # [n_images, 3]
    image_roles: list[str] = field(default_factory=list)  # role of each image, in order
    text: str = ""
    position_ids: torch.Tensor | None = None  # [3, 1, L] its rope positions when computed once and kept (else the collate computes them)

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def nbytes(self) -> int:
        """Memory its tensors hold."""
        ts = (self.input_ids, self.labels, self.attention_mask, self.mm_token_type_ids, self.pixel_values, self.image_grid_thw)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def model_inputs(self) -> dict[str, Any]:
        return dict(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            mm_token_type_ids=self.mm_token_type_ids,
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
        )


@dataclass
class DecodeState:
    """A conversation being decoded: ids in the KV cache, next rope position, kept hidden states."""

    ids: list[int] = field(default_factory=list)
    cache: Any = None
    next_position: int = 0
    hidden_chunks: list[torch.Tensor] = field(default_factory=list)  # each [n_layers, chunk_len, D]
    last_logits: torch.Tensor | None = None  # [vocab] logits after the last token
    image_grids: list[torch.Tensor] = field(default_factory=list)
    pixel_chunks: list[torch.Tensor] = field(default_factory=list)  # kept for the recompute baselines
    tokens_forwarded: int = 0  # every token run through the language model, for the 1.00 check
    recompute: str = "never"  # baselines: "images" re-encodes the full context at each image, "always" at every span

    @property
    def length(self) -> int:
        return len(self.ids)

    def hidden_states(self) -> torch.Tensor:
        """Selected-layer hidden states of every token in the cache: [n_layers, L, D]."""
        return torch.cat(self.hidden_chunks, dim=1)


def resolve_layers(layers: Sequence[int], num_layers: int, key: str) -> list[int]:
    """Layer indices (negative from the end) as indices into ``output_hidden_states``; ``key`` names the setting."""
    resolved = []
    for i in layers:
        j = i + num_layers + 1 if i < 0 else i
        if not 0 <= j <= num_layers:
            raise ValueError(f"{key}: layer {i} is out of range for an MLLM with {num_layers} layers (0..{num_layers}, "
                             f"or -1..-{num_layers + 1})")
        resolved.append(j)
    return resolved


class MLLMAdapter(nn.Module, abc.ABC):
    """What the fusion needs from a multimodal LLM. Attributes every adapter sets in ``__init__``:

    * ``model``: the transformers model (``.model.language_model``, ``.model.visual``, ``.lm_head``; LoRA and
      the trainable sets address these names); ``processor`` (None on the meta device);
    * ``hidden_layers``: the selected layers, resolved (:func:`resolve_layers`); the fusion may set it;
    * ``max_length``: the token budget of one sequence; ``min_pixels`` / ``max_pixels``: the processor's
      image bounds (part of the feature-cache key, and what the validator measures with).
    """

    supports_query_embeddings: bool = False
    """Whether ``forward(inputs_embeds=...)`` and :meth:`run_queries` accept learned query embeddings (query connectors)."""
    supports_prefix_cache: bool = False
    """Whether :meth:`prefix_cache` / :meth:`queries_after_prefix` work (the feature cache of query connectors)."""

    model: nn.Module
    processor: Any
    hidden_layers: list[int]
    max_length: int
    min_pixels: int
    max_pixels: int

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, path: str, dtype: str = "float32", attn_implementation: str = "sdpa", hidden_layers: Sequence[int] = (-1,),
                        min_pixels: int | None = None, max_pixels: int | None = None, max_length: int = 8192, add_bov: bool = True,
                        device: str | None = None, architecture: dict | None = None) -> MLLMAdapter:
        """Load model + processor from a local folder (or a cached hub id) and add ``<|bov|>`` unless ``add_bov=False``.
        ``device="meta"`` builds the architecture only, from ``architecture`` (a config.json written in the yaml) or the
        folder's config.json, with no weights (``tools/plan.py``); the processor is loaded only from a local folder."""

    @abc.abstractmethod
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write model + processor (tokenizer with ``<|bov|>``, chat template) as a folder ``from_pretrained`` reads."""

    def resolve_layers(self, layers: Sequence[int], key: str) -> list[int]:
        """:func:`resolve_layers` for this model's depth."""
        return resolve_layers(layers, self.num_layers, key)

    # ------------------------------------------------------------------ sizes and tokens
    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The tokenizer (``decode``, ``pad_token_id``, ``convert_tokens_to_ids``)."""

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int:
        """Width of the language model's hidden states (what connectors read)."""

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Decoder layers of the language model."""

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @abc.abstractmethod
    def token_id(self, token: str) -> int:
        """The id of a token string; KeyError if the tokenizer lacks it."""

    @property
    def bov_token_id(self) -> int:
        return self.token_id(BOV_TOKEN)

    @property
    @abc.abstractmethod
    def end_of_turn_id(self) -> int:
        """The token that closes a chat turn."""

    @property
    @abc.abstractmethod
    def image_token_id(self) -> int:
        """The placeholder token each image patch group occupies in the ids."""

    @property
    def vision_start_id(self) -> int:
        """The token that opens an image's span of vision tokens."""
        return self.token_id("<|vision_start|>")

    @property
    def vision_end_id(self) -> int:
        """The token that closes an image's span of vision tokens."""
        return self.token_id("<|vision_end|>")

    # ------------------------------------------------------------------ parts (trainable sets, LoRA, checkpointing, compile)
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (LoRA targets live here)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder and its merger (``trainable.vision_tower``)."""
        return self.model.model.visual

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def render(self, conversation: Conversation | dict | list, add_generation_prompt: bool = False,
               check_length: bool = True) -> RenderedConversation:
        """A conversation (images decoded or paths) as ids, labels and vision inputs, through the family's own chat template
        and processor: ``<|bov|>`` before every assistant image; labels on assistant text, ``<|bov|>`` and end of turn; a
        DataError (``too_long``) past ``max_length`` when ``check_length``."""

    @abc.abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False, compute_logits: bool = True,
                inputs_embeds: torch.Tensor | None = None) -> dict[str, Any]:
        """Run the MLLM; returns ``hidden`` [B, n_layers, L, D] of ``hidden_layers`` and, when asked, ``logits`` / ``loss``.
        ``position_ids`` (the family's rope layout) are given for packed rows; ``inputs_embeds`` carries query embeddings
        (``input_ids`` then says which slots are images)."""

    @abc.abstractmethod
    def rope_positions(self, ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """Rope positions of a span of ids beginning at position ``start``, in the layout ``forward(position_ids=)`` takes
        (``fusion/packing.py`` lays out packed rows with them, each sample from 0)."""

    # ------------------------------------------------------------------ generation
    @abc.abstractmethod
    def new_state(self) -> DecodeState:
        """An empty conversation for cached decoding."""

    @abc.abstractmethod
    def extend(self, state: DecodeState, ids, pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None) -> DecodeState:
        """Run a span of new tokens (text and whole images) through the cache with its own positions, keeping the
        selected-layer hidden states of every token."""

    @abc.abstractmethod
    def decode(self, state: DecodeState, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None, stop_ids: Sequence[int] | None = None, logits_processor: Any = None,
               suppress_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> tuple[list[int], str]:
        """Decode until ``<|bov|>`` (reason ``"bov"``), end of turn (``"eot"``) or ``max_new_tokens`` (``"length"``)."""

    @abc.abstractmethod
    def append_image(self, state: DecodeState, image: Image.Image | str) -> DecodeState:
        """Append an image's vision tokens to the cache with the family's positions, never recomputing the prefix."""

    @abc.abstractmethod
    def run_queries(self, state: DecodeState, query_embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states [1, n_layers, N, D] of learned query embeddings appended after the cache (which is left as it was)."""

    # ------------------------------------------------------------------ query connectors over a stored prefix (feature cache)
    def prefix_cache(self, ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The key/value cache of a context, [layers, 2, kv_heads, L, head_dim], and the rope position that follows each
        of its prefixes, [L] (entry ``n - 1``: after the first ``n`` tokens). A causal model's cache of a prefix is
        the first ``n`` positions of this one, so one forward serves every target of a conversation."""
        raise NotImplementedError(f"{type(self).__name__} cannot store a prefix cache (query connectors then run without the feature cache)")

    def queries_after_prefix(self, kv: torch.Tensor, next_position: int, query_embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states [1, n_layers, N, D] of query embeddings read after a prefix given by its stored cache
        (:meth:`prefix_cache`, cut to the prefix): what the whole context's forward gives them, with gradients
        to the embeddings, at the cost of the N query tokens."""
        raise NotImplementedError(f"{type(self).__name__} cannot read queries after a stored prefix")

    def queries_after_prefixes(self, prefixes: Sequence[tuple[torch.Tensor, int]], query_embeds: torch.Tensor) -> torch.Tensor:
        """:meth:`queries_after_prefix` for several ``(kv, next_position)`` prefixes in one batch: [B, n_layers, N, D]."""
        raise NotImplementedError(f"{type(self).__name__} cannot read queries after stored prefixes")
