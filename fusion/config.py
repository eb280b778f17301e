"""Structured configs: the typed schema behind every yaml in ``conf/``.

Each config group (``mllm/``, ``stage/``, ``data/``, ``deepspeed/``, ``logger/`` ...) has a
dataclass registered in Hydra's ConfigStore as ``<group>/<name>_schema``; a yaml in the
group names it first in its ``defaults`` list, so an unknown key or a wrong type fails at
compose time with the key's full name, before any model loads. Impossible combinations are
rejected by ``__post_init__`` when :func:`validate` turns the composed config into objects.

Nodes that build an object name it with ``_target_`` (Hydra ``instantiate``); nothing in
the code dispatches on a backbone's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fusion.errors import ConfigError


#: training-timestep modes of fusion.flow.sample_t (stage.timestep_sampling, make_toy dit_t_sampling)
T_SAMPLINGS = ("uniform", "logit_normal", "shifted")
#: optimizers of the toy backbones' pretraining (fusion.toyworld.pretrain.toy_optimizers; make_toy dit_optimizer, mllm_optimizer)
TOY_OPTIMIZERS = ("adamw", "muon")


# ---------------------------------------------------------------------------- mllm

@dataclass
class Qwen25VLConfig:
    """An MLLM checkpoint: Qwen2.5-VL by default (``backbones/mllm/qwen2_5_vl.py``); any adapter on ``backbones/mllm/base.py``
    through ``_target_`` (``mllm_schema``, e.g. ``conf/mllm/tiny_qwen3_vl.yaml``)."""

    _target_: str = "backbones.mllm.qwen2_5_vl.Qwen25VLAdapter.from_pretrained"
    path: str = MISSING
    """Local checkpoint folder or hub id (hub ids need the local cache when HF_HUB_OFFLINE=1)."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa, eager or flash_attention_2."""
    hidden_layers: list[int] = field(default_factory=lambda: [-1])
    """Layers whose hidden states feed the connector (0 = embeddings, -1 = last)."""
    min_pixels: int | None = None
    """Smallest image area in pixels (None: the processor's own)."""
    max_pixels: int | None = None
    """Largest image area in pixels (None: the processor's own)."""
    max_length: int = 8192
    """Longest rendered conversation in tokens; longer samples are data errors."""
    add_bov: bool = True
    """Add <|bov|> to tokenizer and embeddings if the checkpoint lacks it."""
    architecture: dict[str, Any] | None = None
    """The checkpoint's config.json written out in full (published configs): builds the model on the meta device with nothing downloaded (tools/plan.py); a real load warns about every field that differs. None: read it from the local folder."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"mllm.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_length <= 0:
            raise ConfigError(f"mllm.max_length must be positive, got {self.max_length}")
        if not self.hidden_layers:
            raise ConfigError("mllm.hidden_layers must name at least one layer")


# ---------------------------------------------------------------------------- generator
@dataclass
class GeneratorConfig:
    """Fields every generator adapter takes (``backbones/generator/``)."""

    _target_: str = MISSING
    """Adapter constructor, e.g. backbones.generator.wan.WanGenerator.from_pretrained."""
    path: str = MISSING
    """Diffusers pipeline folder (transformer/, vae/) or hub id."""
    dtype: str = "float32"
    """DiT weights dtype: float32, bfloat16 or float16 (the VAE stays float32)."""
    text_dim: int | None = None
    """Text width fed to the DiT; None keeps the checkpoint's. Another value re-initialises only the text projection."""
    scheduler: dict[str, Any] = MISSING
    """Diffusers flow scheduler for sampling (_target_ + kwargs)."""
    image_size: int = 512
    """Default square image side in pixels for generation."""
    text_length: int | None = None
    """Text positions the DiT was pretrained with: its pipeline zero-pads the encoder's states to this length (Wan, Cosmos: 512), and a DiT with no text mask attends those zeros, so shorter conditions (a fixed number of queries) are zero-padded to it. None: the generator folder's tokenizer/ says (its pipeline's length); no tokenizer there: no padding."""
    architecture: dict[str, Any] | None = None
    """The checkpoint's transformer/ and vae/ config.json written out in full (published configs): builds the model on the meta device with nothing downloaded (tools/plan.py); a real load warns about every field that differs. None: read them from the local folder."""

    def __post_init__(self) -> None:
        if self.architecture is not None and not {"transformer", "vae"} <= set(self.architecture):
            raise ConfigError("generator.architecture must have a transformer and a vae entry (their config.json fields)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"generator.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.text_length is not None and self.text_length <= 0:
            raise ConfigError(f"generator.text_length must be positive (or null: read from the folder's tokenizer/), got {self.text_length}")
        if self.text_dim is not None and self.text_dim <= 0:
            raise ConfigError(f"generator.text_dim must be positive, got {self.text_dim}")


@dataclass
class WanGeneratorConfig(GeneratorConfig):
    """Wan2.1 T2V / Wan2.2 TI2V: condition frames by temporal concat with per-token timesteps."""

    _target_: str = "backbones.generator.wan.WanGenerator.from_pretrained"


@dataclass
class CosmosGeneratorConfig(GeneratorConfig):
    """Cosmos-Predict2 / 2.5: condition frames by the condition_mask channel, per-frame timesteps."""

    _target_: str = "backbones.generator.cosmos.CosmosGenerator.from_pretrained"
    cond_timestep: float = 1e-4
    """Timestep given to clean condition frames (the pipelines' conditional-frame timestep)."""


@dataclass
class SanaGeneratorConfig(GeneratorConfig):
    """SANA: images through the MLLM only, or in-context side by side."""

    _target_: str = "backbones.generator.sana.SanaGenerator.from_pretrained"
    condition_mode: str = "mllm_only"
    """mllm_only (earlier images reach the DiT through the MLLM) or spatial_concat (in-context)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.condition_mode not in ("mllm_only", "spatial_concat"):
            raise ConfigError(f"generator.condition_mode must be mllm_only or spatial_concat, got {self.condition_mode!r}")


# ---------------------------------------------------------------------------- connector
@dataclass
class ConnectorBase:
    """Fields every connector takes; widths come from the backbones at build time."""

    _target_: str = MISSING
    """Connector class under connectors/."""
    out_norm: str = "rms"
    """Output norm matching the statistics the DiT expects: rms (RMSNorm with gain out_gain), rms_gated
    (that RMSNorm times a learned per-token gate in (0, 1), so a token can fade to the zero padding
    published DiTs saw at unused text positions) or none."""
    out_gain: float = 1.0
    """Initial gain of the output RMSNorm (rms, rms_gated)."""
    refiner_layers: int = 0
    """Layers of a bidirectional transformer over the connector's output tokens before the output norm (connectors/common.py
    Refiner), so a token can read the words after it as the DiT's own bidirectional text encoder does; 0: none."""
    refiner_heads: int = 4
    """Attention heads of the refiner (must divide its width)."""
    refiner_width: int | None = None
    """Width of the refiner (None: the generator's text width). Otherwise (wider, or narrower for a wide DiT text width)
    the tokens are lifted into it and its output added back through a projection that starts near zero."""

    def __post_init__(self) -> None:
        if self.out_norm not in ("rms", "rms_gated", "none"):
            raise ConfigError(f"connector.out_norm must be rms, rms_gated or none, got {self.out_norm!r}")
        if self.refiner_layers < 0:
            raise ConfigError(f"connector.refiner_layers must be >= 0, got {self.refiner_layers}")
        if self.refiner_width is not None and (self.refiner_width < 1 or self.refiner_width % self.refiner_heads):
            raise ConfigError(f"connector.refiner_width must be a positive multiple of connector.refiner_heads={self.refiner_heads}, "
                              f"got {self.refiner_width}")


@dataclass
class LastMLPConfig(ConnectorBase):
    """last_mlp: last-layer hidden states -> MLP -> text_dim."""

    _target_: str = "connectors.last_mlp.LastMLP"
    hidden_mult: float = 1.0
    """MLP hidden width as a multiple of text_dim."""
    mlp_depth: int = 2
    """Linear layers in the MLP."""


@dataclass
class MultilayerConcatConfig(ConnectorBase):
    """multilayer_concat: per-token-normalised layers concatenated along channels, projected."""

    _target_: str = "connectors.multilayer_concat.MultilayerConcat"
    layers: list[int] | None = None
    """MLLM layers to concatenate (None: every decoder layer, 1..N)."""
    projection: str = "linear"
    """identity (the DiT's text width is the concatenation), linear or mlp."""
    hidden_mult: float = 1.0
    """Hidden width of the mlp projection as a multiple of text_dim."""
    window: int = 1
    """Tokens the linear projection reads for each output token, centred on it (odd; > 1: a 1-D convolution over the
    sequence, so a word's state also carries its neighbours', e.g. the colour before a shape word)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.window % 2 == 0:
            raise ConfigError(f"connector.window must be a positive odd number, got {self.window}")
        if self.window > 1 and self.projection != "linear":
            raise ConfigError(f"connector.window={self.window} needs connector.projection=linear, got {self.projection!r}")


@dataclass
class LayerMixConfig(ConnectorBase):
    """layer_mix: learned softmax weights over layers, then an MLP."""

    _target_: str = "connectors.layer_mix.LayerMix"
    layers: list[int] | None = None
    """MLLM layers to mix (None: every decoder layer)."""
    hidden_mult: float = 1.0
    """MLP hidden width as a multiple of text_dim."""
    mlp_depth: int = 2
    """Linear layers in the MLP."""


@dataclass
class QueriesConfig(ConnectorBase):
    """queries: learnable queries after <|bov|> + bidirectional encoder (MetaQuery / BLIP3-o)."""

    _target_: str = "connectors.queries.Queries"
    num_queries: int = 64
    """Number of learnable query embeddings."""
    encoder_layers: int = 2
    """Layers of the bidirectional transformer encoder."""
    encoder_heads: int = 4
    """Attention heads of the encoder (must divide the MLLM width)."""
    layers: list[int] | None = None
    """MLLM layers read at the query positions (None: the last)."""


@dataclass
class MultiscaleQueriesConfig(ConnectorBase):
    """multiscale_queries: per-grid query groups with start/end markers + alignment loss (Ming-Lite-Uni)."""

    _target_: str = "connectors.multiscale_queries.MultiscaleQueries"
    scales: list[int] = field(default_factory=lambda: [4, 8, 16])
    """Grid side of each query group."""
    encoder_layers: int = 2
    """Layers of the bidirectional transformer encoder."""
    encoder_heads: int = 4
    """Attention heads of the encoder."""
    layers: list[int] | None = None
    """MLLM layers read at the query positions (None: the last)."""
    align_layer: int = 1
    """DiT block whose output is aligned with the MLLM's semantic states."""
    align_weight: float = 0.5
    """Weight of the multi-scale representation alignment loss (0: off)."""


