"""A tiny random-init Qwen2.5-VL checkpoint in the published folder layout.

Run as: ``python tools/make_tiny.py out_dir=checkpoints/tiny`` (writes ``<out_dir>/qwen2_5_vl``).

Everything is built offline: a small byte-level BPE trained with the ``tokenizers`` library
on the toy world's vocabulary (with Qwen's pre-tokenizer and special tokens, so the ids of
``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>`` ... are real special tokens), the
published Qwen2.5-VL chat template, the stock image/video processors with small pixel
bounds, and a 4-layer ``Qwen2_5_VLForConditionalGeneration``. The folder loads with
``AutoProcessor.from_pretrained`` / ``Qwen2_5_VLForConditionalGeneration.from_pretrained``
exactly like ``Qwen/Qwen2.5-VL-7B-Instruct``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

# Qwen2.5's special tokens, in their published order (ids 151643.. in the real vocab).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template published with Qwen2.5-VL-*-Instruct (chat_template.json).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Pixel bounds of the tiny processor: images become 56x56 .. 112x112 (2x2 .. 4x4 vision tokens).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def _corpus() -> list[str]:
    """Sentences in the toy world's vocabulary plus everyday chat words, for the BPE."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "triangle", "circles", "squares", "triangles"]
    places = ["top", "middle", "bottom", "left", "centre", "center", "right", "corner", "row", "column"]
    verbs = ["draw", "move", "make", "add", "remove", "recolour", "change", "show", "paint", "put", "edit", "keep"]
    words = ["a", "an", "the", "of", "in", "on", "at", "to", "and", "or", "with", "without", "is", "are", "was", "there", "here", "it", "this", "that", "what", "which", "how", "many", "image", "picture", "scene", "now", "please", "can", "you", "then", "next", "first", "second", "third", "step", "one", "two", "three", "zero", "no", "yes", "answer", "question", "same", "earlier", "before", "after", "turn", "back", "again", "only", "also", "instead", "into", "from", "by", "for", "hello", "thanks", "sure", "okay", "done", "object", "objects", "colour", "color", "shape", "position", "count", "empty", "canvas", "you", "are", "a", "helpful", "assistant", "system", "user"]
    lines = []
    for c, s, p, v in itertools.product(colours, shapes, places, verbs):
        lines.append(f"{v.capitalize()} a {c} {s} at the {p}.")
        lines.append(f"There is a {c} {s} in the {p} {p}?")
    lines.append(" ".join(words))
    lines.append("0 1 2 3 4 5 6 7 8 9 , . ! ? : ; ' \" ( ) - \n\n")
    return lines


def build_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE with Qwen2's pre-tokenizer; wrap it as a ``Qwen2Tokenizer``."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model_state = json.loads(tok.model.__getstate__())
    vocab, merges = model_state["vocab"], model_state["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        errors="replace",
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=8192,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    for t in QWEN_SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(t) is not None
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, hidden_size: int = 64, num_layers: int = 4, vision_hidden_size: int = 32, initializer_range: float = 0.02,
                rope_theta: float = 10000.0, mrope_interleaved: bool = False):
    """A Qwen2.5-VL config of the real class with tiny widths (head_dim 16, mrope 2+3+3).

    ``rope_theta``: the published base. MRoPE gives image rows the middle and columns the lowest of
    the head's rotary frequencies, which at 10000 and head_dim 32 turn by under 0.1 rad per row
    and 0.004 per column: a toy model with one vision token per grid cell may take a smaller base.
    ``mrope_interleaved``: ``mrope_section`` of head_dim/2 ones, so the class's split takes the
    frequencies in turn for time, rows and columns (the interleaved MRoPE Qwen3-VL adopted for
    this reason): columns then get a high frequency too (0.32 rad per cell at base 10000).

    ``initializer_range``: the published 0.02 is tuned for wide models; a model this narrow
    trained from scratch needs a larger one before its language model reads the vision tokens
    (measured on the toy world: with 0.02 a 128-wide model never learned to count objects in
    1000 steps, with 0.1 it did in 100)."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = len(tokenizer)
    vocab = (vocab + 63) // 64 * 64  # padded like the published 152064-row embeddings
    heads = 4
    half = hidden_size // heads // 2
    hw = half * 3 // 8
    mrope = [half - 2 * hw, hw, hw]  # must sum to head_dim / 2 (2+3+3 for the default 64 / 4 heads)
    if mrope_interleaved:  # frequency i goes to time / rows / columns by i % 3 (the class splits by section, i-th chunk to i % 3)
        mrope = [1] * half
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
            initializer_range=initializer_range,
        ),
        vision_config=dict(
            initializer_range=initializer_range,
            depth=2,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=56,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )


def make_tiny(out_dir: str | Path, seed: int = 0, name: str = "qwen2_5_vl", hidden_size: int = 64, num_layers: int = 4,
              vision_hidden_size: int = 32, min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS,
              initializer_range: float = 0.02, rope_theta: float = 10000.0, mrope_interleaved: bool = False,
              vision_out_scale: float = 1.0) -> Path:
    """Write a tiny Qwen2.5-VL (model, tokenizer, processor) to ``<out_dir>/<name>``.

    ``min_pixels`` / ``max_pixels`` are the processor's bounds (the toy MLLM uses 84x84 for
    both: a 64 px toy image becomes 6x6 patches, 3x3 merged tokens, one per grid cell).
    ``vision_out_scale`` multiplies the initial weights of the vision merger's output layer: at
    ``initializer_range`` 0.1 the image tokens otherwise reach the language model at ~130x the
    norm of its text embeddings, too large for its layers to change (the toy MLLM: initializer_range
    0.1, vision_out_scale 0.03; docs/toyworld_log.md)."""
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, hidden_size, num_layers, vision_hidden_size, initializer_range, rope_theta,
                                                                mrope_interleaved))
    if vision_out_scale != 1.0:
        with torch.no_grad():
            out_layer = model.model.visual.merger.mlp[-1]
            out_layer.weight.mul_(vision_out_scale)
            out_layer.bias.mul_(vision_out_scale)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
