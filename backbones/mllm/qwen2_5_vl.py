"""Qwen2.5-VL adapter: the MLLM side of the fusion.

What it does (the MLLM contract of DESIGN.md):

* loads a checkpoint with ``from_pretrained`` (a local folder or a hub id; with
  ``HF_HUB_OFFLINE=1`` a hub id must already be in the local cache);
* adds ``<|bov|>`` (begin-of-vision) once: tokenizer + embeddings, the new row set to the
  mean of the existing token rows; it is saved with the checkpoint, so loading a saved
  adapter never adds it again;
* renders an interleaved conversation (JSONL message format) with the model's own chat
  template and processor (``qwen-vl-utils`` resizes the images) into ids, labels,
  ``pixel_values`` and grids. Each *assistant* image is written as ``<|bov|>`` followed by
  the usual ``<|vision_start|><|image_pad|>*N<|vision_end|>``. Labels supervise assistant
  text, ``<|bov|>`` and ``<|im_end|>``; system/user turns and all vision tokens are masked;
* forward returning the hidden states of configurable layers;
* incremental decoding with a KV cache (:class:`DecodeState`) that stops at ``<|bov|>``
  or end of turn, keeps the selected-layer hidden states of everything it ran (so the
  connector never recomputes the prefix) and appends an image's vision tokens to the
  cache. Qwen2.5-VL's 3-D rope positions are computed for every appended span with the
  model's own ``get_rope_index`` and passed explicitly: a cached forward without
  ``position_ids`` runs but puts the text after an image at the wrong positions.

Layer indices (``hidden_layers``) follow transformers' ``output_hidden_states``: 0 is the
embedding output, ``i`` the output of decoder layer ``i``; the last entry is after the
final norm; negative indices count from the end (-1 = last).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from backbones.mllm.base import BOV_TOKEN, DecodeState, MLLMAdapter, RenderedConversation
from backbones.paths import architecture_diff, local_folder, plain
from fusion.data import Conversation, load_images, parse_conversation
from fusion.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the published Qwen2.5-VL preprocessor_config.json bounds (4 and 16384 patches of 28 x 28)
PUBLISHED_PIXELS = {"shortest_edge": 3136, "longest_edge": 12845056}


@functools.cache
def cache_kwarg() -> str:
    """The installed transformers' KV-cache keyword: ``cache`` from 5.2x (``past_key_values`` warns there, goes in 5.40)."""
    from transformers import Qwen2_5_VLModel

    return "cache" if "cache" in inspect.signature(Qwen2_5_VLModel.forward).parameters else "past_key_values"


