"""Qwen3-VL adapter (dense Instruct checkpoints): the second MLLM family, on :class:`backbones.mllm.base.MLLMAdapter`.

It shares the Qwen2.5-VL adapter's machinery (``<|bov|>``, labels, cached decoding, packing, query
embeddings) and differs where the family does:

* **vision**: patch 16 with a 2x2 merge (one vision token per 32x32 pixels; ``qwen-vl-utils`` resizes
  with the family's patch size), no window attention; the published processor bounds are
  65,536 .. 16,777,216 pixels;
* **rope**: interleaved MRoPE (T/H/W frequencies interleaved rather than in blocks). The 3-D positions of
  an image span are laid out as in Qwen2.5-VL (the model's own ``get_rope_index``), so an image appended
  to the KV cache mid-conversation gets its positions from that span plus the prefix's next position,
  passed explicitly (without them the model uses stored deltas and is silently wrong);
* **DeepStack**: features from several vision blocks are added to the image-token states after the first
  language layers (``deepstack_visual_indexes``; layer ``k``'s output gets level ``k``). A span appended
  with its ``pixel_values`` through the full model gets them, nothing is needed for earlier cached
  positions. ``hidden_layers`` index ``output_hidden_states``: for layers 1..n at image tokens those are
  the states *before* the DeepStack addition of that layer (text tokens are unaffected);
* **inputs**: the model refuses ``input_ids`` and ``inputs_embeds`` together (Qwen2.5-VL takes both), so
  query embeddings go in as embeddings alone; image slots are then found by their ``<|image_pad|>``
  embedding;
* **chat template**: the published Instruct template renders only the text of assistant turns, so an
  assistant image is written as literal ``<|bov|><|vision_start|><|image_pad|><|vision_end|>`` text (the
  processor expands the pad with that image, in conversation order), and there is no default system prompt.

``make_tiny`` writes a tiny random-init checkpoint in the published layout (``tools/make_tiny.py`` part
``qwen3_vl``): the tiny BPE of the Qwen2.5-VL builder (same special tokens), a template with the published
one's behaviour, the stock processors with patch 16 and small bounds, a 4-layer ``Qwen3VLForConditionalGeneration``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter

#: the published Qwen3-VL preprocessor_config.json bounds (64 and 16384 tokens of 32 x 32 pixels)
PUBLISHED_PIXELS = {"shortest_edge": 65536, "longest_edge": 16777216}


class Qwen3VLAdapter(Qwen25VLAdapter):
    """Qwen3-VL with ``<|bov|>``, rendering, layer selection and cached decoding (see the module docstring)."""

    published_pixels = PUBLISHED_PIXELS
    family = "Qwen3-VL"
    assistant_images_as_text = True  # the published Instruct template renders only the text of assistant turns

    @classmethod
    def hf_classes(cls) -> tuple[type, type]:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        return Qwen3VLConfig, Qwen3VLForConditionalGeneration

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, labels=None, position_ids=None, past_key_values=None, use_cache: bool = False,
                compute_logits: bool = True, inputs_embeds: torch.Tensor | None = None) -> dict[str, Any]:
        if inputs_embeds is not None and input_ids is not None:  # embeddings alone; the ids only mark the image slots
            if mm_token_type_ids is None:
                mm_token_type_ids = (input_ids == self.image_token_id).int()
            input_ids = None
        return super().forward(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, labels, position_ids,
                               past_key_values, use_cache, compute_logits, inputs_embeds)


# ---------------------------------------------------------------------------- tiny checkpoint
#: A chat template with the published Qwen3-VL Instruct template's behaviour: no default system prompt, images
#: rendered in user turns, only the text of assistant turns (written here, not copied).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if message['role'] == 'user' and (content['type'] == 'image' or 'image' in content) %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif message['role'] == 'user' and (content['type'] == 'video' or 'video' in content) %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: tiny processor bounds: images become 64x64 .. 128x128 (2x2 .. 4x4 vision tokens of 32 px)
TINY_MIN_PIXELS = 64 * 64
TINY_MAX_PIXELS = 128 * 128


def tiny_config(tokenizer, hidden_size: int = 64, num_layers: int = 4, vision_hidden_size: int = 32, initializer_range: float = 0.02):
    """A Qwen3-VL config of the real class with tiny widths: head_dim 16 (set: not derived), interleaved mrope 4+2+2,
    vision depth 2 with DeepStack taps at blocks 0 and 1."""
    from transformers import Qwen3VLConfig

    from backbones.mllm.tiny_qwen2_5_vl import QWEN_SPECIAL_TOKENS

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 63) // 64 * 64  # padded like the published embeddings: <|bov|> lands in the padding
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
            initializer_range=initializer_range,
        ),
        vision_config=dict(
            depth=2, hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_heads=2, in_channels=3, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size, num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1], initializer_range=initializer_range,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def make_tiny(out_dir: str | Path, seed: int = 0, name: str = "qwen3_vl", hidden_size: int = 64, num_layers: int = 4,
              vision_hidden_size: int = 32, min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS) -> Path:
    """Write a tiny Qwen3-VL (model, tokenizer, processor) to ``<out_dir>/<name>``; it loads with
    ``AutoProcessor`` / ``AutoModelForImageTextToText`` like ``Qwen/Qwen3-VL-2B-Instruct``."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from backbones.mllm.tiny_qwen2_5_vl import build_tokenizer

    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels,
                                            **norm)
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, **norm)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                 chat_template=QWEN3_VL_CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config(tokenizer, hidden_size, num_layers, vision_hidden_size))
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
