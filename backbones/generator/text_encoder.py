"""A generator's own text encoder, loaded the way its diffusers pipeline folder holds it.

Published pipeline folders carry ``text_encoder/`` and ``tokenizer/`` next to
``transformer/`` and name their classes in ``model_index.json``
(``"text_encoder": ["transformers", "UMT5EncoderModel"]`` for Wan, ``T5EncoderModel`` for
Cosmos-Predict2, ``Gemma2Model`` for SANA). The fused model replaces that encoder by the
connector; this module loads it back as a *teacher*: stage 2's distillation
(``stage.distill_weight``) regresses the connector onto what the DiT was trained to read, and
the conditioning-gain instrument compares against it. Toy generator folders
(``fusion/toyworld/pretrain.py``) hold the same two folders in the same classes, so both load
through this one ``from_pretrained`` path.

States follow the family pipelines: the prompt is tokenized padded to ``max_length`` tokens
(Wan and Cosmos-Predict2 pad to 512, SANA to 300; a tokenizer whose ``model_max_length`` is
smaller, as the toy ones, sets the length), the encoder's last hidden state is taken and the
padded positions are zeroed (Wan's pipeline pads with zeros and has no text mask; Cosmos
zeroes them too). The mask marks the real tokens.

Run as::

    from backbones.generator.text_encoder import TextEncoder
    te = TextEncoder.from_pretrained("checkpoints/toy/wan")            # or a published Wan2.1 folder
    states, mask = te.encode(["Draw a red circle at the top left."])   # [B, max_length, text_dim], [B, max_length]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fusion.errors import CheckpointError

#: default padded length of the family pipelines (``max_sequence_length``) by the DiT class name
PIPELINE_LENGTH = {"WanTransformer3DModel": 512, "CosmosTransformer3DModel": 512, "SanaTransformer2DModel": 300}


def pipeline_text_length(path: str | Path) -> int | None:
    """The length a generator folder's pipeline pads its text encoder's states to (``PIPELINE_LENGTH`` of its
    transformer class, capped by ``tokenizer/``'s ``model_max_length``); None when the folder holds no
    tokenizer (a hub id, a tiny test checkpoint, a fused model's generator part: its manifest records it)."""
    p = Path(path)
    cfg = p / "tokenizer" / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    index = json.loads((p / "model_index.json").read_text()) if (p / "model_index.json").is_file() else {}
    length = PIPELINE_LENGTH.get(index.get("transformer", [None, None])[1], 512)
    most = json.loads(cfg.read_text()).get("model_max_length")
    return min(length, int(most)) if isinstance(most, (int, float)) and most > 0 else length


class TextEncoder(nn.Module):
    """Tokenizer + encoder of a generator folder; frozen, eval mode."""

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().requires_grad_(False)
        self.max_length = int(max_length)

    @classmethod
    def has_one(cls, path: str | Path) -> bool:
        p = Path(path)
        return (p / "text_encoder" / "config.json").is_file() and (p / "tokenizer").is_dir()

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> TextEncoder:
        """Load ``<path>/text_encoder`` in the class ``model_index.json`` names and ``<path>/tokenizer``."""
        import transformers
        from transformers import AutoTokenizer

        p = Path(path)
        if not cls.has_one(p):
            raise CheckpointError(f"{p}: no text_encoder/ and tokenizer/ (the generator's own text encoder is needed as the "
                                  "distillation teacher; set stage.distill_weight=0 to train without it)")
        index = json.loads((p / "model_index.json").read_text()) if (p / "model_index.json").is_file() else {}
        entry = index.get("text_encoder")
        if entry is not None:
            name = entry[1]
        else:  # no model index: the encoder's own config names its class
            name = (json.loads((p / "text_encoder" / "config.json").read_text()).get("architectures") or [None])[0]
        enc_cls = getattr(transformers, name or "", None)
        if enc_cls is None:
            raise CheckpointError(f"{p}: text_encoder class {name!r} is not a transformers class")
        tokenizer = AutoTokenizer.from_pretrained(str(p / "tokenizer"))
        encoder = enc_cls.from_pretrained(str(p / "text_encoder"), dtype=dtype).to(device)
        if max_length is None:
            max_length = pipeline_text_length(p) or PIPELINE_LENGTH.get(index.get("transformer", [None, None])[1], 512)
        return cls(tokenizer, encoder, max_length)

    @property
    def dim(self) -> int:
        c = self.encoder.config
        return getattr(c, "d_model", None) or c.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def states(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state with the padded positions zeroed (the pipelines' convention)."""
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return h * mask[..., None].to(h.dtype)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (states [B, max_length, dim], mask [B, max_length])."""
        ids, mask = self.tokenize(texts)
        return self.states(ids, mask).float(), mask


# ---------------------------------------------------------------------------- tiny encoders (tests, toy world)
def word_tokenizer(words: list[str], max_length: int):
    """A word-level fast tokenizer (T5 conventions: ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2), lower-cased,
    words and punctuation split apart; saved and loaded like any tokenizer (``AutoTokenizer``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate([*specials, *sorted(set(words) - set(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length, padding_side="right")


def tiny_encoder(class_name: str, vocab_size: int, dim: int, layers: int = 2, heads: int = 4):
    """A small text encoder of a published family's transformers class: UMT5EncoderModel (Wan),
    T5EncoderModel (Cosmos-Predict2) or Gemma2Model (SANA)."""
    import transformers

    if class_name in ("UMT5EncoderModel", "T5EncoderModel"):
        cfg_cls = transformers.UMT5Config if class_name == "UMT5EncoderModel" else transformers.T5Config
        cfg = cfg_cls(vocab_size=vocab_size, d_model=dim, d_kv=dim // heads, d_ff=2 * dim, num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        return getattr(transformers, class_name)(cfg)
    if class_name == "Gemma2Model":
        cfg = transformers.Gemma2Config(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=heads, head_dim=dim // heads,
                                        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                                        attention_dropout=0.0, sliding_window=512)
        return transformers.Gemma2Model(cfg)
    raise ValueError(f"no tiny builder for text encoder class {class_name!r}; expected UMT5EncoderModel, T5EncoderModel or Gemma2Model")


def save_text_encoder(root: str | Path, encoder: nn.Module, tokenizer) -> None:
    """Write ``text_encoder/`` and ``tokenizer/`` into a pipeline folder and name them in its ``model_index.json``."""
    root = Path(root)
    encoder.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index["text_encoder"] = ["transformers", type(encoder).__name__]
    index["tokenizer"] = ["transformers", type(tokenizer).__name__]
    index_path.write_text(json.dumps(index, indent=2))


#: the words of the tiny checkpoints' tokenizers (tests): the demo data's requests
TINY_WORDS = ("draw paint show make add remove move put change recolour the a an at and with of to in picture image here it is "
              "red green blue yellow purple circle square triangle top bottom left right centre center first then now one two three "
              "please can you me also , . ? !").split()


def make_tiny_text_encoder(root: str | Path, class_name: str, dim: int, max_length: int = 32, seed: int = 0) -> None:
    """A random tiny text encoder of ``class_name`` and its tokenizer into the pipeline folder ``root``."""
    torch.manual_seed(seed)
    tok = word_tokenizer(list(TINY_WORDS), max_length)
    save_text_encoder(root, tiny_encoder(class_name, len(tok), dim, layers=1, heads=2), tok)