class Qwen25VLAdapter(MLLMAdapter):
    """Qwen2.5-VL with ``<|bov|>``, conversation rendering, layer selection and cached decoding."""

    #: query connectors may append learned embeddings after ``<|bov|>`` (``forward(inputs_embeds=...)``)
    supports_query_embeddings = True
    supports_prefix_cache = True
    #: the processor's pixel bounds when building on the meta device (the published preprocessor_config.json)
    published_pixels = PUBLISHED_PIXELS
    #: the family's name in messages
    family = "Qwen2.5-VL"

    @classmethod
    def hf_classes(cls) -> tuple[type, type]:
        """(config class, model class) of the family in transformers."""
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        hidden_layers: Sequence[int] = (-1,),
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_length: int = 8192,
    ):
        super().__init__()
        self.model = model
        self.processor = processor  # None: an architecture on the meta device (tools/plan.py), nothing to render with
        self.max_length = max_length
        ip = processor.image_processor if processor is not None else None
        default = ip.size if ip is not None else self.published_pixels
        self.min_pixels = int(min_pixels if min_pixels is not None else default["shortest_edge"])
        self.max_pixels = int(max_pixels if max_pixels is not None else default["longest_edge"])
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"mllm.min_pixels ({self.min_pixels}) is larger than mllm.max_pixels ({self.max_pixels})")
        if ip is not None:
            ip.size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        self.hidden_layers = self.resolve_layers(hidden_layers, "mllm.hidden_layers")

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        hidden_layers: Sequence[int] = (-1,),
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_length: int = 8192,
        add_bov: bool = True,
        device: str | None = None,
        architecture: dict | None = None,
    ) -> Qwen25VLAdapter:
        """Load model + processor from a folder or hub id and add ``<|bov|>`` if missing.

        ``device="meta"`` builds the architecture only (no weights, no memory, no processor) from
        ``architecture`` (a config.json written out in the yaml) or the local folder's config.json.
        Otherwise every field of ``architecture`` that differs from the loaded checkpoint is logged."""
        from transformers import AutoProcessor

        config_cls, model_cls = cls.hf_classes()
        if dtype not in DTYPES:
            raise ValueError(f"mllm.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        path = str(path)
        architecture = plain(architecture)
        if str(device) == "meta":
            if architecture is not None:
                config = config_cls.from_dict(architecture)
            else:
                p = local_folder(path, "mllm.path")
                if p is None:
                    raise CheckpointError(f"mllm.path: {path!r} is a hub id and mllm.architecture is not written out; "
                                          "building on the meta device needs one of them")
                config = config_cls.from_pretrained(p)
            with torch.device("meta"):
                model = model_cls._from_config(config, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
            processor = None
            if local_folder(path, "mllm.path") is not None and (Path(path) / "tokenizer_config.json").is_file():
                processor = AutoProcessor.from_pretrained(path)  # a local folder: rendering works (tools/validate_data.py)
                if BOV_TOKEN not in processor.tokenizer.get_vocab():  # the tokenizer side of add_bov_token (no weights here)
                    processor.tokenizer.add_special_tokens({"additional_special_tokens": [BOV_TOKEN]}, replace_extra_special_tokens=False)
            return cls(model, processor, hidden_layers, min_pixels, max_pixels, max_length)
        p = local_folder(path, "mllm.path")
        if p is not None:
            if not (p / "config.json").is_file():
                raise CheckpointError(f"mllm.path: {p} has no config.json; not a transformers checkpoint folder")
            path = str(p)
        try:
            processor = AutoProcessor.from_pretrained(path)
            model = model_cls.from_pretrained(
                path, dtype=DTYPES[dtype], attn_implementation=attn_implementation
            )
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            hint = " (HF_HUB_OFFLINE=1: a hub id must already be in the local cache)" if offline else ""
            raise CheckpointError(f"mllm.path: could not load {path!r}{hint}: {str(e).splitlines()[0]}") from None
        if architecture is not None:
            try:
                differ = architecture_diff(config_cls.from_dict(architecture).to_dict(), model.config.to_dict())
            except (ValueError, TypeError) as e:
                differ = [f"mllm.architecture is not a valid {cls.family} config ({e})"]
            if differ:
                logger.warning("mllm.architecture differs from %s (the checkpoint's values are used): %s", path, "; ".join(differ))
        if device is not None:
            model.to(device)
        adapter = cls(model, processor, hidden_layers, min_pixels, max_pixels, max_length)
        if add_bov:
            adapter.add_bov_token()
        return adapter

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write model + processor (tokenizer with ``<|bov|>``, chat template) as a plain folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)

    def add_bov_token(self) -> bool:
        """Add ``<|bov|>`` to tokenizer and embeddings unless present. Returns True if added.

        The new embedding (and output) row is the mean of the rows of the existing tokens.
        Published Qwen checkpoints pad their embeddings past the tokenizer (152064 rows for
        151665 tokens); then the new id falls in the padding and no resize is needed, but
        the row is still set to the mean.
        """
        tok = self.tokenizer
        if BOV_TOKEN in tok.get_vocab():
            return False
        n_old = len(tok)
        tok.add_special_tokens({"additional_special_tokens": [BOV_TOKEN]}, replace_extra_special_tokens=False)
        new_id = tok.convert_tokens_to_ids(BOV_TOKEN)
        emb = self.model.get_input_embeddings()
        if new_id >= emb.weight.shape[0]:
            self.model.resize_token_embeddings(new_id + 1, mean_resizing=False)
        with torch.no_grad():
            for w in {id(t): t for t in (self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight)}.values():
                w[new_id] = w[:n_old].float().mean(0).to(w.dtype)
        logger.info("added %s as id %d", BOV_TOKEN, new_id)
        return True

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def token_id(self, token: str) -> int:
        i = self.tokenizer.convert_tokens_to_ids(token)
        if i is None or i == self.tokenizer.unk_token_id:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return i

    @property
    def end_of_turn_id(self) -> int:
        return self.token_id("<|im_end|>")

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    # ------------------------------------------------------------------ rendering
    #: write assistant images as literal vision-span text (for a chat template that renders only the text of assistant turns)
    assistant_images_as_text = False

    def _template_messages(self, conv: Conversation, for_vision: bool = False) -> list[dict[str, Any]]:
        """Messages for the chat template: ``<|bov|>`` before assistant images, pixel bounds on images. ``for_vision``: the
        messages ``qwen-vl-utils`` reads the images from (every image an image item, in conversation order)."""
        out = []
        for m in conv.messages:
            items = []
            for item in m["content"]:
                if item["type"] != "image":
                    items.append(item)
                elif m["role"] == "assistant" and self.assistant_images_as_text and not for_vision:
                    items.append({"type": "text", "text": BOV_TOKEN + "<|vision_start|><|image_pad|><|vision_end|>"})
                else:
                    if m["role"] == "assistant":
                        items.append({"type": "text", "text": BOV_TOKEN})
                    items.append({"type": "image", "image": item["image"], "min_pixels": self.min_pixels, "max_pixels": self.max_pixels})
            out.append({"role": m["role"], "content": items})
        return out

    def render(
        self, conversation: Conversation | dict | list, add_generation_prompt: bool = False, check_length: bool = True
    ) -> RenderedConversation:
        """Render a conversation into model inputs and labels (see the module docstring)."""
        from qwen_vl_utils import process_vision_info

        if not isinstance(conversation, Conversation):
            obj = conversation if isinstance(conversation, dict) else {"messages": conversation}
            conversation = parse_conversation(obj)
        conv = load_images(conversation)
        messages = self._template_messages(conv)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        patch = self.model.config.vision_config.patch_size
        images, _ = process_vision_info(self._template_messages(conv, for_vision=True), image_patch_size=patch)[:2]
        enc = self.processor(text=[text], images=images, return_tensors="pt")
        ids = enc["input_ids"]
        if check_length and ids.shape[1] > self.max_length:
            raise DataError(
                f"sample is {ids.shape[1]} tokens, longer than mllm.max_length={self.max_length}",
                conv.source if conv.line is not None else None,
                conv.line,
                kind="too_long",
            )
        mm = enc.get("mm_token_type_ids")
        if mm is None:
            mm = (ids == self.image_token_id).int()
        return RenderedConversation(
            input_ids=ids,
            labels=self.build_labels(ids[0])[None],
            attention_mask=enc["attention_mask"],
            mm_token_type_ids=mm,
            pixel_values=enc.get("pixel_values"),
            image_grid_thw=enc.get("image_grid_thw"),
            image_roles=[role for role, _ in conv.image_items()],
            text=text,
        )

    def build_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Labels for one rendered sequence: assistant content, ``<|bov|>`` and ``<|im_end|>`` supervised.

        The role of a turn is read from the tokens between ``<|im_start|>`` and the first
        token holding a newline (the template writes ``<|im_start|>{role}\\n``).
        """
        tok = self.tokenizer
        im_start = self.token_id("<|im_start|>")
        im_end = self.end_of_turn_id
        vision = {self.token_id(t) for t in VISION_TOKENS}
        ids_list = ids.tolist()
        labels = torch.full_like(ids, -100)
        i, n = 0, len(ids_list)
        while i < n:
            if ids_list[i] != im_start:
                i += 1
                continue
            j = i + 1
            header = ""
            while j < n and "\n" not in header:
                header += tok.decode([ids_list[j]])
                j += 1
            role = header.split("\n", 1)[0].strip()
            k = j
            while k < n and ids_list[k] != im_end:
                if role == "assistant" and ids_list[k] not in vision:
                    labels[k] = ids_list[k]
                k += 1
            if role == "assistant" and k < n:
                labels[k] = im_end
            i = k + 1
        return labels

    # ------------------------------------------------------------------ forward
    def select(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack the configured layers of an ``output_hidden_states`` tuple: [B, n_layers, L, D]."""
        return torch.stack([hidden_states[i] for i in self.hidden_layers], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        compute_logits: bool = True,
        inputs_embeds: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Run the MLLM; returns ``hidden`` [B, n_layers, L, D] and, if asked, ``logits``/``loss``."""
        if mm_token_type_ids is None and input_ids is not None:
            mm_token_type_ids = (input_ids == self.image_token_id).int()
        kwargs = dict(
            input_ids=input_ids,  # with inputs_embeds too: the ids place the image features
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=True,
        )
        kwargs[cache_kwarg()] = past_key_values
        if compute_logits or labels is not None:
            out = self.model(labels=labels, **kwargs)
            result = {"logits": out.logits, "loss": out.loss}
        else:
            out = self.model.model(**kwargs)
            result = {}
        result["hidden"] = self.select(out.hidden_states)
        result["past_key_values"] = getattr(out, cache_kwarg())
        return result

    # ------------------------------------------------------------------ cached decoding
    def rope_positions(
        self, ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None, start: int = 0
    ) -> torch.Tensor:
        """3-D rope positions [3, 1, L] of a span of ids that begins at rope position ``start``.

        Uses the model's own ``get_rope_index``; positions are shift-equivariant, so the
        positions of a span appended after a prefix are those of the span alone plus the
        prefix's next position.
        """
        ids = ids.reshape(1, -1)
        types = (ids == self.image_token_id).int()
        if image_grid_thw is None or not bool(types.any()):
            pos = torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, 1, -1)
        else:
            pos, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw)
        return pos + start

    def new_state(self) -> DecodeState:
        from transformers import DynamicCache

        return DecodeState(cache=DynamicCache(config=self.model.config))

    @torch.no_grad()
    def extend(
        self,
        state: DecodeState,
        ids: torch.Tensor | Sequence[int],
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> DecodeState:
        """Run a span of new tokens (text and/or whole images) through the cache.

        With ``state.recompute`` set (the naive baselines the benchmark compares against),
        the span is instead appended and the *whole* context is re-encoded from scratch.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        if ids.shape[1] == 0:
            return state
        if image_grid_thw is not None:
            state.image_grids.extend(image_grid_thw)
            state.pixel_chunks.append(pixel_values)
        if state.recompute == "always" or (state.recompute == "images" and image_grid_thw is not None):
            return self._reencode(state, ids)
        pos = self.rope_positions(ids, image_grid_thw, start=state.next_position)
        out = self.forward(
            ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            position_ids=pos,
            past_key_values=state.cache,
            use_cache=True,
        )
        state.cache = out["past_key_values"]
        state.ids.extend(ids[0].tolist())
        state.next_position = int(pos.max()) + 1
        state.hidden_chunks.append(out["hidden"][0])
        state.last_logits = out["logits"][0, -1].float()
        state.tokens_forwarded += ids.shape[1]
        return state

    def _reencode(self, state: DecodeState, ids: torch.Tensor) -> DecodeState:
        """Baseline: forget the cache and run every token of the context again."""
        from transformers import DynamicCache

        all_ids = torch.tensor([state.ids + ids[0].tolist()], device=self.device)
        grids = torch.stack(state.image_grids).to(self.device) if state.image_grids else None
        pv = torch.cat(state.pixel_chunks).to(self.device, self.model.dtype) if state.pixel_chunks else None
        pos = self.rope_positions(all_ids, grids)
        cache = DynamicCache(config=self.model.config)
        out = self.forward(all_ids, pixel_values=pv, image_grid_thw=grids, position_ids=pos, past_key_values=cache, use_cache=True)
        state.cache = out["past_key_values"]
        state.ids = all_ids[0].tolist()
        state.next_position = int(pos.max()) + 1
        state.hidden_chunks = [out["hidden"][0]]
        state.last_logits = out["logits"][0, -1].float()
        state.tokens_forwarded += all_ids.shape[1]
        return state

    @torch.no_grad()
    def run_queries(self, state: DecodeState, query_embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states [1, n_layers, N, D] of query embeddings appended after the cache.

        The queries attend to the whole prefix through the cache, which is then cropped
        back: they are not part of the conversation and never count as tokens of it.
        """
        n = query_embeds.shape[0]
        pad = torch.full((1, n), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        pos = self.rope_positions(pad, start=state.next_position)
        out = self.forward(pad, inputs_embeds=query_embeds[None].to(self.device, self.model.dtype), position_ids=pos,
                           past_key_values=state.cache, use_cache=True, compute_logits=False)
        state.cache = out["past_key_values"]
        state.cache.crop(-n)
        return out["hidden"]

    @torch.no_grad()
    def prefix_cache(self, ids, pixel_values=None, image_grid_thw=None):
        from transformers import DynamicCache

        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(1, -1)
        grids = image_grid_thw.to(self.device) if image_grid_thw is not None else None
        pv = pixel_values.to(self.device, self.model.dtype) if pixel_values is not None else None
        pos = self.rope_positions(ids, grids)
        out = self.forward(ids, pixel_values=pv, image_grid_thw=grids, position_ids=pos, past_key_values=DynamicCache(config=self.model.config),
                           use_cache=True, compute_logits=False)
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in out["past_key_values"].layers])
        return kv, pos.amax(dim=(0, 1)).cummax(dim=0).values + 1

    def queries_after_prefix(self, kv, next_position, query_embeds):
        return self.queries_after_prefixes([(kv, next_position)], query_embeds)

    def queries_after_prefixes(self, prefixes, query_embeds):
        """:meth:`queries_after_prefix` for several prefixes in one forward: [B, n_layers, N, D]. The stored caches are
        right-padded to the longest and the padding masked out; each row's queries take its own rope positions."""
        from transformers import DynamicCache

        dtype, dev = self.model.dtype, self.device
        lengths = [kv.shape[3] for kv, _ in prefixes]
        longest, b, n = max(lengths), len(prefixes), query_embeds.shape[0]
        cache = DynamicCache(config=self.model.config)
        for i in range(prefixes[0][0].shape[0]):
            keys, values = (torch.stack([nn.functional.pad(kv[i, j], (0, 0, 0, longest - kv.shape[3])) for kv, _ in prefixes]).to(dev, dtype)
                            for j in (0, 1))
            cache.update(keys, values, i)
        mask = None
        if min(lengths) < longest:
            mask = torch.ones(b, longest + n, dtype=torch.long, device=dev)
            for row, length in enumerate(lengths):
                mask[row, length:longest] = 0
        pad = torch.full((b, n), self.tokenizer.pad_token_id, dtype=torch.long, device=dev)
        pos = torch.cat([self.rope_positions(pad[:1], start=int(start)) for _, start in prefixes], dim=1)  # [3, B, N]
        # A checkpointed layer in train mode drops its cache (transformers: caching is incompatible with gradient
        # checkpointing), and the queries would then attend to themselves alone. The frozen MLLM (train mode only so
        # that it checkpoints, no dropout in it) reads the queries in eval mode: their activations are N tokens a row.
        lm = self.language_model
        training = lm.training
        lm.eval()
        try:
            out = self.forward(pad, attention_mask=mask, inputs_embeds=query_embeds[None].expand(b, -1, -1).to(dev, dtype), position_ids=pos,
                               past_key_values=cache, use_cache=True, compute_logits=False)
        finally:
            lm.train(training)
        return out["hidden"]

    def prefill(self, state: DecodeState, rendered: RenderedConversation) -> DecodeState:
        """Run a rendered prompt (e.g. ``render(..., add_generation_prompt=True)``) into the cache."""
        return self.extend(state, rendered.input_ids, rendered.pixel_values, rendered.image_grid_thw)

    @torch.no_grad()
    def decode(
        self,
        state: DecodeState,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        stop_ids: Sequence[int] | None = None,
        logits_processor: Any = None,
        suppress_ids: Sequence[int] = (),
        on_token: Any = None,
    ) -> tuple[list[int], str]:
        """Decode until ``<|bov|>``, end of turn or ``max_new_tokens``.

        The stop token itself is run through the cache (its hidden state is part of the
        prefix the connector reads). ``logits_processor(ids [1, L], scores [1, V])`` follows
        the transformers ``LogitsProcessor`` interface; ``suppress_ids`` can never be drawn
        (e.g. ``<|bov|>`` once a turn has its maximum of images); ``on_token(id)`` streams.
        Returns the new ids and the reason: ``"bov"``, ``"end_of_turn"`` or ``"length"``.
        """
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        if state.last_logits is None:
            raise RuntimeError("decode() needs a prefilled state (call prefill first)")
        stops = set(stop_ids) if stop_ids is not None else {self.bov_token_id, self.end_of_turn_id}
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = state.last_logits[None].clone()
            if logits_processor is not None:
                logits = logits_processor(torch.tensor([state.ids]), logits)
            if suppress_ids:
                logits[:, list(suppress_ids)] = float("-inf")
            if temperature > 0:
                logits = TemperatureLogitsWarper(temperature)(None, logits)
                if top_p < 1.0:
                    logits = TopPLogitsWarper(top_p)(None, logits)
                probs = torch.softmax(logits, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=generator))
            else:
                nxt = int(logits.argmax(-1))
            new.append(nxt)
            self.extend(state, [nxt])
            if on_token is not None:
                on_token(nxt)
            if nxt in stops:
                return new, "bov" if nxt == self.bov_token_id else "end_of_turn"
        return new, "length"

    def image_inputs(self, image: Image.Image | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vision tokens for one image: (ids ``<|vision_start|><|image_pad|>*N<|vision_end|>``, pixel_values, grid)."""
        from qwen_vl_utils import fetch_image

        from fusion.data import open_image

        img = open_image(image)
        img = fetch_image(
            {"image": img, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
            image_patch_size=self.model.config.vision_config.patch_size,
        )
        enc = self.processor.image_processor(images=[img], return_tensors="pt")
        grid = enc["image_grid_thw"]
        n = int(grid.prod()) // self.processor.image_processor.merge_size**2
        ids = [self.token_id("<|vision_start|>")] + [self.image_token_id] * n + [self.token_id("<|vision_end|>")]
        return torch.tensor(ids), enc["pixel_values"], grid

    def append_image(self, state: DecodeState, image: Image.Image | str) -> DecodeState:
        """Append an image (its vision tokens) to the cache without recomputing the prefix."""
        ids, pixel_values, grid = self.image_inputs(image)
        return self.extend(state, ids, pixel_values.to(self.device, self.model.dtype), grid.to(self.device))

    def append_text(self, state: DecodeState, text: str) -> DecodeState:
        """Append plain text (it may contain special tokens such as ``<|im_end|>``)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.extend(state, ids)