# ---------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Interleaved conversations, one JSONL line each (``fusion/data.py``)."""

    path: str = MISSING
    """JSONL file of conversations (data.format=hf: a datasets folder, or parquet / arrow files)."""
    format: str = "unifuse"
    """unifuse (Qwen-VL chat JSONL), sharegpt (LLaMA-Factory's multimodal ShareGPT JSONL) or hf (a local Hugging Face datasets set); fusion/formats.py."""
    image_root: str | None = None
    """Folder that relative image paths are resolved against (default: the JSONL's folder)."""
    on_error: str = "error"
    """What a bad sample does: 'error' stops with file:line, 'skip' counts it and goes on."""
    num_workers: int = 0
    """DataLoader worker processes."""
    seed: int = 0
    """Seed of the sampler's shuffling."""
    allow_outside_root: bool = False
    """Allow image paths that resolve outside image_root (absolute paths elsewhere, ``..``, symlinks out)."""
    prevalidate: bool = True
    """Decode every image and render every sample once before the first step (set false for huge data: checks then run lazily)."""
    max_image_pixels: int = 89_478_485
    """Images whose header declares more pixels are refused before decoding (image_too_large); default: PIL's decompression-bomb threshold."""
    buckets: Any = None
    """Stage 2: aspect-ratio buckets (fusion/buckets.py): null (one square, stage.image_size or the generator's), a list of HxW sizes
    (["64x64", "48x80", "80x48"]) or generator (the family's published sizes scaled to that square's area). Each conversation goes to
    the bucket nearest its last assistant image's aspect (all its images resized to cover it and centre-cropped); micro-batches hold
    one bucket each (with data.streaming they may mix: the DiT then runs one pass per bucket)."""
    render_cache_mb: int = 4096
    """Stage 1: keep each sample's rendering made by prevalidation (token ids, labels, pixel tensors) in memory, up to this many MB,
    so training never renders a sample again (samples past the budget are rendered at each step); 0: off."""
    streaming: bool = False
    """Read the samples as training consumes them (any format; hf through datasets' streaming mode), never the whole set in memory:
    a buffered shuffle per epoch, rows sharded by rank, exact resume; checks run per sample (no prevalidation), no feature cache,
    no loader workers."""
    shuffle_buffer: int = 10_000
    """data.streaming: samples held in the shuffle buffer (the shuffle mixes within about this many consecutive samples)."""

    def __post_init__(self) -> None:
        if self.format not in ("unifuse", "sharegpt", "hf"):
            raise ConfigError(f"data.format must be unifuse, sharegpt or hf, got {self.format!r}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"data.max_image_pixels must be positive, got {self.max_image_pixels}")
        if self.on_error not in ("error", "skip"):
            raise ConfigError(f"data.on_error must be 'error' or 'skip', got {self.on_error!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.render_cache_mb < 0:
            raise ConfigError(f"data.render_cache_mb must be >= 0, got {self.render_cache_mb}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


# ---------------------------------------------------------------------------- stage
@dataclass
class LoraConfig:
    """peft LoRA settings for a part that trains with ``lora``."""

    r: int = 16
    """Rank."""
    alpha: int = 32
    """Scaling numerator (lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names LoRA wraps."""


@dataclass
class TrainableConfig:
    """What trains in a stage: each part is 'full', 'lora' or 'frozen' (connector: bool)."""

    mllm: str = "frozen"
    """Language model of the MLLM: full, lora or frozen."""
    vision_tower: bool = False
    """Train the MLLM's vision encoder and merger too."""
    connector: bool = False
    """Train the connector."""
    generator: str = "frozen"
    """The DiT: full, lora or frozen (VAE and MLLM vision tower never train in align)."""

    def __post_init__(self) -> None:
        for key in ("mllm", "generator"):
            v = getattr(self, key)
            if v not in ("full", "lora", "frozen"):
                raise ConfigError(f"stage.trainable.{key} must be full, lora or frozen, got {v!r}")


DISTILL_TARGETS = ("velocity", "states", "set", "aligned")


@dataclass
class StageConfig:
    """One training stage (sft: MLLM next-token loss; align: connector + DiT flow matching)."""

    name: str = MISSING
    """'sft' or 'align'."""
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    """Which parts train (torchtune-style explicit trainable set)."""
    lora_mllm: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings when trainable.mllm is 'lora'."""
    lora_generator: LoraConfig = field(default_factory=lambda: LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    """LoRA settings when trainable.generator is 'lora'."""
    lr: float = 1e-4
    """Peak learning rate."""
    adam_fused: bool = True
    """AdamW in one fused kernel (CPUs and GPUs; 3-4x the foreach step on this CPU, the same update to rounding); false:
    torch's foreach implementation (conf/experiment/toy_sft.yaml keeps it: the toy recipe's stage-1 figures were measured
    with it)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    max_steps: int = 100
    """Optimizer steps."""
    stop_before_generator: bool = False
    """align: stop, with a checkpoint, before the first step that trains on the generator's outputs (the flow loss, the
    velocity distillation target; FusedModel.reads_generator), or at ``max_steps``: no export; the same command without it goes on from there
    (``resume=auto``; the schedule is that of ``max_steps``). With ``resume_generator=folder`` that run may read
    another copy of the generator: ``make demo`` runs stage 2's distillation warm-up (connector only) this way on the
    toy DiT's early snapshot, beside the DiT's last pretraining steps (tools/demo.py). Such a run measures no conditioning
    gain (the copy it would measure need not be the one the run goes on with)."""
    micro_batch_size: int = 1
    """Samples per rank per forward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed of initialisation, dropout and noise."""
    log_every: int = 10
    """Steps between logged metrics."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Per-part learning-rate multipliers: mllm, vision_tower, connector, generator (default 1)."""
    timestep_sampling: str = "logit_normal"
    """align: training t ~ uniform, logit_normal (SD3) or shifted (uniform, then shifted by time_shift)."""
    logit_mean: float = 0.0
    """align: mean of the logit-normal."""
    logit_std: float = 1.0
    """align: std of the logit-normal."""
    time_shift: float = 1.0
    """align: shift of the 'shifted' sampling."""
    p_drop_text: float = 0.1
    """align: probability that a sample's text condition is dropped (classifier-free guidance)."""
    p_drop_cond: float = 0.1
    """align: probability that a sample's condition frames are dropped."""
    text_dropout_form: str = "null"
    """align: what a dropped text condition becomes: null (zeros) or duogen (context without its final text chunk)."""
    include_bov: bool = True
    """align: whether the context given to the connector ends with <|bov|>."""
    connector_span: str = "all"
    """align: which context tokens the connector reads and hands the DiT: all (the whole conversation so far) or
    since_image (the tokens after the context's last image: the request, e.g. the user's edit and the assistant's
    words before <|bov|>; the whole context for a first drawing). The MLLM still reads everything (its states
    carry the history); only the connector's window shrinks. Per-token connectors only (not queries /
    multiscale_queries); not with text_dropout_form=duogen (its negative ends at the last image: nothing is left)."""
    target_image: str = "last"
    """align: which assistant image of a sample is the target: last or random."""
    image_size: int | None = None
    """align: target side in pixels (None: the generator's image_size)."""
    lr_schedule: str = "constant"
    """After warm-up: constant or cosine (to 0 at max_steps)."""
    ema_decay: float = 0.0
    """EMA of the trained weights (0: off); the export uses the EMA weights. ZeRO 0-2 only."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (0: all)."""
    checkpoint_checksums: bool = True
    """Record a sha256 of every checkpoint file (files.json) and check it before resuming; false: sizes only (faster for huge ZeRO-3 shards)."""
    on_nonfinite: str = "skip_step"
    """A NaN / Inf loss or gradient: skip_step (no update, counted as nonfinite_steps) or stop (exit naming the step)."""
    max_nonfinite_in_a_row: int = 20
    """skip_step: stop anyway after this many non-finite steps in a row (the run diverged)."""
    sample_every: int = 0
    """align: draw an image every N steps into samples/ and the logger (0: never)."""
    sample_steps: int = 8
    """align: sampler steps of those images."""
    sample_guidance: float = 3.0
    """align: guidance scale of those images."""
    merge_lora_on_export: bool = True
    """sft: merge an MLLM LoRA into its weights in the final export (stage 2 reads plain weights)."""
    batching: str = "packed"
    """How the MLLM sees a micro-batch: packed (samples end to end, block-diagonal attention, almost no padding), padded (one right-padded row per sample) or none (one forward per sample); the loss is the same. align (uncached): packed runs the frozen MLLM once over all contexts, else once per context."""
    dit_batching: str = "grouped"
    """align: how the DiT sees a micro-batch: grouped (one forward/backward per group of samples sharing a target size and number of condition frames, texts of different lengths padded and masked; a per-token connector reads every sample's cached or packed states in one padded, masked call) or none (one forward per sample, one connector call per sample); the loss is the same."""
    pack_length: int | None = None
    """Tokens per packed row (None: the longest sample of the micro-batch, so a row is never longer than a padded one; measured fastest here)."""
    gradient_checkpointing: list[str] = field(default_factory=list)
    """Parts that recompute activations in backward to save memory: mllm, vision_tower, generator."""
    compile: bool = False
    """torch.compile the parts that train (off by default: it pays off on GPUs, not in short CPU runs)."""
    distill_steps: int = 0
    """align: warm-up steps whose loss is the distillation alone (the connector learns to say what the DiT already reads from its own text encoder, loaded from <generator.path>/text_encoder); 0: none."""
    distill_weight: float = 0.0
    """align: weight of the distillation term added to the flow loss after the warm-up (0: off)."""
    distill_target: str = "velocity"
    """align: velocity (the DiT's velocity from the connector's states regresses onto its velocity from its own encoder's states: any connector, any length) or states (the states themselves: the connector must emit the encoder's padded length, e.g. connector=resampler) or set (the states as a set: each of the encoder's real tokens matched one-to-one to a connector token, the rest onto zero; for DiTs with no position signal on their text: any connector, any length) or aligned (each of the encoder's tokens onto the context token that ends the same word, found by characters across the two tokenizers, every other context token onto zero; per-token connectors; fusion/distill.py)."""
    distill_target_late: str | None = None
    """align: the distillation target from step ``distill_target_switch`` on (velocity, states, set or aligned; None:
    ``distill_target`` throughout). For the connectors with a fixed number of tokens on the toy world: ``set`` first
    (cheap, no DiT pass: the tokens come close to the teacher's), then ``velocity`` (the frozen DiT judges them: what
    it reads differs from what is close; docs/toyworld_log.md, "A shorter joint phase")."""
    distill_target_switch: int = 0
    """align: the step at which ``distill_target_late`` takes over (``stage.distill_data`` is read before it only)."""
    distill_keep_weight: float = 0.0
    """align, with ``distill_target_late``: the early target's loss (states, set or aligned: no DiT pass) kept beside
    the late one from the switch on, at this weight (0: the late target alone). On the toy world the velocity target
    alone let the resampler's gate close every token first ("say nothing"; docs/toyworld_log.md, "A fresh-clone demo
    measured ...")."""
    lr_late_scale: float = 1.0
    """align, with ``distill_target_late``: every part's learning rate multiplied by this from ``distill_target_switch``
    on (1: the schedule unchanged), so the late target trains at its own rate after the early one's warm-up, in one
    run (the resampler in ``make ablation``: 0.25; docs/toyworld_log.md, "The connector ablation from one command")."""
    distill_data: str | None = None
    """align: a JSONL of extra conversations (the data format; an assistant's drawing may be an image item with no file,
    ``{"type": "image"}``: text only) whose requests the distillation warm-up also reads (stage.distill_steps; states,
    set or aligned targets): the connector learns to say what the DiT reads for words the image data lacks (GlueGen's
    text-only alignment). Never in the flow loss: no image of it is learned from. None: the training data alone."""
    distill_data_batch: int = 4
    """align, stage.distill_data: its samples added to each warm-up micro-batch (drawn at random, seeded by the step)."""
    generator_frozen_steps: int = 0
    """align: steps at the start in which the DiT does not move (learning rate 0) while the connector learns to carry the text; keeps a DiT from eroding its own conditioning while the connector carries nothing."""
    gain_every: int = 100
    """align: steps between conditioning-gain measurements (loss with true vs zero vs shuffled states on a fixed batch, fusion/gain.py); 0: never."""
    gain_samples: int = 16
    """align: conversations in the fixed gain batch (held out of training when the data has at least 10x as many)."""
    gain_rows: int = 32
    """align: rows (sample, t, condition) per no-grad DiT pass of the gain measurement (fusion.gain.conditioning_gain);
    lower it where a large DiT runs out of memory there. Toy world: 2.1 s instead of 4.1 s with one row a pass."""
    frame_select: str = "all"
    """align: which earlier images become the DiT's condition frames: all, latest (the most recent one) or learned (a small head on the MLLM's states picks one, or none, trained in stage 2 from which frame the DiT's own flow loss prefers; fusion/frames.py)."""
    frame_select_t: float = 0.8
    """align, frame_select=learned: the time at which the DiT's flow losses with each single frame are compared."""
    frame_select_weight: float = 0.1
    """align, frame_select=learned: weight of the head's cross-entropy in the stage-2 loss. Adam's updates of the head
    hardly depend on it, but the gradient clipping (deepspeed.gradient_clipping) sees one norm over every part: at 1.0
    the head's early cross-entropy spikes held the connector back (toy world: distillation loss 0.061
    vs 0.057 at steps 2500-3000), at 0.1 the connector learns as without the head (0.058)."""
    frame_label_memo: bool = False
    """align, frame_select=learned: while the DiT is frozen (stage.generator_frozen_steps, or throughout with
    stage.trainable.generator=frozen) the frame it prefers for a
    sample is computed once per (conversation, condition frames), from stage.frame_label_draws fixed noises, and reused
    (false: two DiT passes every step, with the step's noise). Toy recipe: stage 2 in 1090 s instead of 1294 s, but the
    head picked 6 wrong frames of the test and fresh sets' turns instead of 2 (docs/toyworld_log.md, "Stage 2's frame labels, once
    per sample"; with 8 draws 7 wrong): off by default."""
    frame_label_draws: int = 2
    """align, stage.frame_label_memo: noises each memoised label averages the DiT's flow losses over."""
    gain_warn: float = 0.05
    """align: warn when the gain is below this after the warm-up (the DiT is not using the connector's states), at the t
    where the DiT's own text encoder gains most (t=0.7 when the generator has none; fusion.gain.gain_warning)."""
    erosion_warn: float = 0.25
    """align: warn when the DiT's own-encoder gain (its conditioning on its own text encoder, measured beside the
    connector's) has fallen at some t by more than this share of its highest value since the run started (or resumed): stage 2 is
    wearing away what the DiT read before, and the gain ratio (fused / own) then flatters the connector
    (fusion.gain.erosion_warning; toy resampler with the DiT at 2.5e-4: own gain at t=0.5 0.357 -> -0.079, at t=0.7
    0.736 -> 0.247, while the ratio rose to 0.956 and text-to-image fell; an earlier toy recipe's joint steps at 0.1x: at most
    -10%). 0: off. Needs the generator's text encoder."""

    def __post_init__(self) -> None:
        if self.name not in ("sft", "align"):
            raise ConfigError(f"stage.name must be 'sft' or 'align', got {self.name!r}")
        if self.name == "align" and self.trainable.mllm != "frozen":
            raise ConfigError("stage.trainable.mllm must be 'frozen' in stage=align (the MLLM is frozen in stage 2)")
        if self.name == "sft" and self.trainable.mllm == "frozen" and not self.trainable.vision_tower:
            raise ConfigError("stage=sft with stage.trainable.mllm=frozen trains nothing")
        if self.timestep_sampling not in T_SAMPLINGS:
            raise ConfigError(f"stage.timestep_sampling must be uniform, logit_normal or shifted, got {self.timestep_sampling!r}")
        for key in ("p_drop_text", "p_drop_cond"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"stage.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.text_dropout_form not in ("null", "duogen"):
            raise ConfigError(f"stage.text_dropout_form must be null or duogen, got {self.text_dropout_form!r}")
        if self.connector_span not in ("all", "since_image"):
            raise ConfigError(f"stage.connector_span must be all or since_image, got {self.connector_span!r}")
        if self.connector_span == "since_image" and self.text_dropout_form == "duogen":
            raise ConfigError("stage.connector_span=since_image cannot take text_dropout_form=duogen: the DuoGen negative "
                              "is the context up to the last image, where the connector's window holds no token (use null)")
        if self.target_image not in ("last", "random"):
            raise ConfigError(f"stage.target_image must be last or random, got {self.target_image!r}")
        unknown = set(self.lr_scale) - {"mllm", "vision_tower", "connector", "generator", "frame_selector"}
        if unknown:
            raise ConfigError(f"stage.lr_scale has unknown parts {sorted(unknown)}; use mllm, vision_tower, connector, generator, frame_selector")
        if self.frame_select not in ("all", "latest", "learned"):
            raise ConfigError(f"stage.frame_select must be all, latest or learned, got {self.frame_select!r}")
        if not 0.0 < self.frame_select_t <= 1.0:
            raise ConfigError(f"stage.frame_select_t must be in (0, 1], got {self.frame_select_t}")
        if self.frame_select_weight < 0:
            raise ConfigError(f"stage.frame_select_weight must be >= 0, got {self.frame_select_weight}")
        if self.batching not in ("packed", "padded", "none"):
            raise ConfigError(f"stage.batching must be packed, padded or none, got {self.batching!r}")
        if self.dit_batching not in ("grouped", "none"):
            raise ConfigError(f"stage.dit_batching must be grouped or none, got {self.dit_batching!r}")
        if self.pack_length is not None and self.pack_length <= 0:
            raise ConfigError(f"stage.pack_length must be positive, got {self.pack_length}")
        bad = set(self.gradient_checkpointing) - {"mllm", "vision_tower", "generator"}
        if bad:
            raise ConfigError(f"stage.gradient_checkpointing has unknown parts {sorted(bad)}; use mllm, vision_tower, generator")
        if self.on_nonfinite not in ("skip_step", "stop"):
            raise ConfigError(f"stage.on_nonfinite must be skip_step or stop, got {self.on_nonfinite!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"stage.lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"stage.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.distill_target not in DISTILL_TARGETS:
            raise ConfigError(f"stage.distill_target must be velocity, states, set or aligned, got {self.distill_target!r}")
        if self.distill_target_late is not None:
            if self.distill_target_late not in DISTILL_TARGETS:
                raise ConfigError(f"stage.distill_target_late must be velocity, states, set or aligned (or null), got {self.distill_target_late!r}")
            if self.distill_target_switch <= 0:
                raise ConfigError("stage.distill_target_late needs stage.distill_target_switch > 0 (the step it takes over at)")
        if self.distill_keep_weight < 0:
            raise ConfigError(f"stage.distill_keep_weight must be >= 0, got {self.distill_keep_weight}")
        if self.distill_keep_weight > 0 and (self.distill_target_late is None or self.distill_target == "velocity"
                                             or self.distill_target == self.distill_target_late):
            raise ConfigError("stage.distill_keep_weight keeps the early distillation target beside stage.distill_target_late: it needs "
                              "distill_target_late set and distill_target states, set or aligned (and different from it)")
        if self.lr_late_scale <= 0:
            raise ConfigError(f"stage.lr_late_scale must be > 0, got {self.lr_late_scale}")
        if self.lr_late_scale != 1.0 and self.distill_target_late is None:
            raise ConfigError("stage.lr_late_scale scales the learning rate from stage.distill_target_switch on: "
                              "it needs stage.distill_target_late set")
        if self.frame_label_draws < 1:
            raise ConfigError(f"stage.frame_label_draws must be >= 1, got {self.frame_label_draws}")
        for key in ("distill_steps", "generator_frozen_steps", "gain_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"stage.{key} must be >= 0, got {getattr(self, key)}")
        if self.distill_data is not None:
            if not self.distill_steps:
                raise ConfigError("stage.distill_data is read by the distillation warm-up: set stage.distill_steps > 0")
            if self.distill_target == "velocity":
                raise ConfigError("stage.distill_data needs a warm-up on the states (stage.distill_target=states, set or aligned): "
                                  "the velocity target would run the DiT on its text-only samples' missing drawings")
            if self.distill_data_batch < 1:
                raise ConfigError(f"stage.distill_data_batch must be >= 1, got {self.distill_data_batch}")
        if self.distill_weight < 0:
            raise ConfigError(f"stage.distill_weight must be >= 0, got {self.distill_weight}")
        if not 0 <= self.erosion_warn < 1:
            raise ConfigError(f"stage.erosion_warn must be in [0, 1) (a share of the DiT's highest own-encoder gain so far; 0: off), "
                              f"got {self.erosion_warn}")
        if self.gain_every and self.gain_samples < 2:
            raise ConfigError(f"stage.gain_samples must be >= 2 (one to shuffle with), got {self.gain_samples}")
        if self.gain_rows < 1:
            raise ConfigError(f"stage.gain_rows must be >= 1 (rows per DiT pass of the gain measurement), got {self.gain_rows}")
        if self.lr <= 0 or self.max_steps <= 0 or self.micro_batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("stage.lr, stage.max_steps, stage.micro_batch_size and stage.grad_accum must be positive")
        if self.stop_before_generator and self.name != "align":
            raise ConfigError("stage.stop_before_generator is for stage=align (it stops before the first step that runs the generator)")


# ---------------------------------------------------------------------------- deepspeed
@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO settings; turned into a DeepSpeed json by the trainer."""

    zero_stage: int = 2
    """ZeRO stage: 0, 1, 2 or 3."""
    offload_optimizer: str = "none"
    """Optimizer-state offload: none, cpu or nvme."""
    offload_param: str = "none"
    """Parameter offload (ZeRO-3 only): none, cpu or nvme."""
    nvme_path: str | None = None
    """Folder for nvme offload."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (every shipped config sets one)."""
    bf16: str = "auto"
    """bf16 mixed precision: auto (on where the device supports it), true or false."""
    overlap_comm: bool = True
    """Overlap reduction with backward."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket."""
    stage3_gather_16bit_weights_on_model_save: bool = False
    """ZeRO-3: gather full weights at save (off: save shards, convert with zero_to_fp32)."""
    single_rank_zero0: bool = True
    """A run on one rank with zero_stage 1 or 2 and no offload runs as ZeRO-0: there is nothing to partition, while ZeRO 1/2 still pay
    a reduce hook per parameter every step (tools/bench.py stage1_overhead); the update is the same. false: keep the stage as written."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) not in ("none", "cpu", "nvme"):
                raise ConfigError(f"deepspeed.{key} must be none, cpu or nvme, got {getattr(self, key)!r}")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        if "nvme" in (self.offload_param, self.offload_optimizer) and not self.nvme_path:
            raise ConfigError("deepspeed.nvme_path is required for nvme offload")
        if str(self.bf16).lower() not in ("auto", "true", "false"):  # a command-line false arrives as 'False'
            raise ConfigError(f"deepspeed.bf16 must be auto, true or false, got {self.bf16!r}")
        if self.gradient_clipping <= 0:
            raise ConfigError("deepspeed.gradient_clipping must be positive (unclipped ZeRO runs diverge)")


# ---------------------------------------------------------------------------- feature cache
@dataclass
class CacheConfig:
    """Stage-2 feature cache (``fusion/feature_cache.py``): the frozen MLLM's states and the VAE latents, computed once."""

    mode: str = "off"
    """off; build (build or reuse a matching cache, then train from it); use (train from a matching cache, never load the MLLM; refuse if none); auto (use, else build)."""
    dir: str = "cache/features"
    """Folder of the caches, one sub-folder per key (a hash of MLLM, layers, image size, VAE and data)."""
    dtype: str = "auto"
    """Stored dtype of the hidden states: auto (the MLLM's), float32, bfloat16 or float16."""
    shard_samples: int = 512
    """Conversations per safetensors shard."""

    def __post_init__(self) -> None:
        if self.mode not in ("off", "build", "use", "auto"):
            raise ConfigError(f"cache.mode must be off, build, use or auto, got {self.mode!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"cache.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.shard_samples <= 0:
            raise ConfigError(f"cache.shard_samples must be positive, got {self.shard_samples}")


# ---------------------------------------------------------------------------- logger
@dataclass
class LoggerConfig:
    """Metric logger (``fusion/loggers.py``)."""

    _target_: str = "fusion.loggers.JsonlLogger"
    """Logger class."""
    project: str = "unifuse"
    """Project name (wandb)."""
    mode: str = "offline"
    """wandb mode: online, offline or disabled."""


# ---------------------------------------------------------------------------- top level
@dataclass
class Config:
    """The composed run config (``conf/config.yaml``)."""

    mllm: Any = MISSING
    """MLLM backbone (group mllm/)."""
    generator: Any = None
    """Generator backbone (group generator/)."""
    connector: Any = None
    """Connector design (group connector/)."""
    stage: StageConfig | None = None
    """Training stage (group stage/)."""
    data: DataConfig | None = None
    """Data (group data/)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed (group deepspeed/)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Logger (group logger/)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Stage-2 feature cache (group cache/: off, build, use, auto)."""
    tiny_dir: str = "checkpoints/tiny"
    """Where ``tools/make_tiny.py`` wrote the tiny checkpoints (used by */tiny.yaml)."""
    toy_dir: str = "checkpoints/toy"
    """Where ``tools/make_toy.py`` wrote the toy world and the toy-pretrained backbones (used by */toy*.yaml)."""
    output_dir: str = "outputs/run"
    """Run output folder."""
    device: str = "cpu"
    """Device for single-process tools (cpu, cuda, cuda:1 ...)."""
    seed: int = 0
    """Global seed."""
    max_new_tokens: int = 32
    """Demo: text tokens decoded per turn."""
    init_from: str | None = None
    """stage=align: the stage-1 output (run folder or its final/ export), or 'base' to align the base MLLM."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), never, or a checkpoint folder."""
    resume_generator: str = "checkpoint"
    """stage=align, on resume: the generator's weights from the checkpoint (``checkpoint``) or as this run loaded them
    from ``generator.path`` (``folder``): for a checkpoint written while the generator had not yet moved (step <=
    ``stage.generator_frozen_steps``) by a run that never ran it (``stage.stop_before_generator``) and read another copy
    of it, such as ``make demo``'s distillation warm-up beside the toy DiT's pretraining (tools/demo.py). The
    distillation teacher (``generator.path/text_encoder``) must be the one the checkpoint's run read; ZeRO 0-2 (with ZeRO-1/2 and bf16 the optimizer's fp32 master weights are
    read again from the module's). Past ``stage.generator_frozen_steps`` the checkpoint's weights are the run's own and
    are kept (so a stopped run goes on with the same command). A generator that never trains
    (``stage.trainable.generator=frozen``, the toy recipe) is the folder's at every resume; where the checkpoint's weights
    are the folder's already nothing is restored or refused. The generator's weights are copied to the CPU on each rank
    for the restore: host memory for a large DiT."""
    stages: list[str] = field(default_factory=lambda: ["sft", "align"])
    """The experiment's stage configs in order (conf/stage/ names): tools/plan.py plans each; tools/train.py runs the one in ``stage``."""


@dataclass
class PlanConfig(Config):
    """``tools/plan.py``: exact parameter counts on the meta device and per-GPU memory per stage."""

    nodes: int = 1
    """Nodes."""
    gpus_per_node: int = 8
    """GPUs per node."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GB (GiB, as torch reports it)."""
    cpu_memory_gb: float | None = None
    """CPU memory per node in GB for the offload rows (None: not checked)."""
    reserve_gb: float = 4.0
    """Per-GPU memory set aside for the CUDA context, allocator fragmentation, communication buckets and transients."""
    micro_batch: int | None = None
    """Samples per GPU per forward (None: the stage's micro_batch_size)."""
    seq_len: int | None = None
    """Tokens per sample: stage 1 a packed row, stage 2 the context before the target image (None: stage.pack_length if set, else 2048)."""
    image_size: int | None = None
    """Target image side in pixels (None: the stage's image_size, else the generator's)."""
    cond_frames: int = 1
    """Earlier images given to the DiT as condition frames (stage 2)."""
    output_dir: str = "outputs/plan"
    """Where plan.json and plan.md go."""

    def __post_init__(self) -> None:
        if min(self.nodes, self.gpus_per_node) <= 0 or self.gpu_memory_gb <= 0 or (self.seq_len or 1) <= 0 or self.cond_frames < 0:
            raise ConfigError("nodes, gpus_per_node, gpu_memory_gb and seq_len must be positive, cond_frames >= 0")
        if self.micro_batch is not None and self.micro_batch <= 0:
            raise ConfigError(f"micro_batch must be positive, got {self.micro_batch}")


@dataclass
class ValidateDataConfig(Config):
    """``tools/validate_data.py``: every check of the training loader over a data file, before training."""

    report: str | None = None
    """Also write the report as JSON here."""
    check_length: bool = True
    """Render each sample with the MLLM's processor (mllm.path, a local folder) to check mllm.max_length; skipped with a note when the folder is absent."""


@dataclass
class MakeTinyConfig:
    """``tools/make_tiny.py``: which tiny checkpoints to write and where."""

    out_dir: str = "checkpoints/tiny"
    """Folder that receives one sub-folder per part."""
    seed: int = 0
    """Initialisation seed."""
    skip_existing: bool = False
    """Leave parts whose folder already exists untouched."""
    parts: dict[str, Any] = field(
        default_factory=lambda: {
            "qwen2_5_vl": {"_target_": "backbones.mllm.tiny_qwen2_5_vl.make_tiny", "_partial_": True},
            "wan": {"_target_": "backbones.generator.wan.make_tiny", "_partial_": True},
            "wan2_2": {"_target_": "backbones.generator.wan.make_tiny", "_partial_": True, "variant": "2.2"},
            "cosmos": {"_target_": "backbones.generator.cosmos.make_tiny", "_partial_": True, "variant": "2.5"},
            "cosmos2": {"_target_": "backbones.generator.cosmos.make_tiny", "_partial_": True, "variant": "2"},
            "sana": {"_target_": "backbones.generator.sana.make_tiny", "_partial_": True},
            "demo_data": {"_target_": "fusion.demo_data.make_demo_data", "_partial_": True},
        }
    )
    """Part name -> partial builder called as builder(out_dir=..., seed=..., name=part)."""


@dataclass
class ChatSettingsConfig:
    """What a chat decodes and draws with (``fusion.generate.GenerationSettings``): shared by ``tools/generate.py`` and
    ``tools/chat_ui.py``."""

    model: str = MISSING
    """A fused-model folder written by save_pretrained (a run's final/): any generator family, any connector."""
    device: str = "cpu"
    """cpu, cuda, cuda:1 ..."""
    system: str | None = None
    """System prompt (None: the chat template's default)."""
    max_image_pixels: int = 89_478_485
    """Images whose header declares more pixels are refused before decoding (image_too_large)."""
    max_new_tokens: int = 256
    """Text tokens per assistant turn."""
    max_images_per_turn: int = 4
    """Images per assistant turn."""
    steps: int = 20
    """DiT sampler steps."""
    guidance: float = 4.0
    """Text guidance scale."""
    image_guidance: float = 1.0
    """Condition-frame guidance scale (1: off)."""
    negative: str = "auto"
    """Text-guidance negative: auto (what stage 2 trained with, from the model's manifest; null if unknown), duogen (the prefix up to the last image) or null (zeros). A choice other than the trained one is kept, with a warning."""
    seed: int = 0
    """Seed of the images (image i: seed + i) and of text sampling."""

    def __post_init__(self) -> None:
        if self.negative not in ("auto", "duogen", "null"):
            raise ConfigError(f"negative must be auto, duogen or null, got {self.negative!r}")
        if self.steps <= 0 or self.max_new_tokens <= 0 or self.max_images_per_turn < 0:
            raise ConfigError("steps and max_new_tokens must be positive, max_images_per_turn >= 0")
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be positive, got {self.max_image_pixels}")


@dataclass
class GenerateConfig(ChatSettingsConfig):
    """``tools/generate.py``: one prompt or a scripted multi-turn chat with a saved fused model."""

    prompt: str | None = None
    """One user turn."""
    image: Any = None
    """Images attached to the prompt: image=a.png or image=[a.png,b.png]."""
    conversation: str | None = None
    """A JSONL file; the user turns of one line are sent in order (assistant turns are ignored)."""
    conversation_line: int = 1
    """Which line of the conversation file to play."""
    conversation_format: str = "unifuse"
    """data.format of conversation=: unifuse, sharegpt or hf (then conversation_line is the row)."""
    output_dir: str = "outputs/generate"
    """Where PNGs and transcript.{md,html,json} go."""
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    """Nucleus sampling."""
    height: int | None = None
    """Image height (None: the trained bucket nearest the last user image's aspect when the model was trained with data.buckets, else the generator's image_size)."""
    width: int | None = None
    """Image width (None: as height)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conversation_format not in ("unifuse", "sharegpt", "hf"):
            raise ConfigError(f"conversation_format must be unifuse, sharegpt or hf, got {self.conversation_format!r}")


@dataclass
class ChatUIConfig(ChatSettingsConfig):
    """``tools/chat_ui.py``: a Gradio web chat over a saved fused model (``fusion/chat_ui.py``); the sampling fields are the
    settings panel's starting values."""

    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface, put auth= in front)."""
    port: int = 7860
    """Port to bind (0: a free one)."""
    share: bool = False
    """Gradio's public share link: sends the page's traffic through Gradio's public relay (off by default)."""
    auth: str | None = None
    """Login: "user:password", or a file of user:password lines (None: no login)."""
    concurrency: int = 1
    """Requests answered at once (Gradio's queue and the model share this): 1 on a CPU, more on a GPU with memory to spare."""
    max_upload_mb: float = 50.0
    """Uploads larger than this are refused by the server."""
    output_dir: str = "outputs/chat_ui"
    """Each session's images and transcript go to <output_dir>/sessions/session-<time>-<id>/."""
    examples: str = "auto"
    """auto (the toy world's example prompts for a toy-world model, none otherwise), toy or none."""
    force_image_at: int | None = None
    """Testing: force <|bov|> at this decode step of every assistant turn, the end of turn two steps later (tiny models never emit it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.examples not in ("auto", "toy", "none"):
            raise ConfigError(f"examples must be auto, toy or none, got {self.examples!r}")
        if self.max_upload_mb <= 0:
            raise ConfigError(f"max_upload_mb must be positive, got {self.max_upload_mb}")


BENCH_SECTIONS = ("cache", "cache_queries", "stage2_batching", "frame_labels", "connector_batching", "sampling_guidance", "overhead", "stage1_overhead", "packing", "muon", "generation")


@dataclass
class BenchConfig:
    """``tools/bench.py``: side-by-side measurements in one process (ratios, never absolute pass/fail)."""

    sections: list[str] = field(default_factory=lambda: list(BENCH_SECTIONS))
    """What to measure (tools/bench.py's docstring): cache (stage 2 with/without the feature cache), stage2_batching (DiT passes per shape vs per sample), frame_labels (the frame head's labels memoised vs probed), connector_batching (the connector over a micro-batch in one call vs per sample), sampling_guidance (guidance passes batched vs separate), overhead (stage-2 fused step vs bare parts), stage1_overhead (stage-1 step vs bare forward/backward/optimizer on pre-rendered tensors), packing (stage 1 packed vs padded), muon (the toy DiT's Muon step, torch's vs grouped by shape), generation."""
    toy_dir: str = "checkpoints/toy"
    """The toy world (make_toy): its MLLM, Wan DiT and training data for cache / overhead / packing."""
    use_toy: bool = True
    """Use the toy world when it is built; else (or when false) the tiny checkpoints and their demo data."""
    batch: int = 8
    """Stage-2 micro-batch (cache, overhead)."""
    sft_batch: int = 8
    """Stage-1 micro-batch (packing, stage1_overhead)."""
    stage1_zero: int = 2
    """DeepSpeed ZeRO stage of the stage1_overhead section's trainer (conf/deepspeed's default is 2)."""
    batches: int = 4
    """Distinct micro-batches cycled through the repeats (every variant runs the same ones)."""
    model: str | None = None
    """generation: a saved fused model; None builds an untrained one from the tiny checkpoints (generator/connector below)."""
    tiny_dir: str = "checkpoints/tiny"
    """Where make_tiny wrote the tiny checkpoints."""
    connector_name: str = "multilayer_concat"
    """Connector config under conf/connector/ (cache and overhead sections; generation when model is None)."""
    mllm_hidden: int = 384
    """Width of the random-init Qwen2.5-VL the benchmark builds (0: the tiny checkpoint's own MLLM)."""
    mllm_layers: int = 8
    """Layers of that MLLM."""
    images: int = 4
    """Images in the benchmarked answer."""
    history_turns: int = 6
    """Earlier turns (each with a user image and a paragraph) before the benchmarked one."""
    words_per_turn: int = 120
    """Words of user text per history turn."""
    steps: int = 4
    """DiT sampler steps per image (generation)."""
    sample_steps: int = 20
    """Sampler steps of the sampling_guidance section."""
    repeats: int = 5
    """Timed repetitions per variant (the median is reported, with min and max)."""
    output_dir: str = "outputs/bench"
    """Where bench.json and bench.md go."""

    def __post_init__(self) -> None:
        bad = set(self.sections) - set(BENCH_SECTIONS)
        if bad:
            raise ConfigError(f"sections: unknown {sorted(bad)}; choose from {', '.join(BENCH_SECTIONS)}")
        if self.repeats <= 0 or self.batch <= 0 or self.sft_batch <= 0 or self.batches <= 0:
            raise ConfigError("repeats, batch, sft_batch and batches must be positive")


@dataclass
class EvaluateConfig:
    """``tools/evaluate.py``: toy-world metrics of a saved fused model."""

    model: str = MISSING
    """A fused-model folder (e.g. a run's final/)."""
    data_dir: str = "checkpoints/toy/toyworld"
    """The toy world (train.jsonl, val.jsonl, test.jsonl, images/)."""
    split: str = "test"
    """val or test."""
    n: int | None = None
    """Evaluate the first n conversations (None: all)."""
    seed: int | None = None
    """None: the stored split; an int: a fresh split drawn with this seed (written to the run folder)."""
    fresh_n: int = 240
    """Conversations in a fresh split (240: 40 of each kind, as the toy world's test split)."""
    steps: int = 20
    """DiT sampler steps."""
    guidance: float = 3.0
    """Text guidance scale."""
    image_guidance: float = 1.0
    """Condition-frame guidance scale (1: off; > 1 adds a pass without the earlier images, see FlowGenerator.sample)."""
    max_new_tokens: int = 64
    """Text tokens per assistant turn."""
    transcripts: int = 3
    """Conversations written as transcripts."""
    gain_samples: int = 160
    """Conversations (with an assistant image) of the split on which the conditioning gain is measured (0: skip).
    The gain at one t is a ratio of mean losses with heavy-tailed samples: on the toy world's test split the DiT's
    own-encoder gain at t=0.7 read -0.015 / -0.154 / 0.163 on its first 16 / 64 / 160 (docs/toyworld_log.md), so few samples
    can flip the gain ratio; 160 cost 46 s on 2 CPU cores with one DiT pass per row (gain_rows)."""
    gain_rows: int = 32
    """Rows (sample, t, condition) per no-grad DiT pass of the gain measurement (fusion.gain.conditioning_gain); lower
    it where a large DiT runs out of memory there."""
    workers: int = 1
    """Processes that play the conversations at once, each on one torch thread taking the next conversation not yet
    taken (each loads the model; a conversation's chat is seeded on its own, so the figures are those of one process).
    On 2 CPU cores two one-thread processes do more than one two-thread process (test split: 122 s against 218 s): the
    demo passes 2 (DemoConfig.eval_workers)."""
    output_dir: str = "outputs/evaluate"
    """Where report.json, report.md and transcripts/ go."""
    device: str = "cpu"
    """cpu, cuda ..."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.gain_rows < 1:
            raise ConfigError(f"gain_rows must be at least 1 (rows per DiT pass of the gain measurement), got {self.gain_rows}")
        if self.split not in ("val", "test"):
            raise ConfigError(f"split must be val or test, got {self.split!r}")


@dataclass
class MakeToyConfig:
    """``tools/make_toy.py``: the toy world's data splits and its toy-pretrained backbones (each cached)."""

    out_dir: str = "checkpoints/toy"
    """Folder that receives toyworld/ (train.jsonl, val.jsonl, test.jsonl, images/), vae/, qwen2_5_vl/ and one folder per DiT family."""
    n_train: int = 1500
    """Training conversations (kinds in rotation)."""
    n_val: int = 60
    """Validation conversations."""
    n_test: int = 240
    """Test conversations (40 of each of the six kinds: at 10 per kind, two runs' figures differed by more than the effects measured)."""
    n_distill: int = 1500
    """Text-only text-to-image requests over every (colour, shape) pair in toyworld/distill.jsonl: the toy stage 2's
    distillation corpus (stage.distill_data; no image). Written beside an existing world when missing (0: none)."""
    seed: int = 0
    """Added to each split's own seed (splits stay disjoint); the backbones' training seed."""
    image_size: int = 64
    """Image side in pixels of the toy world's pictures and of what its toy VAE, MLLM and DiTs are pretrained on (the 3x3
    grid's cells are image_size / 3 wide; the VAE's latents image_size / 4 at the default vae_channels). Stage 2, the chat
    and evaluation draw at the size the toy generator folder was pretrained at (conf/generator/toy_*.yaml read it with
    ``${toy_image_size:...}``); the toy MLLM sees every picture resized to 84 pixels whatever this is."""
    skip_existing: bool = False
    """Keep an existing toyworld/ folder."""
    vae_steps: int = 1200
    """Steps of the toy VAE pretraining into <out_dir>/vae (0: skip). Reused while its settings match."""
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Block widths of the toy AutoencoderKL (f = 2^(blocks-1))."""
    vae_lr: float = 3e-3
    """Peak learning rate of the toy VAE (warm-up, cosine decay)."""
    mllm_steps: int = 4000
    """Steps of the toy MLLM pretraining (captions and questions) into <out_dir>/qwen2_5_vl (0: skip)."""
    mllm_hidden_size: int = 128
    """Width of the toy MLLM's language model (4 layers, 4 heads)."""
    mllm_lr: float = 5e-4
    """Learning rate of the toy MLLM. 5e-4 rather than 2e-3: at 2e-3 its trained vision tower loses the colours it
    could be read for (held-out "what colour is the <shape> at <place>" 5/30 after 1500 steps, 18/30 with the
    vision tower frozen, 20/30 at 5e-4; docs/toyworld_log.md)."""
    mllm_optimizer: str = "adamw"
    """The toy MLLM's optimizer (fusion.toyworld.pretrain.toy_optimizers): adamw, or muon. Muon, 2000 steps: 0.750 of
    held-out questions in 191 s against AdamW's 0.625 in 109 s (4000 AdamW steps: 0.812 in 238 s), a step 1.75x dearer:
    not the default (docs/toyworld_log.md, "Muon for the toy DiT")."""
    mllm_vision_out_scale: float = 0.03
    """Initial scale of the toy MLLM's vision merger output layer (``make_tiny(vision_out_scale=...)``). At 1 its
    image tokens enter the language model ~130x the norm of its text embeddings and its layers cannot add to them
    (where an object is: "where is" 2/29 of held-out questions after 1500 steps); 0.1: 10/29, 0.03: 12/29."""
    mllm_rope_theta: float = 10000.0
    """MRoPE base of the toy MLLM (published Qwen2.5-VL: 1e6). Base 10 turns the toy's few rotary frequencies by a
    visible angle per grid cell, but trained unevenly: 59.4% of held-out questions on one machine, 32.8% on
    another, same seed and steps (base 10000: 51.6%); docs/toyworld_log.md."""
    mllm_mrope_interleaved: bool = True
    """Interleave the toy MLLM's MRoPE frequencies over time / rows / columns (mrope_section of ones; Qwen3-VL's
    layout) instead of Qwen2.5-VL's blocks, which leave the columns of a 3x3 image the lowest frequencies (under
    0.004 rad per cell). With the lower lr and vision_out_scale: held-out questions 0.828 vs 0.734 in blocks after 4000 steps
    (docs/toyworld_log.md)."""
    mllm_p_text: float = 0.0
    """Share of the toy MLLM's pretraining exchanges that are text-only exercises in the world's words (repeat a
    description, pick its n-th object, look a colour or place up in it: fusion.toyworld.pretrain.text_exercise),
    the language skills a published MLLM has from its text pretraining."""
    dit_families: list[str] = field(default_factory=lambda: ["wan"])
    """DiT families to pretrain (wan, cosmos, sana), each into <out_dir>/<family>."""
    dit_steps: int = 3500
    """Steps of each toy DiT's pretraining (0: skip). 3500 at dit_lr 4e-3 rather than 4500 at 2e-3 (about a fifth less
    time): built by the demo with its VAE first (DemoConfig.parallel), through its own encoder (64 held-out items each)
    t2i 1.000, edits 0.938 applied, 0.953 preserved, recolour 0.913, flow loss on edits 0.0187 / 0.0194 training /
    held-out (4500 at 2e-3 built so: 0.922, 0.969, 0.826, 0.0186 / 0.0196), every demo goal met (docs/toyworld_log.md,
    "The VAE first, then the toy Wan beside stage 1"); built on a VAE trained on one thread it fell short (recolour
    0.783). 3000 at 6e-3: recolour 0.783, flow loss on edits 0.0261 / 0.0271 (past the best rate).
    4500 with Muon (dit_optimizer) rather than 9000 with AdamW before: through its
    own encoder (128 held-out items each) t2i 1.000, edits 0.969 applied, 0.977 preserved, recolour 0.950, remove 0.931 in
    1185 s, flow loss on edits 0.0183 / 0.0193 training / held-out (9000 AdamW steps in the fresh-clone demo: 0.0209 /
    0.0216 in 1890 s; docs/toyworld_log.md, "Muon for the toy DiT"). 9000 rather than 6000 before (AdamW): edits 0.852 ->
    0.961 applied, recolour 0.800 -> 0.900 ("The toy DiT's edits on this machine"); 6000 rather than 3000 before that
    ("Results: a longer-trained toy DiT")."""
    dit_lr: float = 4e-3
    """Peak learning rate of the toy DiTs (warm-up, cosine decay; dit_steps has what other rates did)."""
    dit_batch: int = 16
    """Batch size of the toy DiTs."""
    dit_pool: int = 4096
    """Training items (scenes and edits) rendered and encoded once before the DiT pretraining."""
    dit_patch: int = 2
    """Spatial patch side of the toy DiTs in latent pixels: 2 gives 64 tokens a frame on the toy VAE's 16x16 latents
    of a 64-pixel scene, 4 gives 16. 4 on the toy Wan: 0.133 against 0.229 s per step side by side, but through its own encoder (128 each)
    edits applied 0.359, preserved 0.523 (an edit's other objects are not copied to the latent pixel): not the default
    (docs/toyworld_log.md, "A shorter distillation warm-up")."""
    dit_text_length: int = 48
    """Tokens the toy DiT's own text encoder pads every request to (its pipeline's max_sequence_length)."""
    dit_text_layers: int = 2
    """Layers of the toy DiT's own text encoder (UMT5 / T5 / Gemma2 by family), trained with the DiT."""
    dit_coord_freqs: int = 3
    """Toy Wan only: sin/cos frequency pairs per axis in its coordinate input channels, besides the two
    ramps (a sharper position signal: see backbones/generator/wan.py; 0: the ramps alone)."""
    dit_t_sampling: str = "shifted"
    """Training timesteps of the toy DiTs: uniform, logit_normal (SD3) or shifted (uniform, then shifted by
    dit_t_shift). Shifted by 3 a quarter of the steps fall above t = 0.9, where sampling starts and an edit
    must copy its condition frame from noise (logit-normal: 1.4%; see pretrain_dit)."""
    dit_t_shift: float = 3.0
    """The shift of dit_t_sampling=shifted (t' = s t / (1 + (s - 1) t))."""
    dit_p_frames: float = 0.0
    """Toy DiTs with condition frames: the share of edits pretrained with 2-3 condition frames, the first one
    referred back to or the latest edited (fusion.toyworld.pretrain.frame_edits; the tracking turns)."""
    dit_p_context: float = 0.25
    """Share of the toy DiTs' pretraining requests phrased as mid-conversation turns read them
    (fusion.toyworld.pretrain.in_context: an edit referring back, "In the first picture, ...", and/or an unrelated
    exchange before the request), the prompts stage 2's teacher reads in the tracking turns. 0.25 rather than 0: the
    toy Wan on its own encoder applies 34 rather than 19 of the test split's 40 edits after distractors (57 rather
    than 64 of 80 plain edits), and the fused demo tracks 0.650 rather than 0.325 on the test split
    (a second stage-2 seed: 0.625; docs/toyworld_log.md)."""
    dit_p_edit: float = 0.7
    """Share of the toy DiTs' pretraining items that are edits of a condition frame (the rest text-to-image);
    families without condition frames draw text-to-image only. 0.7 rather than 0.5: the toy Wan's own encoder
    (128 held-out edits each) applies 0.828 rather than 0.797 and preserves 0.836 rather than 0.805, text-to-image
    0.977 vs 0.984 (docs/toyworld_log.md)."""
    dit_p_recolour: float = 0.0
    """Share of the toy DiTs' pretraining edits that are recolours (the rest the other operations the scene allows,
    alike; edits with several condition frames, dit_p_frames, keep the world's choice); 0: every operation the scene allows
    alike (recolours about 29%). 0.5 on the toy Wan (128 held-out edits):
    recolour 0.850 rather than 0.800, remove 0.759 rather than 0.931, preserved 0.906 rather than 0.922
    (docs/toyworld_log.md): not the default."""
    dit_p_shared_colour: float = 0.5
    """Share of the toy DiTs' pretraining edits redrawn until another object of the scene has the colour of the object
    the edit changes (fusion.toyworld.conversations.EditMix): "Make the red circle blue." beside a red square (drawn
    as the world draws them, 18% of the edits are such; with 0.5, 59%). The toy Wan's own recolours failed mostly
    there: of 96 held-out recolours 19 missed, 12 by changing other objects too, and of the 11 other objects that
    took the new colour 8 had the target's old colour. 0.5 rather than 0, its own encoder on 384 held-out items:
    recolour 0.891 rather than 0.802, edits applied 0.961 rather than 0.922, preserved 0.974 rather than 0.948; the
    fused model recolours 0.875 / 0.902 rather than 0.775 / 0.829 on the test split / a fresh set
    (docs/toyworld_log.md)."""
    dit_p_shared_shape: float = 0.0
    """Likewise, the share of edits redrawn until another object of the scene has the shape of the object the edit
    changes ("Make the red circle blue." beside a green circle); dit_p_shared_colour + dit_p_shared_shape <= 1."""
    dit_copy_heads: float = 0.0
    """Toy Wan only: start one self-attention head per block as a copy head (fusion.toyworld.pretrain.init_copy_heads)
    with this query/key RMSNorm gain; 0: off."""
    dit_ema: float = 0.0
    """Toy DiTs: the decay of an exponential moving average of the DiT's and its text encoder's weights, saved in
    place of the last weights (both scored: ``accuracy`` and ``accuracy_last`` in ``pretrain.json``); 0: off. 0.999 on
    the toy Wan (128 held-out items each, the average beside the same run's last weights): t2i 1.000 vs 0.984, edits
    applied 0.820 vs 0.852, preserved 0.820 vs 0.867, recolour 0.800 vs 0.800 (docs/toyworld_log.md): not the default."""
    dit_optimizer: str = "muon"
    """Toy DiTs' optimizer (fusion.toyworld.pretrain.toy_optimizers): muon (torch.optim.Muon over the hidden linear
    layers' weights, AdamW over the rest, the same lr) or adamw. The toy Wan at 1500 steps, one change (64 held-out items
    each): t2i 0.734 against 0.438, edits applied 0.500 against 0.234, preserved 0.641 against 0.422; a step costs about
    a fifth more (0.214 against 0.179 s side by side; docs/toyworld_log.md, "Muon for the toy DiT")."""
    dit_eval_n: int = 64
    """Held-out scenes and edits each sampled (20 steps, guidance 3) to score the pretrained toy DiT."""
    dit_text_freeze: float = 0.5
    """Toy DiTs: the share of ``dit_steps`` after which their text encoder stops training (the DiT trains on with it
    frozen, as published DiTs train on a frozen encoder) and the generator folder as it stands is written to
    ``<out_dir>/<family>_early``: stage 2's distillation warm-up reads only that encoder, so ``make demo`` runs the warm-up
    from there beside the DiT's remaining steps (tools/demo.py). 0: the encoder trains with the DiT throughout."""

    def __post_init__(self) -> None:
        bad = [f for f in self.dit_families if f not in ("wan", "cosmos", "sana")]
        if bad:
            raise ConfigError(f"dit_families: unknown family {bad[0]!r}; expected wan, cosmos or sana")
        f = 2 ** (len(self.vae_channels) - 1)  # the toy VAE's downsampling
        if self.image_size < 24 or self.image_size % f:
            raise ConfigError(f"image_size: {self.image_size} must be >= 24 and a multiple of the toy VAE's downsampling factor {f} "
                              f"(vae_channels {list(self.vae_channels)})")
        side = self.image_size // f
        if self.dit_patch < 1 or side % self.dit_patch:
            raise ConfigError(f"dit_patch: {self.dit_patch} must divide the toy VAE's {side}x{side} latents of a {self.image_size}-pixel scene")
        if self.dit_coord_freqs < 0:
            raise ConfigError(f"dit_coord_freqs: {self.dit_coord_freqs} must be >= 0")
        if self.dit_t_sampling not in T_SAMPLINGS:
            raise ConfigError(f"dit_t_sampling must be uniform, logit_normal or shifted, got {self.dit_t_sampling!r}")
        if not 0 <= self.dit_p_frames < 1:
            raise ConfigError(f"dit_p_frames: {self.dit_p_frames} must be in [0, 1)")
        for key in ("dit_p_context", "mllm_p_text", "dit_p_edit", "dit_p_recolour", "dit_p_shared_colour", "dit_p_shared_shape"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"{key}: {getattr(self, key)} must be in [0, 1]")
        if self.dit_p_shared_colour + self.dit_p_shared_shape > 1:
            raise ConfigError(f"dit_p_shared_colour + dit_p_shared_shape: {self.dit_p_shared_colour + self.dit_p_shared_shape} must be <= 1")
        for key in ("dit_optimizer", "mllm_optimizer"):
            if getattr(self, key) not in TOY_OPTIMIZERS:
                raise ConfigError(f"{key} must be one of {TOY_OPTIMIZERS}, got {getattr(self, key)!r}")
        if not 0 <= self.dit_ema < 1:
            raise ConfigError(f"dit_ema: {self.dit_ema} must be in [0, 1)")
        if not 0 <= self.dit_text_freeze < 1:
            raise ConfigError(f"dit_text_freeze: {self.dit_text_freeze} must be in [0, 1) (a share of dit_steps; 0: off)")
        if self.dit_text_freeze and self.dit_ema:
            raise ConfigError("dit_ema with dit_text_freeze (default 0.5): the averaged text encoder saved would not be the one written "
                              "at the freeze step; set dit_text_freeze=0 to average")
        if self.dit_t_shift <= 0:
            raise ConfigError(f"dit_t_shift: {self.dit_t_shift} must be > 0")
        if self.dit_copy_heads < 0 or (self.dit_copy_heads and not self.dit_coord_freqs):
            raise ConfigError(f"dit_copy_heads: {self.dit_copy_heads} must be >= 0, and needs dit_coord_freqs > 0 (the heads read those channels)")
        if self.mllm_vision_out_scale <= 0:
            raise ConfigError(f"mllm_vision_out_scale: {self.mllm_vision_out_scale} must be > 0 (it multiplies initial weights)")
        if self.mllm_rope_theta <= 1:
            raise ConfigError(f"mllm_rope_theta: {self.mllm_rope_theta} must be > 1 (the MRoPE base)")
        if self.dit_families and self.dit_steps > 0 and self.vae_steps <= 0:
            raise ConfigError("dit_steps > 0 needs the toy VAE (vae_steps > 0): the DiTs learn in its latent space")


SET_THEN_VELOCITY = ("stage.distill_target_late=velocity", "stage.distill_target_switch=2000", "stage.lr_late_scale=0.25",
                     "stage.distill_steps=4000", "stage.max_steps=4000")
"""The fixed-token connectors' stage-2 schedule in make ablation (after the set target): see DemoConfig.connector_overrides.
Its own 4000 steps (after DemoConfig.align_steps, so it wins): the schedule measured for them."""
QUERY_CONNECTOR_OVERRIDES = ("stage.distill_target=set", "stage.frame_select=all", "stage.connector_span=all", *SET_THEN_VELOCITY)
"""queries and multiscale_queries in make ablation: the set target, every earlier frame, the whole context, then the schedule above."""


@dataclass
class DemoConfig:
    """``tools/demo.py`` (``make demo``): the toy world end to end (the toy MLLM and stage 1 beside the toy DiT: ``parallel``)."""

    profile: str = "full"
    """Name of the profile these numbers come from (conf/profile/: full, quick)."""
    toy_dir: str = "checkpoints/toy"
    """Toy world + toy backbones (built by tools/make_toy.py if absent, reused while their settings match)."""
    out_dir: str = "outputs/demo"
    """Receives sft/, align/, eval/, report.json, report.md and transcripts/."""
    n_train: int = 1500
    """Training conversations of the toy world."""
    n_test: int = 240
    """Test conversations of the toy world (40 of each kind)."""
    image_size: int = 64
    """Side in pixels of the toy world's pictures (MakeToyConfig.image_size), so of what stage 2 and the evaluation draw."""
    vae_steps: int = 1200
    """Toy VAE pretraining steps."""
    mllm_steps: int = 4000
    """Toy MLLM pretraining steps."""
    dit_steps: int = 3500
    """Toy DiT pretraining steps (MakeToyConfig.dit_steps; with its default optimizer, Muon, and rate, 4e-3)."""
    parallel: bool = True
    """Build the toy MLLM and run stage 1 beside the toy DiT (two processes, each on one thread while the other works:
    fusion/cpushare.py), after the toy world's data and the toy VAE (alone, on every thread); false: one phase after
    another. From a fresh clone (434fc3e) the world and stage 1 took 1529 s side by side against 1693 s one after another
    (9512e89), the VAE bit for bit the same, the toy Wan's flow loss on edits 0.0186 / 0.0196 against 0.0183 / 0.0193 and
    every demo goal met. With the VAE beside the MLLM too (on one thread) it reconstructed a third worse and the toy Wan
    learnt less (recolour 0.739): docs/toyworld_log.md, "The world and stage 1 side by side"."""
    align_beside_world: bool = True
    """With ``parallel``: stage 2's distillation warm-up (the steps that train the connector alone onto the toy DiT's
    own text encoder, ``stage.stop_before_generator``) runs after stage 1 in the same branch, beside the toy DiT's last
    steps, from the DiT's early snapshot (``<toy_dir>/<family>_early``, written when its text encoder stops training:
    make_toy's ``dit_text_freeze``); stage 2 then goes on from there on the finished DiT (``resume_generator=folder``).
    false: all of stage 2 after the world."""
    sft_steps: int = 3000
    """Stage-1 steps. 3000 rather than 1500: the toy MLLM writes more of the step-by-step answers' "Now <object>."
    lines right with the true prefix (docs/toyworld_log.md; docs/dev/toy_sft_lines.py)."""
    align_steps: int = 3000
    """Stage-2 steps: 2000 connector-only distillation steps (conf/experiment/toy_align.yaml; 3000 before "The world and
    stage 1 side by side" in docs/toyworld_log.md, 1500 drew several objects 0.765 on the test split), then 1000 joint
    steps in which the connector and the learned frame head of toy_align (stage.frame_select) learn from the flow loss
    through the DiT, frozen throughout (against the DiT at 0.1x lr there: several objects 0.882 -> 1.000 and recolour
    0.875-0.925 -> 0.925 on the test split, the joint steps 149-166 s against 210-215 s: docs/toyworld_log.md, "Stage 2
    with the DiT frozen throughout"). 3000 rather than 6000 distillation steps since the text-only
    corpus joined them: every goal but the budget met on two seeds either way, stage 2 about 380 s shorter (docs/toyworld_log.md,
    "A shorter distillation warm-up"). 1000 joint steps rather than 1500 since: every goal but the budget met on two
    seeds and both sets, stage 2 about 686 s instead of 911-1066 s (docs/toyworld_log.md, "A shorter joint phase")."""
    generator: str = "toy_wan"
    """Generator config (toy_wan, toy_cosmos, toy_sana)."""
    connector: str = "multilayer_concat"
    """Connector config."""
    eval_n: int | None = None
    """Test conversations evaluated (None: all)."""
    sample_steps: int = 20
    """DiT sampler steps at evaluation."""
    guidance: float = 3.0
    """Text guidance at evaluation."""
    transcripts: int = 6
    """Conversations written as HTML transcripts."""
    eval_workers: int = 2
    """Processes the evaluation plays the test conversations in (EvaluateConfig.workers; 1: one)."""
    connectors: list[str] = field(default_factory=lambda: ["last_mlp", "multilayer_concat", "layer_mix", "queries", "multiscale_queries", "resampler"])
    """tools/ablate.py: the connectors compared."""
    make_toy_overrides: list[str] = field(default_factory=list)
    """Extra overrides for tools/make_toy.py."""
    sft_overrides: list[str] = field(default_factory=list)
    """Extra overrides for stage 1 (tools/train.py experiment=toy_sft)."""
    align_overrides: list[str] = field(default_factory=list)
    """Extra overrides for stage 2 (tools/train.py experiment=toy_align)."""
    connector_overrides: dict[str, list[str]] = field(default_factory=lambda: {
        "queries": list(QUERY_CONNECTOR_OVERRIDES),
        "multiscale_queries": list(QUERY_CONNECTOR_OVERRIDES),
        "resampler": ["stage.distill_target=set", *SET_THEN_VELOCITY]})
    """Stage-2 overrides by connector, after align_overrides: toy_align's aligned distillation needs one state per
    context token, so the connectors with a fixed number of tokens distil onto the teacher's states as a set; its
    learned frame head reads the MLLM's states of the context's images, which query connectors do not keep, so
    they hand the DiT every earlier image (their tracking rows are not comparable with the others'), and they read
    their queries rather than a window of the context (connector_span=all; the resampler attends to the window).
    The resampler and queries: the set target for 2000 steps, then the DiT's velocity at a quarter of the schedule's
    rate (2.5e-4 at the switch, cosine to 0 at step 4000), the DiT frozen throughout: the resampler t2i 0.075 / 0.200
    on seeds 0 / 1, where the set target alone drew nothing (t2i 0.000) and set 2000 steps then velocity 1000 in a
    3000-step schedule 0.050; queries t2i 0.000 / 0.325; multiscale_queries the same two phases as queries
    (docs/toyworld_log.md, "The connector ablation from one command" and "All six connectors"). On the current recipe
    (the DiT frozen, not at lr 0): t2i queries 0.400 / 0.475, multiscale_queries 0.250 / 0.475, resampler 0.000 / 0.250
    (docs/toyworld_log.md, "The connector ablation on the current recipe")."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """tools/ablate.py: stage-2 seeds per connector (stage.seed and data.seed); differences are judged against the spread between seeds."""
    reuse: bool = True
    """tools/ablate.py: keep a connector/seed run that finished (its evaluation report is there) with the same stage-1 model,
    stage-2 and evaluation arguments (recorded in its run.json), so an ablation can be extended or resumed; false: rerun every run."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed (tools/ablate.py runs stage 2 once per seed)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be unique, got {list(self.seeds)}")


def toy_image_size(path: str) -> int:
    """``${toy_image_size:<generator folder>}`` (conf/generator/toy_*.yaml): the side in pixels a toy generator was
    pretrained at (its ``pretrain.json``, MakeToyConfig.image_size), so stage 2, the chat and evaluation draw at the
    size of the world that was built; 64 where the folder is not built yet or predates the setting."""
    import json
    from pathlib import Path

    stats = Path(path) / "pretrain.json"
    if not stats.is_file():
        return 64
    try:
        return int(json.loads(stats.read_text()).get("image_size", 64))
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"{stats}: not a toy generator's pretrain.json ({e})") from e


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    OmegaConf.register_new_resolver("toy_image_size", toy_image_size, replace=True)
    # Schemas that live beside their code; imported here, not at the top: their modules import
    # ConnectorBase from this one (a cycle at import time otherwise).
    from connectors.resampler import ResamplerConfig

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="make_tiny_schema", node=MakeTinyConfig)
    cs.store(name="plan_schema", node=PlanConfig)
    cs.store(name="validate_data_schema", node=ValidateDataConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="chat_ui_schema", node=ChatUIConfig)
    cs.store(name="bench_schema", node=BenchConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="make_toy_schema", node=MakeToyConfig)
    cs.store(name="demo_schema", node=DemoConfig)
    cs.store(group="mllm", name="qwen2_5_vl_schema", node=Qwen25VLConfig)
    cs.store(group="mllm", name="mllm_schema", node=Qwen25VLConfig)  # any adapter on backbones/mllm/base.py (set _target_)
    cs.store(group="generator", name="wan_schema", node=WanGeneratorConfig)
    cs.store(group="generator", name="cosmos_schema", node=CosmosGeneratorConfig)
    cs.store(group="generator", name="sana_schema", node=SanaGeneratorConfig)
    cs.store(group="connector", name="last_mlp_schema", node=LastMLPConfig)
    cs.store(group="connector", name="multilayer_concat_schema", node=MultilayerConcatConfig)
    cs.store(group="connector", name="layer_mix_schema", node=LayerMixConfig)
    cs.store(group="connector", name="queries_schema", node=QueriesConfig)
    cs.store(group="connector", name="multiscale_queries_schema", node=MultiscaleQueriesConfig)
    cs.store(group="connector", name="resampler_schema", node=ResamplerConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="stage", name="stage_schema", node=StageConfig)
    cs.store(group="deepspeed", name="deepspeed_schema", node=DeepSpeedConfig)
    cs.store(group="logger", name="logger_schema", node=LoggerConfig)
    cs.store(group="cache", name="cache_schema", node=CacheConfig)


def validate(cfg: DictConfig) -> None:
    """Run every ``__post_init__`` check on a composed config; raise ConfigError naming the key."""
    try:
        for key in cfg:
            node = cfg._get_node(key)  # no interpolation resolved here (output_dir needs a Hydra run)
            if isinstance(node, DictConfig) and not node._is_none() and OmegaConf.get_type(node) not in (dict, None):
                OmegaConf.to_object(node)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + f" (key: {getattr(e, 'full_key', '?')})") from None
