"""The training recipe for both stages, under DeepSpeed ZeRO.

Run as (see ``tools/train.py``):
    python tools/train.py stage=sft
    python tools/train.py stage=align generator=tiny_wan connector=last_mlp init_from=<stage-1 output>/final

One process without a launcher sets up a single-rank gloo group itself; ``torchrun`` and
the ``deepspeed`` launcher provide the rank environment (gloo on CPU, nccl on GPUs).

The recipe in short named steps (torchtune style): ``_setup_distributed``, ``_setup_model``,
``_setup_data``, ``_setup_engine``, ``_maybe_resume``, then ``train()``. Only the parts that
train go into the DeepSpeed engine (stage align: connector + DiT; stage sft: the MLLM);
frozen parts stay outside it, replicated, in eval mode, never gathered or optimised.

Exact resume: every random draw of step ``k`` (data order aside) comes from a generator
seeded with (seed, k, rank), the sampler is a seeded permutation per epoch, and a
checkpoint stores engine, optimizer, LR schedule and the data position. A checkpoint is
written into a hidden ``.partial-*`` folder and renamed to ``step-NNNNNNN`` only when
complete, so a crash mid-write never leaves a folder that ``resume=auto`` would pick.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import hashlib
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from backbones.mllm.base import RenderedConversation
from fusion import cpushare, faults
from fusion.atomic import write_text_atomic
from fusion.data import Conversation, SkipReport, load_images, set_max_image_pixels
from fusion.errors import CheckpointError, ConfigError, DataError, NumericalError
from fusion.model import MANIFEST, FusedModel

log = logging.getLogger(__name__)
CKPT_PREFIX = "step-"
COMPLETE = "complete.json"
FILES = "files.json"  # per checkpoint: every file with its size (and sha256), checked before a resume


# ---------------------------------------------------------------------------- distributed
def _skip_cpu_shared_memory_allreduce() -> None:
    """One CPU rank: DeepSpeed's shared-memory all-reduce op (which speeds up several ranks on one CPU node) has nothing
    to do, and building it just in time costs 35-60 s on every fresh machine or environment; mark it unavailable, so
    DeepSpeed's torch backend uses plain gloo (what it does wherever the op cannot be built)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def setup_distributed() -> tuple[int, int, str]:
    """(rank, world size, device). Without a launcher: a single-rank gloo group on a free port."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not cuda and os.environ.get("WORLD_SIZE") == "1":
        _skip_cpu_shared_memory_allreduce()

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def teacher_fingerprint(generator_path: str | Path) -> str:
    """The distillation teacher's identity: its ``text_encoder/`` and ``tokenizer/`` (every file; a hub id stands for itself)."""
    from fusion.feature_cache import folder_fingerprint

    root = Path(generator_path)
    return f"{folder_fingerprint(root / 'text_encoder')}:{folder_fingerprint(root / 'tokenizer')}"


def zero_stage_for(ds: DictConfig, world: int) -> int:
    """The ZeRO stage a run uses: as configured, except 1/2 on a single rank without offload (``deepspeed.single_rank_zero0``)."""
    if world == 1 and ds.zero_stage in (1, 2) and ds.offload_optimizer == "none" and ds.get("single_rank_zero0", True):
        return 0
    return ds.zero_stage


def deepspeed_config(ds: DictConfig, stage: DictConfig, device: str, world: int | None = None) -> dict[str, Any]:
    """The DeepSpeed json for a run: ZeRO stage, offload, clipping, bf16 where supported. ``world`` (ranks; None: as
    configured) lets a single rank skip ZeRO 1/2's partitioning (:func:`zero_stage_for`)."""
    bf16 = {"auto": device.startswith("cuda") and torch.cuda.is_bf16_supported(), "true": True, "false": False}[str(ds.bf16).lower()]
    zero: dict[str, Any] = {"stage": ds.zero_stage if world is None else zero_stage_for(ds, world), "overlap_comm": ds.overlap_comm and device.startswith("cuda"),
                            "reduce_bucket_size": ds.reduce_bucket_size, "contiguous_gradients": True}
    for key in ("offload_optimizer", "offload_param"):
        dev = getattr(ds, key)
        if dev != "none":
            zero[key] = {"device": dev, "pin_memory": device.startswith("cuda"), **({"nvme_path": ds.nvme_path} if dev == "nvme" else {})}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = ds.stage3_gather_16bit_weights_on_model_save
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # offload keeps our (guarded) AdamW instead of refusing it
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ---------------------------------------------------------------------------- data
#: DataError kinds that are not faults: the sample is valid but has nothing for this stage (a
#: text-only conversation in stage 2), so it is skipped and counted under any data.on_error
NOT_FOR_THIS_STAGE = ("no_target", "no_assistant_turn")


class ConversationDataset(torch.utils.data.Dataset):
    """Validated conversations; ``__getitem__`` decodes the images (in loader workers), or gives the sample's
    rendering kept from prevalidation (stage 1, ``data.render_cache_mb``): rendered once, never per epoch."""

    def __init__(self, convs: list[Conversation], decode: bool = True, rendered: dict[int, Any] | None = None):
        self.convs = convs
        self.decode = decode  # False: stage 2 from the feature cache reads no image
        self.rendered = rendered or {}

    def __len__(self) -> int:
        return len(self.convs)

    def __getitem__(self, i: int) -> Any:
        if i in self.rendered:
            return self.rendered[i]
        return decode_sample(self.convs[i]) if self.decode else self.convs[i]


class SeededSampler(torch.utils.data.Sampler):
    """A permutation per epoch from (seed, epoch), sharded by rank; resumable at any position."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def indices(self, epoch: int) -> list[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        return perm[self.rank :: self.world]

    def __iter__(self):
        return iter(self.indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return len(self.indices(self.epoch)) - self.start


def lr_multipliers(st, group_names: list[str]) -> list:
    """One learning-rate multiplier per parameter group (torch's LambdaLR): linear warm-up over ``stage.warmup_steps``,
    then constant or cosine to 0 at ``max_steps``; in align, the generator's group at 0 for ``generator_frozen_steps``,
    and every group times ``lr_late_scale`` from ``distill_target_switch`` on (with ``distill_target_late``)."""
    warm, total = st.warmup_steps, st.max_steps
    late_scale = float(st.get("lr_late_scale", 1.0) or 1.0) if st.get("distill_target_late") else 1.0
    switch = int(st.get("distill_target_switch", 0) or 0)

    def schedule(step: int) -> float:
        if step < warm:
            base = (step + 1) / warm
        elif st.lr_schedule == "cosine":
            base = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        else:
            base = 1.0
        return base * late_scale if step >= switch else base

    def frozen_then(steps: int):
        return lambda step: 0.0 if step < steps else schedule(step)

    return [frozen_then(st.generator_frozen_steps) if name == "generator" and st.name == "align" else schedule for name in group_names]


def decode_sample(conv: Conversation) -> Conversation | DataError:
    """A conversation with its images decoded, or the DataError it raises (reported by the main process under the run's
    policy; anything else a sample triggers becomes ``load_failed``, never a dead loader worker)."""
    try:
        return load_images(conv)
    except DataError as e:
        return e
    except Exception as e:  # noqa: BLE001
        return DataError(f"could not load the sample ({type(e).__name__}: {e})", conv.source, conv.line, kind="load_failed")


class StreamingConversations(torch.utils.data.IterableDataset):
    """``data.streaming``: the samples read from the data set as training consumes them, never all in memory.

    Each rank takes the samples whose ordinal (file order) is its own modulo the world size, shuffles them through a
    ``data.shuffle_buffer`` reservoir seeded from (seed, epoch, rank), and skips the first ``start`` of that order on
    resume, so a resumed run sees exactly the samples an uninterrupted one would. Items are decoded Conversations or the
    DataError of a bad sample (reported under the run's policy). ``epoch`` / ``start`` mirror :class:`SeededSampler`."""

    def __init__(self, d, rank: int = 0, world: int = 1):
        self.d, self.rank, self.world = d, rank, world
        self.epoch, self.start = 0, 0

    def __iter__(self):
        import itertools
        import random

        from fusion.formats import iter_samples, shuffled

        d = self.d
        mine = (s for k, s in enumerate(iter_samples(d.path, d.format, d.image_root, d.allow_outside_root, streaming=True))
                if k % self.world == self.rank)
        rng = random.Random((d.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        for item in itertools.islice(shuffled(mine, d.shuffle_buffer, rng), self.start, None):
            yield item if isinstance(item, DataError) else decode_sample(item)


def collate(items):
    return items


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves the weights and the Adam moments exactly as they were when this step's loss
    (``nonfinite_loss``, set by the trainer) or any gradient it is about to apply is NaN / Inf on any rank.

    DeepSpeed calls this step on what it owns (ZeRO 1-3: a few flat fp32 partitions; ZeRO 0: the
    parameters), after its reduction and clipping, whatever the precision; NaN / Inf survive both, so
    one fused norm over those gradients is the whole check (no hook per parameter), and the ranks
    agree through one all-reduce. ``last_step_nonfinite`` holds the verdict of the last call.
    """

    nonfinite_loss = False
    last_step_nonfinite = False
    clip_norm = 0.0  # > 0: clip here with the norm the check computes (a single rank under ZeRO-0: the trainer takes it off DeepSpeed)

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        bad = torch.tensor(float(self.nonfinite_loss))
        norm = None
        if grads:  # a norm overflows only for gradients near 1e19: a diverged step either way
            norm = torch.nn.utils.get_total_norm(grads)
            bad = bad.to(norm.device) + (~torch.isfinite(norm)).float()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(bad)
        self.last_step_nonfinite = bool(bad.item())
        if self.last_step_nonfinite:
            return None
        if self.clip_norm > 0 and norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip_norm, norm)  # (takes the parameters, clips their .grad)
        return super().step(closure)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_file_list(folder: Path, checksums: bool = True) -> dict[str, Any]:
    """Record every file of a checkpoint folder with its size (and sha256) in ``files.json``."""
    entries = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name not in (COMPLETE, FILES):
            entries[str(f.relative_to(folder))] = {"size": f.stat().st_size, **({"sha256": _sha256(f)} if checksums else {})}
    listing = {"files": entries}
    (folder / FILES).write_text(json.dumps(listing, indent=1))
    return listing


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems of a checkpoint folder: no completion marker, a file missing, truncated or changed
    (against ``files.json``). Empty: intact. A checkpoint written before file lists existed
    (``complete.json`` without a version) is taken as it is. Never raises: anything unreadable is a problem."""
    try:
        return _verify_checkpoint(Path(folder))
    except Exception as e:  # noqa: BLE001 - a damaged folder must not stop rank 0 before it tells the others
        return [f"could not be checked ({type(e).__name__}: {e})"]


def _verify_checkpoint(folder: Path) -> list[str]:
    if not (folder / COMPLETE).is_file():
        return [f"no {COMPLETE}"]
    try:
        meta = json.loads((folder / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [f"{COMPLETE} unreadable ({e})"]
    if meta.get("version", 1) < 2:
        return []
    try:
        listing = json.loads((folder / FILES).read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        return [f"{FILES} missing or unreadable ({type(e).__name__})"]
    problems = []
    for rel, want in listing.items():
        f = folder / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{rel} is {f.stat().st_size} bytes, {want['size']} when written (truncated?)")
        elif "sha256" in want and _sha256(f) != want["sha256"]:
            problems.append(f"{rel} changed since it was written (sha256 differs)")
    return problems


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to the main process, which saves and exits in order."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------- the trainable module
class StageModule(nn.Module):
    """What DeepSpeed wraps: only the parts that train; the fused model is held, not registered."""

    def __init__(self, fused: FusedModel, stage_name: str):
        super().__init__()
        object.__setattr__(self, "fused", fused)
        self.stage_name = stage_name
        if stage_name == "sft":
            self.mllm = fused.mllm.model
        else:
            self.connector = fused.connector
            self.dit = fused.generator.transformer
            if fused.frame_selector is not None:  # registered, so DeepSpeed clears, reduces and checkpoints its gradients and
                self.frame_selector = fused.frame_selector  # weights (unregistered, its gradients summed over every step)

    def forward(self, batch: list, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.stage_name == "sft":
            return self.fused.sft_loss(batch)
        return self.fused.align_loss(batch, generator)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # samples of this rank's epoch already consumed
    nonfinite: int = 0  # steps skipped because the loss or a gradient was NaN / Inf
    nonfinite_run: int = 0  # of them, in a row up to now
    generator_steps: int = 0  # align: steps that ran the generator (FusedModel.reads_generator; resume_generator=folder)


# ---------------------------------------------------------------------------- the recipe
class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.state = TrainState()
        self.report = SkipReport()
        self.cache = None  # a FeatureCache when stage 2 trains from cached features
        self.cache_info: dict[str, Any] = {}
        self._batch_this_epoch = False  # whether the current epoch has given a usable micro-batch (_next_batch)
        self.distill_convs, self.distill_cache = [], None  # stage.distill_data (_setup_distill_data)
        self.distill_report = SkipReport()
        self.teacher_id: str | None = None  # fingerprint of the distillation teacher's folders (checkpointed; resume_generator=folder)
        if cfg.get("resume_generator", "checkpoint") not in ("checkpoint", "folder"):
            raise ConfigError(f"resume_generator must be checkpoint or folder, got {cfg.resume_generator!r}")

    # -- setup ---------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        self.rank, self.world, self.device = setup_distributed()
        self.is_main = self.rank == 0
        torch.manual_seed(self.cfg.stage.seed)

    def _check_init_from(self) -> str | None:
        cfg = self.cfg
        init = cfg.get("init_from")
        if cfg.stage.name != "align":
            return None if init in (None, "base") else self._stage1_mllm(init)
        if init is None:
            raise ConfigError("stage=align needs init_from=<stage-1 output folder> (or init_from=base to align the base MLLM)")
        if cfg.stage.frame_select == "learned" and zero_stage_for(cfg.deepspeed, self.world) == 3 and self.world > 1:
            raise ConfigError(f"stage.frame_select=learned with deepspeed.zero_stage=3 on {self.world} ranks is not supported: the "
                              f"frame head and its DiT probes run once per sample with earlier images, a number that differs "
                              f"between ranks, and ZeRO-3 gathers a module's weights with a collective on every call. Use "
                              f"deepspeed=zero2 (or a single rank), or stage.frame_select=all / latest")
        return None if init == "base" else self._stage1_mllm(init)

    def _stage1_mllm(self, init: str) -> str:
        p = Path(init)
        if (p / "final" / MANIFEST).is_file():  # a run folder: take its export
            p = p / "final"
        if not (p / MANIFEST).is_file():
            raise CheckpointError(f"init_from={init}: no {MANIFEST} here (expected a stage-1 run folder or its final/ export)")
        manifest = json.loads((p / MANIFEST).read_text())
        if "mllm" not in manifest.get("parts", {}):
            raise CheckpointError(f"init_from={init}: the saved model has no MLLM part")
        tok = p / manifest["parts"]["mllm"]["folder"]
        vocab = json.loads((tok / "tokenizer.json").read_text()).get("added_tokens", []) if (tok / "tokenizer.json").is_file() else []
        if not any(t.get("content") == "<|bov|>" for t in vocab):
            raise CheckpointError(f"init_from={init}: its MLLM has no <|bov|> token; not a unifuse stage-1 output")
        if manifest.get("lora", {}).get("mllm"):
            raise CheckpointError(f"init_from={init}: the MLLM carries a LoRA adapter; export stage 1 with merged weights (stage.merge_lora_on_export=true)")
        return str(p)

    def _cache_mode(self, init: str | None) -> str:
        """The effective cache.mode: off outside stage 2 and for connectors that read queries through the MLLM."""
        cfg = self.cfg
        mode = cfg.cache.mode
        if mode == "off" or cfg.stage.name != "align":
            return "off"
        if cfg.data.streaming:
            raise ConfigError(f"data.streaming=true reads the samples as training consumes them; the feature cache (cache={mode}) "
                              "needs the whole set up front: use cache=off, or data.streaming=false")
        if init is None:
            raise ConfigError(f"cache={mode} needs init_from=<stage-1 output> (the cached MLLM must be a saved folder)")
        return mode

    def _setup_model(self) -> None:
        cfg = self.cfg
        init = self._check_init_from()
        if init is not None:
            cfg = cfg.copy()
            OmegaConf.set_struct(cfg, False)
            cfg.mllm.path = str(Path(init) / "mllm")
            cfg.mllm.add_bov = False
        if cfg.stage.name == "sft" and (cfg.get("generator") is not None or cfg.get("connector") is not None):
            cfg = cfg.copy()  # stage 1 trains the MLLM alone: a generator named by the experiment is not loaded
            OmegaConf.set_struct(cfg, False)
            cfg.generator = cfg.connector = None
            if self.is_main:
                log.info("stage=sft: generator and connector are not loaded (stage 1 trains the MLLM alone)")
        self.run_cfg = cfg
        self.cache_mode = self._cache_mode(init)
        self.cache_kind = "kv" if cfg.get("connector") is not None and getattr(get_class(cfg.connector._target_), "uses_queries", False) else "hidden"
        stand_in = None
        if self.cache_mode != "off" and self.cache_kind == "hidden":  # the MLLM is loaded only if the cache has to be built
            from fusion.feature_cache import MLLMFolder

            stand_in = MLLMFolder(cfg.mllm.path, cfg.mllm.hidden_layers)
        self.model = FusedModel.build(cfg, device=self.device, mllm=stand_in)
        if self.cache_mode != "off" and self.cache_kind == "kv":
            if not getattr(self.model.mllm, "supports_prefix_cache", False):
                log.warning("cache=%s: connector %s reads its learnable queries through the MLLM, and %s cannot store a context's "
                            "key/value cache; training without the feature cache", self.cache_mode, cfg.connector._target_.rsplit(".", 1)[-1],
                            type(self.model.mllm).__name__)
                self.cache_mode = "off"
            elif self.is_main:
                log.info("cache=%s: connector %s reads its queries through the MLLM: the cache holds each context's key/value cache "
                         "and every step runs the query tokens alone after it (the MLLM is loaded, its vision tower unused)",
                         self.cache_mode, cfg.connector._target_.rsplit(".", 1)[-1])
        report = self.model.apply_trainable(cfg.stage)
        switched = self.model.apply_memory_and_speed(cfg.stage)
        if self.is_main:
            for part, (n_train, n_all) in report.items():
                log.info("%-12s trainable %11d / %11d", part, n_train, n_all)
            for line in switched:
                log.info(line)
            if stand_in is not None:
                log.info("MLLM not loaded: stage 2 reads its features from the cache (cache=%s)", self.cache_mode)
        if cfg.stage.name == "align" and (self.model.generator is None or self.model.connector is None):
            raise ConfigError("stage=align needs generator=<name> and connector=<name>")
        if cfg.stage.name == "align" and (cfg.stage.distill_steps or cfg.stage.distill_weight):
            from backbones.generator.text_encoder import TextEncoder

            teacher = TextEncoder.from_pretrained(cfg.generator.path, device=self.device)
            self.model.set_teacher(teacher)
            self.teacher_id = teacher_fingerprint(cfg.generator.path)
            if self.is_main:
                log.info("distillation teacher: %s from %s (%d tokens, padded; reads each target's request text); "
                         "%d warm-up steps, then weight %g on %s", type(teacher.encoder).__name__, cfg.generator.path, teacher.max_length,
                         cfg.stage.distill_steps, cfg.stage.distill_weight, cfg.stage.distill_target)
                if cfg.stage.get("distill_target_late"):
                    log.info("distillation target %s from step %d on%s%s", cfg.stage.distill_target_late, cfg.stage.distill_target_switch,
                             f" ({cfg.stage.distill_target} kept beside it at weight {cfg.stage.distill_keep_weight:g})"
                             if cfg.stage.get("distill_keep_weight") else "",
                             f", the learning rate x{cfg.stage.lr_late_scale:g}" if cfg.stage.get("lr_late_scale", 1.0) != 1.0 else "")

    def _setup_data(self) -> None:
        d = self.cfg.data
        set_max_image_pixels(d.max_image_pixels)
        if d.streaming:
            return self._setup_streaming()
        convs = []
        from fusion.formats import read_conversations

        # stage 1 keeps what prevalidation rendered (ids, labels, pixel tensors): no sample is rendered again at any step
        keep, budget = {}, d.render_cache_mb * 2**20 if self.cfg.stage.name == "sft" else 0
        for conv in read_conversations(d.path, d.format, d.image_root, d.on_error, self.report, allow_outside_root=d.allow_outside_root):
            try:
                if d.prevalidate and self.cache_mode == "off":
                    prepared = self._prepare(load_images(conv))  # decode + render + length check before the first step
                    if isinstance(prepared, RenderedConversation) and prepared.nbytes <= budget:
                        prepared.position_ids = self.model.mllm.rope_positions(prepared.input_ids, prepared.image_grid_thw).cpu()
                        keep[id(conv)] = prepared
                        budget -= prepared.nbytes
                convs.append(conv)
            except DataError as e:
                if d.on_error == "error" and e.kind not in NOT_FOR_THIS_STAGE:
                    raise
                self.report.add(e)
        if self.cache_mode != "off":
            convs = self._setup_cache(convs)
        if not convs:
            raise DataError(f"no usable samples ({self.report.summary()})", d.path)
        convs = self._setup_gain_batch(convs)
        if self.is_main:
            log.info("data: %d samples from %s; %s", len(convs), d.path, self.report.summary())
        rendered = {i: keep[id(c)] for i, c in enumerate(convs) if id(c) in keep}
        if rendered and self.is_main:
            log.info("data: %d of %d samples rendered once and kept (%.1f MB; data.render_cache_mb)%s", len(rendered), len(convs),
                     sum(r.nbytes for r in rendered.values()) / 2**20,
                     "; no loader workers needed" if len(rendered) == len(convs) and d.num_workers else "")
        self.dataset = ConversationDataset(convs, decode=self.cache is None, rendered=rendered)
        self.first_conv = convs[0]
        buckets = [tuple(b) for b in self.model.settings.get("buckets") or []] if self.cfg.stage.name == "align" else []
        if len(buckets) > 1:  # micro-batches within one bucket each
            from fusion.buckets import BucketBatchSampler

            of = [buckets.index(self._bucket_of(c)) for c in convs]
            self.sampler = BucketBatchSampler(of, self.cfg.stage.micro_batch_size, d.seed, self.rank, self.world)
            if self.is_main:
                counts = {f"{h}x{w}": of.count(i) for i, (h, w) in enumerate(buckets)}
                empty = sum(1 for v in counts.values() if not v)
                log.info("data: aspect-ratio buckets (samples each): %s%s", ", ".join(f"{k}: {v}" for k, v in counts.items() if v),
                         f" ({empty} of {len(buckets)} buckets empty)" if empty else "")
        else:
            self.sampler = SeededSampler(len(convs), d.seed, self.rank, self.world)

    def _bucket_of(self, conv: Conversation) -> tuple[int, int]:
        """A stage-2 conversation's bucket: the feature cache's record, else the nearest to its last assistant image
        (read from the image file's header, nothing decoded)."""
        from fusion.buckets import image_size

        if self.cache is not None:
            return tuple(self.cache.entry(conv)["bucket"])
        last = [item for role, item in conv.image_items() if role == "assistant"][-1]
        return self.model.bucket_for(*image_size(last["image"]))

    def _setup_streaming(self) -> None:
        """data.streaming: nothing is read up front but the first samples (the drawn sample, the gain batch)."""
        import itertools

        from fusion.formats import read_conversations

        d = self.cfg.data
        if d.num_workers and self.is_main:
            log.warning("data.streaming=true reads and decodes in the training process: data.num_workers=%d is not used", d.num_workers)
        st = self.cfg.stage
        want = max(1, st.gain_samples if st.name == "align" and st.gain_every else 1)
        head = list(itertools.islice(read_conversations(d.path, d.format, d.image_root, "skip", SkipReport(),
                                                        allow_outside_root=d.allow_outside_root, streaming=True), 4 * want))
        if not head:
            raise DataError("no usable samples in the first ones read (data.streaming=true)", d.path)
        self.first_conv = head[0]
        self.gain_convs, self.gain_held_out = [], False
        if st.name == "align" and st.gain_every and len(head) >= 2:
            self.gain_convs = [c for c in head if c.num_target_images()][:want]
        if self.is_main:
            log.info("data: streaming from %s (%s; shuffle buffer %d); checks run as samples arrive%s", d.path, d.format, d.shuffle_buffer,
                     f"; conditioning gain on the first {len(self.gain_convs)} (not held out)" if self.gain_convs else "")
        self.dataset = self.sampler = StreamingConversations(d, self.rank, self.world)

    def _setup_gain_batch(self, convs: list[Conversation]) -> list[Conversation]:
        """The fixed batch of the conditioning-gain instrument (fusion/gain.py): the last ``stage.gain_samples``
        conversations, held out of training when the data has at least 10x as many; returns the training set."""
        st = self.cfg.stage
        self.gain_convs: list[Conversation] = []
        self.gain_held_out = False
        if st.name != "align" or not st.gain_every:
            return convs
        n = min(st.gain_samples, len(convs))
        if n < 2:
            return convs
        self.gain_convs = convs[-n:]
        if len(convs) >= 10 * st.gain_samples:
            self.gain_held_out = True
            convs = convs[:-n]
        if self.is_main:
            log.info("conditioning gain: every %d steps on %d %s conversations", st.gain_every, n,
                     "held-out" if self.gain_held_out else "training (too few to hold out)")
        return convs

    def _gain_samples(self) -> list:
        if not hasattr(self, "_gain_prepared"):
            g = torch.Generator().manual_seed(12_345)
            self._gain_prepared = []
            for c in self.gain_convs:
                try:
                    self._gain_prepared.append(self._prepare(c if self.cache is not None else load_images(c), g))
                except DataError as e:  # e.g. a conversation with no assistant image: not in the gain batch
                    log.debug("conditioning gain: %s left out (%s)", c.where, e)
        return self._gain_prepared

    def _measure_gain(self) -> dict[str, float]:
        from fusion.gain import conditioning_gain, erosion_warning, gain_warning, summary_line

        samples = self._gain_samples()
        if len(samples) < 2:
            return {}
        gain = conditioning_gain(self.model, samples, rows_per_pass=self.cfg.stage.gain_rows)
        st = self.cfg.stage
        if not self.is_main:
            return gain
        self.gain_history.append({"step": self.state.step, **gain})
        log.info("step %d: %s", self.state.step, summary_line(gain))
        warm = max(st.warmup_steps, st.distill_steps, st.generator_frozen_steps)
        warning = gain_warning(gain, st.gain_warn) if self.state.step > warm else None
        if warning:
            log.warning("step %d: %s", self.state.step, warning)
        erosion = erosion_warning(self.gain_history[:-1], gain, st.erosion_warn)
        if erosion:
            log.warning("step %d: %s", self.state.step, erosion)
        return gain

    def _log_gain(self) -> None:
        gain = self._measure_gain()
        if gain and self.is_main:
            self.logger.log({f"gain/{k}": v for k, v in gain.items() if "@" in k or k == "gain"}, step=self.state.step)

    def _setup_cache(self, convs: list[Conversation]) -> list[Conversation]:
        """Find (or build) the feature cache of these conversations; returns the ones it can train on."""
        self.cache, self.cache_info = self._feature_cache(convs, self.cfg.data.path)
        return self._cached_usable(self.cache, convs, self.report)

    def _feature_cache(self, convs: list[Conversation], data_path: str):
        """(FeatureCache, info) of ``convs`` read from ``data_path``: found, or built (``cache=auto|build``)."""
        from fusion import feature_cache as fc

        cfg, model = self.run_cfg, self.model
        st = cfg.stage
        side = st.image_size or model.generator.image_size
        gen_path = Path(cfg.generator.path)
        parts = {"format": fc.FORMAT, "mllm": fc.folder_fingerprint(cfg.mllm.path), "layers": list(model.mllm.hidden_layers),
                 "pixels": [cfg.mllm.min_pixels, cfg.mllm.max_pixels], "max_length": cfg.mllm.max_length, "image_size": side,
                 "vae": fc.folder_fingerprint(gen_path / "vae" if (gen_path / "vae").is_dir() else cfg.generator.path),
                 "dtype": cfg.cache.dtype if cfg.cache.dtype != "auto" else cfg.mllm.dtype,
                 "data_path": str(Path(data_path).resolve()), "data": fc.data_fingerprint(data_path, convs)}
        if model.settings.get("buckets"):  # (absent without buckets: the keys of caches built before them stay valid)
            parts["buckets"] = model.settings["buckets"]
        if self.cache_kind == "kv":  # query connectors: every layer's keys and values (absent for hidden states: older keys stay valid)
            parts["kind"] = "kv"
        key = fc.cache_key(parts)
        root = Path(cfg.cache.dir)
        found = fc.find(root, key)
        built = False
        if found is None:
            why = fc.explain_miss(root, parts)
            if self.cache_mode == "use":
                raise CheckpointError(f"cache=use: no feature cache {key} in {root} for this MLLM, layer selection, image size, VAE "
                                      f"and data {data_path} ({why}); build it with cache=build")
            if self.is_main:
                log.info("feature cache %s: building for %s (%s)", key, data_path, why)
            stand_in = model.mllm
            if isinstance(stand_in, fc.MLLMFolder):
                real = instantiate(cfg.mllm, device=self.device)
                real.hidden_layers = list(stand_in.hidden_layers)
                real.eval().requires_grad_(False)
                model.mllm = real
            try:
                found = fc.build(model, convs, root, key, parts, cfg.data.on_error, SkipReport(), parts["dtype"],
                                 cfg.cache.shard_samples, self.rank, self.world, progress=self.is_main)
            finally:
                model.mllm = stand_in
            built = True
        elif self.is_main:
            log.info("feature cache %s: using %s", key, found)
        cache = fc.FeatureCache(found)
        return cache, {"key": key, "path": str(found), "built": built, "samples": len(cache), "build_seconds": cache.manifest.get("seconds")}

    def _cached_usable(self, cache, convs: list[Conversation], report: SkipReport) -> list[Conversation]:
        usable = []
        for conv in convs:  # the samples the uncached path would keep after prevalidation
            try:
                cache.entry(conv)
                usable.append(conv)
            except DataError as e:
                if self.cfg.data.on_error == "error" and e.kind not in NOT_FOR_THIS_STAGE:
                    raise
                report.add(e)
        return usable

    def _setup_distill_data(self) -> None:
        """``stage.distill_data``: the text-only conversations the distillation warm-up reads beside the data (none when
        the run resumes past the warm-up). Relative image paths resolve against the corpus file's own folder."""
        st = self.cfg.stage
        self.distill_convs, self.distill_cache = [], None
        if st.name != "align" or not st.distill_data or self.state.step >= st.distill_steps:
            return
        from fusion.data import drawings_as_placeholders, read_jsonl

        d = self.cfg.data
        if not Path(st.distill_data).is_file():
            raise DataError("stage.distill_data: file not found (the toy world writes toyworld/distill.jsonl: python tools/make_toy.py "
                            "n_distill=1500; stage.distill_data=null trains without one)", st.distill_data, kind="missing_file")
        report = self.distill_report = SkipReport()
        convs = []
        for conv in read_jsonl(st.distill_data, None, d.on_error, report, d.allow_outside_root, convert=drawings_as_placeholders):
            try:
                if not conv.num_target_images():
                    raise DataError("stage.distill_data: no assistant drawing: the distillation has nothing to read", conv.source,
                                    conv.line, kind="no_drawing")
                if self.cache_mode == "off" and d.prevalidate:
                    self.model.mllm.render(load_images(conv))  # decode + length check before the first step
                convs.append(conv)
            except DataError as e:
                if d.on_error == "error":
                    raise
                report.add(e)
        if self.cache_mode != "off":
            self.distill_cache, info = self._feature_cache(convs, st.distill_data)
            self.cache_info["distill_data"] = info
            convs = self._cached_usable(self.distill_cache, convs, report)
        if not convs:
            raise DataError(f"stage.distill_data: no usable sample ({report.summary()})", st.distill_data)
        self.distill_convs = convs
        if self.is_main:
            log.info("distillation data: %d conversations from %s (%s), %d added to each micro-batch of the %d warm-up steps "
                     "(never in the flow loss)", len(convs), st.distill_data, report.summary(), st.distill_data_batch, st.distill_steps)

    def _distill_extra(self, micro: int, generator: torch.Generator) -> list:
        """This micro-batch's ``stage.distill_data`` samples (the warm-up only), drawn by the step's seed; a sample that
        fails to load is counted in the corpus's skip report (data.on_error=skip) or stops the run naming it."""
        st = self.cfg.stage
        if not self.distill_convs or self.state.step >= st.distill_steps:
            return []
        if self.model.distill_target() != st.distill_target:
            return []  # read by the first target only (a velocity target would have no drawing to judge them by)
        pick = torch.Generator().manual_seed((st.seed * 1_000_003 + self.state.step * 1009 + micro) * 137 + self.rank + 7)
        out = []
        for i in torch.randint(len(self.distill_convs), (st.distill_data_batch,), generator=pick).tolist():
            conv = self.distill_convs[i]
            try:
                if self.distill_cache is not None:
                    sample = self.distill_cache.sample(conv, self.model.settings, generator)
                else:
                    sample = self.model.prepare_align_sample(load_images(conv), generator)
            except DataError as e:
                if self.cfg.data.on_error == "error":
                    raise
                self.distill_report.add(e)
                continue
            out.append(dataclasses.replace(sample, text_only=True))
        return out

    def _loader(self):
        if isinstance(self.dataset, StreamingConversations):
            return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.stage.micro_batch_size, collate_fn=collate)
        # every sample rendered once and kept: a loader worker would only copy tensors across processes
        workers = 0 if len(self.dataset.rendered) == len(self.dataset) else self.cfg.data.num_workers
        batching = {"batch_sampler": self.sampler} if hasattr(self.sampler, "batches") else \
            {"batch_size": self.cfg.stage.micro_batch_size, "sampler": self.sampler}
        return torch.utils.data.DataLoader(self.dataset, **batching, num_workers=workers, collate_fn=collate, persistent_workers=False,
                                           worker_init_fn=_ignore_stop_signals if workers else None)

    def _setup_engine(self) -> None:
        import deepspeed

        st = self.cfg.stage
        self.module = StageModule(self.model, st.name)
        groups = self.model.param_groups(st)
        wrapped = {id(p) for p in self.module.parameters()}
        outside = [g["name"] for g in groups if any(id(p) not in wrapped for p in g["params"])]
        if outside:  # DeepSpeed clears, reduces and checkpoints only what it wraps: such a part's gradients would sum forever
            raise ConfigError(f"stage={st.name}: {', '.join(outside)} would train outside the module DeepSpeed wraps "
                              f"(stage.trainable / lr_scale); that part does not train in this stage")
        optimizer = self.inner_optimizer = GuardedAdamW(groups, betas=(0.9, 0.999), eps=1e-8,
                                                             **({"fused": True} if st.adam_fused else {"foreach": True}))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multipliers(st, [g["name"] for g in groups]))
        ds = deepspeed_config(self.cfg.deepspeed, st, self.device, self.world)
        if ds["zero_optimization"]["stage"] != self.cfg.deepspeed.zero_stage and self.is_main:
            log.info("one rank: ZeRO-%d runs as ZeRO-0 (nothing to partition; deepspeed.single_rank_zero0=false keeps it)",
                     self.cfg.deepspeed.zero_stage)
        single = self.world == 1 and ds["zero_optimization"]["stage"] == 0
        self.zero_stage, self.bf16 = ds["zero_optimization"]["stage"], ds["bf16"]["enabled"]
        if single:  # one rank, no partitions: the guarded step clips with the norm it computes anyway (DeepSpeed would walk every
            optimizer.clip_norm, ds["gradient_clipping"] = ds["gradient_clipping"], 0.0  # parameter again for a second norm)
        if ds["bf16"]["enabled"]:
            log.info("bf16 mixed precision on")
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        if single:  # averaging gradients over one rank changes nothing: skip the flatten/all-reduce/unflatten of every backward
            self.engine.enable_backward_allreduce = False
        self.ema = None
        if st.ema_decay > 0:
            if self.cfg.deepspeed.zero_stage == 3:
                raise ConfigError("stage.ema_decay with deepspeed.zero_stage=3 is not supported (partitioned weights)")
            self.ema = {n: p.detach().float().clone() for n, p in self.module.named_parameters() if p.requires_grad}

    # -- numerical faults ----------------------------------------------------------
    def _inject_inf_gradient(self):
        """Fault injection (``inf_grad``, fusion/faults.py): the next backward gives one trainable gradient +Inf. Returns the hook."""
        p = next(p for p in self.module.parameters() if p.requires_grad)
        return p.register_hook(lambda g: torch.full_like(g, float("inf")))

    def _nonfinite_verdict(self, bad: bool, losses: list[torch.Tensor]) -> bool:
        """Applies stage.on_nonfinite to this step's verdict (``bad``: its loss or a gradient was NaN / Inf on some rank,
        so :class:`GuardedAdamW` skipped the update); returns ``bad``."""
        if not bad:
            self.state.nonfinite_run = 0
            return False
        st = self.cfg.stage
        step = self.state.step + 1
        self.state.nonfinite += 1
        self.state.nonfinite_run += 1
        last = self.complete_checkpoints()
        where = f"the newest complete checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        if st.on_nonfinite == "stop":
            raise NumericalError(f"step {step}: the loss or a gradient is NaN/Inf (loss {[float(x) for x in losses]}); "
                                 f"stage.on_nonfinite=stop; {where}")
        if self.state.nonfinite_run > st.max_nonfinite_in_a_row:
            raise NumericalError(f"step {step}: {self.state.nonfinite_run} steps in a row had a NaN/Inf loss or gradient "
                                 f"(stage.max_nonfinite_in_a_row={st.max_nonfinite_in_a_row}); the run diverged; {where}")
        if self.is_main:
            log.warning("step %d: NaN/Inf loss or gradient: optimizer step skipped (%d so far; stage.on_nonfinite=skip_step)",
                        step, self.state.nonfinite)
        return True

    # -- interruption ---------------------------------------------------------------
    def _install_stop_handler(self) -> None:
        """SIGTERM (schedulers' preemption) and SIGINT: finish the step, save a checkpoint, exit; a second one kills."""
        self._stop_signal = 0
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        first = [0.0]

        def handler(signum, frame):
            if self._stop_signal:
                # Launchers and schedulers repeat the signal (a terminal's Ctrl-C reaches every rank, then the launcher
                # forwards SIGTERM): repeats are ignored; only a Ctrl-C pressed again seconds later stops at once.
                if signum == signal.SIGINT and time.monotonic() - first[0] > 3.0:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
            self._stop_signal, first[0] = signum, time.monotonic()
            log.warning("received %s: finishing this step, then saving a checkpoint and exiting (Ctrl-C again after 3 s stops at once)",
                        signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(bool(self._stop_signal)), device=self.device)  # nccl reduces device tensors only
        torch.distributed.all_reduce(flag)
        return flag.item() > 0

    # -- checkpoints ---------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        if not self.ckpt_dir.is_dir():
            return []
        found = [p for p in self.ckpt_dir.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))

    def save_checkpoint(self, checksums: bool | None = None) -> Path:
        """Write a checkpoint of this step (``checksums``: sha256 in files.json, default stage.checkpoint_checksums)."""
        step = self.state.step
        final = self.ckpt_dir / f"{CKPT_PREFIX}{step:07d}"
        partial = self.ckpt_dir / f".partial-{step:07d}"
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        torch.distributed.barrier()
        client = {"train_state": self.state.__dict__, "report": dict(self.report.counts), "teacher": self.teacher_id}
        self.engine.save_checkpoint(str(partial), tag="state", client_state=client, save_latest=False)
        if self.ema is not None:
            torch.save(self.ema, partial / f"ema_rank{self.rank}.pt")
        # each rank's own place in the data: ranks' shards differ in length, so they cross epoch boundaries at different steps
        (partial / f"data_rank{self.rank}.json").write_text(json.dumps({"epoch": self.state.epoch, "position": self.state.position}))
        torch.distributed.barrier()
        faults.maybe_signal("kill_in_checkpoint", step)
        if self.is_main:
            write_file_list(partial, self.cfg.stage.checkpoint_checksums if checksums is None else checksums)
            (partial / COMPLETE).write_text(json.dumps({"step": step, "world_size": self.world, "version": 2}))
            faults.maybe_signal("kill_before_rename", step)
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            keep = self.cfg.stage.keep_checkpoints
            if keep > 0:
                for old in self.complete_checkpoints()[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()
        return final

    def _newest_intact_checkpoint(self) -> Path | None:
        """resume=auto: the newest complete checkpoint whose files match their list; damaged ones are
        renamed ``broken-step-*`` (kept for inspection, never picked again) with a warning. Rank 0
        decides for every rank."""
        choice: list[Any] = [None]
        if self.is_main:
            for ckpt in reversed(self.complete_checkpoints()):
                problems = verify_checkpoint(ckpt)
                if not problems:
                    choice[0] = str(ckpt)
                    break
                broken = ckpt.with_name("broken-" + ckpt.name)
                log.warning("resume=auto: %s is damaged (%s); renamed to %s, trying the previous checkpoint",
                            ckpt, "; ".join(problems[:3]), broken.name)
                shutil.rmtree(broken, ignore_errors=True)
                ckpt.rename(broken)
            else:
                if any(self.ckpt_dir.glob("broken-" + CKPT_PREFIX + "*")):
                    log.warning("resume=auto: no intact checkpoint left; starting from step 0")
        torch.distributed.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def _maybe_resume(self) -> None:
        mode = self.cfg.resume
        if mode == "never":
            return
        if mode == "auto":
            ckpt = self._newest_intact_checkpoint()
            if ckpt is None:
                return
        else:
            ckpt = Path(mode)
            if not (ckpt / COMPLETE).is_file():
                raise CheckpointError(f"resume={mode}: not a complete checkpoint folder (no {COMPLETE})")
            problems = verify_checkpoint(ckpt)
            if problems:
                raise CheckpointError(f"resume={mode}: the checkpoint is damaged: {'; '.join(problems[:5])}")
        meta = json.loads((ckpt / COMPLETE).read_text())
        if meta.get("world_size") != self.world:
            raise CheckpointError(f"resume: {ckpt} was written by {meta.get('world_size')} ranks; this run has {self.world}")
        keep = self._generator_from_folder(ckpt)
        try:
            _, client = self.engine.load_checkpoint(str(ckpt), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True)
        except RuntimeError as e:
            if "frame_selector." not in str(e) or "Missing key" not in str(e):
                raise
            raise CheckpointError(f"resume: {ckpt} holds no weights of the learned frame head: it was written by a run without "
                                  f"stage.frame_select=learned, or before the head was checkpointed with the model (its gradients "
                                  f"then also summed over every step); start the run again (resume=never)") from None
        except ValueError as e:  # torch.optim's load_state_dict: the optimizer's groups are not this run's
            if "parameter group" not in str(e):
                raise
            raise CheckpointError(f"resume: {ckpt}'s optimizer state does not fit this run's ({e}): it was written by a run that "
                                  f"trained other parts or groups (stage.trainable, LoRA, stage.lr_scale); resume with the same "
                                  f"settings, or start again from its weights (init_from=<its final export>, resume=never)") from None
        self.state = TrainState(**client["train_state"])
        self.report.counts.update(client.get("report", {}))
        own = ckpt / f"data_rank{self.rank}.json"
        if own.is_file():  # (checkpoints written before these files: rank 0's place for every rank)
            where = json.loads(own.read_text())
            self.state.epoch, self.state.position = int(where["epoch"]), int(where["position"])
        self.sampler.epoch, self.sampler.start = self.state.epoch, self.state.position
        if self.ema is not None and (ckpt / f"ema_rank{self.rank}.pt").is_file():
            self.ema = torch.load(ckpt / f"ema_rank{self.rank}.pt")
        if keep is not None:  # (after the EMA: its copies of the generator's weights follow the folder's)
            self._restore_generator(ckpt, keep, client)
        if self.is_main:
            log.info("resumed from %s at step %d", ckpt, self.state.step)

    def _stop_before_generator(self, why: str) -> dict[str, Any]:
        """stage.stop_before_generator: this step's checkpoint (none at step 0), and what the summary says."""
        ckpt = None
        if self.state.step:  # (save_every may have written this step's already)
            have = [c for c in self.complete_checkpoints() if c.name == f"{CKPT_PREFIX}{self.state.step:07d}"]
            ckpt = have[0] if have else self.save_checkpoint()
        if self.is_main:
            log.info("stage.stop_before_generator: %s; %s", why,
                     f"saved {ckpt}; the same command without stop_before_generator goes on from there (resume=auto, and "
                     f"resume_generator=folder on another copy of the generator)" if ckpt else "nothing to run before it")
        return {"step": self.state.step, "checkpoint": str(ckpt) if ckpt else None, "reason": "stage.stop_before_generator"}

    def _generator_from_folder(self, ckpt: Path) -> dict[str, torch.Tensor] | None:
        """resume_generator=folder: the generator's weights as this run loaded them (a copy on the CPU, restored after the
        checkpoint's), after the checks that this is sound; None with resume_generator=checkpoint or where the checkpoint's
        run has already trained its generator (past stage.generator_frozen_steps: the checkpoint's weights are then the
        run's own, as after a stop in the steps that go on from such a warm-up). A generator that never trains
        (stage.trainable.generator=frozen) is the folder's at every step: see :meth:`_restore_generator`."""
        if self.cfg.get("resume_generator", "checkpoint") != "folder":
            return None
        if self.cfg.stage.name != "align" or self.model.generator is None:
            raise ConfigError("resume_generator=folder is for stage=align (the generator's weights from generator.path)")
        if self.zero_stage == 3:
            raise ConfigError("resume_generator=folder does not support deepspeed.zero_stage=3 (each rank holds a shard of the "
                              "generator's weights); use ZeRO 0-2")
        step = json.loads((ckpt / COMPLETE).read_text()).get("step", 0)
        if self.cfg.stage.trainable.generator != "frozen" and step > self.cfg.stage.generator_frozen_steps:
            if self.is_main:
                log.info("resume_generator=folder: %s was written at step %d, after the generator began to train "
                         "(stage.generator_frozen_steps=%d): its weights are this run's own, taken from the checkpoint", ckpt, step,
                         self.cfg.stage.generator_frozen_steps)
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.generator.transformer.state_dict().items()}

    def _restore_generator(self, ckpt: Path, keep: dict[str, torch.Tensor], client: dict) -> None:
        if "teacher" in client and client["teacher"] == self.teacher_id:
            now = self.model.generator.transformer.state_dict()
            if all(torch.equal(v, now[k].detach().to("cpu")) for k, v in keep.items()):  # e.g. a frozen DiT's run stopped after
                if self.is_main:  # its own resume from the warm-up: it already reads the folder's generator
                    log.info("resume_generator=folder: the generator's weights in %s are the ones in %s already", ckpt,
                             self.cfg.generator.path)
                return
        if self.state.generator_steps:
            raise CheckpointError(f"resume_generator=folder: the run that wrote {ckpt} ran its generator in {self.state.generator_steps} "
                                  f"steps (the flow loss or the velocity distillation target): what it learned answers that copy; "
                                  f"resume with resume_generator=checkpoint")
        if "teacher" not in client:
            raise CheckpointError(f"resume_generator=folder: {ckpt} was written before checkpoints recorded their distillation "
                                  f"teacher, so it cannot be checked against {self.cfg.generator.path}; resume with "
                                  f"resume_generator=checkpoint or start again (resume=never)")
        if client["teacher"] != self.teacher_id:
            raise CheckpointError(f"resume_generator=folder: the distillation teacher in {self.cfg.generator.path} (text_encoder/, "
                                  f"tokenizer/) is not the one the run that wrote {ckpt} read: the connector was distilled onto "
                                  f"another text encoder; start the run again (resume=never)")
        self.model.generator.transformer.load_state_dict(keep)
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if (self.zero_stage > 0 or self.bf16) and self.cfg.stage.trainable.generator != "frozen":  # (a frozen DiT has no master
            # weights, and a refresh would round every other part's to the module's dtype)
            if refresh is None:  # a wrapper that keeps master weights but cannot refresh them from the module's
                raise ConfigError(f"resume_generator=folder: {type(self.engine.optimizer).__name__} keeps its own copy of the weights "
                                  "and cannot refresh it; use ZeRO 0 without bf16")
            refresh()  # ZeRO-1/2 and bf16 keep fp32 master weights: read again from the module's, as a fresh run builds them
        if self.ema is not None:  # its copies of the generator's weights follow
            mine = {id(p) for p in self.model.generator.transformer.parameters()}
            for n, p in self.module.named_parameters():
                if id(p) in mine and n in self.ema:
                    self.ema[n] = p.detach().float().clone()
        if self.is_main:
            log.info("resume_generator=folder: the generator's weights from %s (the checkpoint's run read another copy of it; "
                     "the same distillation teacher)%s", self.cfg.generator.path,
                     "; the frame head's labels of the first %d steps came from that copy" % self.state.step
                     if self.cfg.stage.get("frame_select") == "learned" else "")

    # -- steps ---------------------------------------------------------------------
    def _prepare(self, conv: Conversation | RenderedConversation, generator: torch.Generator | None = None):
        if isinstance(conv, RenderedConversation):  # kept from prevalidation (stage 1)
            return conv
        if self.cache is not None:
            return self.cache.sample(conv, self.model.settings, generator)
        if self.cfg.stage.name == "sft":
            if not conv.has_assistant_turn():
                raise DataError("no assistant turn to learn from (stage 1 skips it)", conv.source if conv.line is not None else None, conv.line,
                                kind="no_assistant_turn")
            return self.model.mllm.render(conv)  # raises on over-long samples; the loss uses this rendering
        return self.model.prepare_align_sample(conv, generator)

    def _next_batch(self, it, generator: torch.Generator):
        """The next micro-batch of prepared samples, applying the data policy to lazy errors. Two epochs in a row with
        nothing usable (every sample skipped, or an empty shard) stop the run with the skip report, never a silent spin."""
        empty_epochs = 0
        while True:
            try:
                items = next(it)
            except StopIteration:
                empty_epochs = 0 if self._batch_this_epoch else empty_epochs + 1
                if empty_epochs >= 2:
                    raise DataError(f"rank {self.rank}: a whole epoch of data gave no usable sample for stage {self.cfg.stage.name} "
                                    f"({self.report.summary()})", self.cfg.data.path) from None
                self._batch_this_epoch = False
                self.state.epoch += 1
                self.state.position = 0
                self.sampler.epoch, self.sampler.start = self.state.epoch, 0
                it = iter(self._loader())
                continue
            self.state.position += len(items)
            batch = []
            for item in items:
                try:
                    if isinstance(item, DataError):
                        raise item
                    batch.append(self._prepare(item, generator))
                except DataError as e:
                    if self.cfg.data.on_error == "error" and e.kind not in NOT_FOR_THIS_STAGE:
                        raise
                    self.report.add(e)
            if batch:
                self._batch_this_epoch = True
                return batch, it

    def _step_generator(self, micro: int) -> torch.Generator:
        seed = (self.cfg.stage.seed * 1_000_003 + self.state.step * 1009 + micro) * 131 + self.rank
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        return torch.Generator().manual_seed(seed)

    def _update_ema(self) -> None:
        d = self.cfg.stage.ema_decay
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                if n in self.ema:
                    self.ema[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def _draw_samples(self) -> None:
        """Draw one image for a fixed sample into samples/step-N.png (and the logger)."""
        from backbones.generator.base import to_pil

        m = self.model
        was = m.connector.training, m.generator.transformer.training
        m.connector.eval()
        m.generator.transformer.eval()
        try:
            conv = self.first_conv
            sample = self._prepare(conv if self.cache is not None else load_images(conv))
            with torch.no_grad():
                states, mask, _ = m.sample_states(sample)
                frames = m.condition_frames(sample)
                cond = None if frames is None else frames[None]
                f = m.generator.spatial_factor  # at the sample's own size (its bucket with data.buckets)
                img = m.generator.sample(states, mask, cond, steps=self.cfg.stage.sample_steps, guidance=self.cfg.stage.sample_guidance,
                                         generator=torch.Generator().manual_seed(0), height=sample.target.shape[-2] * f,
                                         width=sample.target.shape[-1] * f)
        finally:
            m.connector.train(was[0])
            m.generator.transformer.train(was[1])
        path = self.out / "samples" / f"step-{self.state.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pil = to_pil(img)[0]
        pil.save(path)
        self.logger.log_images({"sample": pil}, step=self.state.step)

    def _train_step(self, it):
        """One optimizer step (``stage.grad_accum`` micro-batches from the loader iterator ``it``): (iterator, metrics)."""
        st = self.cfg.stage
        metrics: dict[str, float] = {}
        step_losses = []
        self.model.step = self.state.step
        if self.cfg.stage.name == "align" and self.model.reads_generator(self.state.step):
            self.state.generator_steps += 1
        for micro in range(st.grad_accum):
            batch, it = self._next_batch(it, self._step_generator(micro))
            extra = self._distill_extra(micro, self._step_generator(micro))
            if self.distill_convs:
                metrics["distill_data"] = metrics.get("distill_data", 0.0) + len(extra) / st.grad_accum
            batch = batch + extra
            out = self.engine(batch, self._step_generator(micro))
            if faults.due("nan_loss", self.state.step + 1):
                out["loss"] = out["loss"] * float("nan")
            inject = self._inject_inf_gradient() if micro == 0 and faults.due("inf_grad", self.state.step + 1) else None
            step_losses.append(out["loss"].detach())
            self.engine.backward(out["loss"])
            if inject is not None:
                inject.remove()
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) / st.grad_accum
            if micro == st.grad_accum - 1:  # the accumulation boundary: GuardedAdamW skips the update if anything went NaN / Inf
                self.inner_optimizer.nonfinite_loss = not math.isfinite(metrics["loss"])  # (a NaN / Inf of any micro-batch stays in the sum)
                self.inner_optimizer.last_step_nonfinite = False
            self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
        self._nonfinite_verdict(self.inner_optimizer.last_step_nonfinite, step_losses)
        self.inner_optimizer.nonfinite_loss = False
        self.state.step += 1
        if self.ema is not None:
            self._update_ema()
        if self.world > 1:
            loss = torch.tensor(metrics["loss"], device=self.device)
            torch.distributed.all_reduce(loss)
            metrics["loss"] = loss.item() / self.world
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["skipped"] = self.report.total
        metrics["nonfinite_steps"] = self.state.nonfinite
        return it, metrics

    def train(self) -> dict[str, Any]:
        self._setup_distributed()
        self._setup_model()
        self._setup_data()
        self._setup_engine()
        self._maybe_resume()
        self._setup_distill_data()
        self.logger = instantiate(self.cfg.logger, output_dir=str(self.out), run_config=OmegaConf.to_container(self.cfg, resolve=True),
                                  start_step=self.state.step, _recursive_=False) if self.is_main else None
        st = self.cfg.stage
        it = iter(self._loader())
        bar = tqdm(total=st.max_steps, initial=self.state.step, disable=not self.is_main, desc=f"{st.name}", dynamic_ncols=True)
        losses: list[float] = []
        t0 = time.time()
        self._install_stop_handler()
        interrupted = None
        self.gain_history: list[dict[str, float]] = []
        # every rank (ZeRO-3 gathers in the forward); not in a run that stops before the generator trains (stage.stop_before_generator:
        # the copy of the generator it would measure need not be the one the run goes on with)
        measure_gain = bool(st.name == "align" and st.gain_every and self.gain_convs and not st.get("stop_before_generator"))
        if measure_gain and self.state.step == 0:
            self._log_gain()
        while self.state.step < st.max_steps:
            if st.get("stop_before_generator") and self.model.reads_generator(self.state.step):
                interrupted = self._stop_before_generator(f"step {self.state.step + 1} is the first to run the generator")
                break
            cpushare.poll()  # make demo's parallel phases (fusion/cpushare.py)
            it, metrics = self._train_step(it)
            losses.append(metrics["loss"])
            if self.is_main:
                self.logger.log(metrics, step=self.state.step)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", skipped=self.report.total)
                bar.update(1)
            if st.name == "align" and st.sample_every and self.state.step % st.sample_every == 0 and self.is_main:
                self._draw_samples()
            if measure_gain and (self.state.step % st.gain_every == 0 or self.state.step == st.max_steps):
                self._log_gain()
            saved = False
            if st.save_every and self.state.step % st.save_every == 0 and self.state.step < st.max_steps:
                self.save_checkpoint()
                saved = True
            faults.maybe_signal("kill_after_step", self.state.step)
            faults.maybe_signal("term_after_step", self.state.step)
            if self.state.step < st.max_steps and self._stop_requested():
                ckpt = self.complete_checkpoints()[-1] if saved else self.save_checkpoint(checksums=False)  # sizes only: fast
                interrupted = {"step": self.state.step, "checkpoint": str(ckpt)}
                if self.is_main:
                    log.warning("stopped by a signal after step %d: saved %s; run the same command again to resume (resume=auto)",
                                self.state.step, ckpt)
                break
        bar.close()
        if interrupted is None and st.get("stop_before_generator"):  # the export holds the generator: the next run's to write
            interrupted = self._stop_before_generator(f"max_steps={st.max_steps} reached")
        final = self.export() if interrupted is None else None
        summary = {"steps": self.state.step, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                   "seconds": round(time.time() - t0, 2), "skipped": dict(self.report.counts), "export": str(final) if final else None,
                   "skip_examples": self.report.examples[:5], "feature_cache": self.cache_info or None,
                   "nonfinite_steps": self.state.nonfinite, "interrupted": interrupted,
                   "conditioning_gain": self.gain_history[-1] if self.gain_history else None,
                   "conditioning_gain_history": [{k: h[k] for k in ("step", "gain@0.3", "gain@0.5", "gain@0.7", "gain@0.9",
                                                                    "reference_gain@0.7", "reference_gain@0.9") if k in h}
                                                 for h in self.gain_history],
                   "gain_batch": {"conversations": len(self.gain_convs), "held_out": self.gain_held_out} if self.gain_convs else None}
        if self.is_main:
            write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
            if interrupted is None:
                log.info("done: %d steps, %s; %d NaN/Inf steps skipped; exported %s", self.state.step, self.report.summary(),
                         self.state.nonfinite, final)
            self.logger.finish()
        return summary

    def export(self) -> Path:
        """Save the fused model to <output_dir>/final (ZeRO-3 shards gathered; EMA weights if enabled)."""
        import deepspeed

        params = list(self.module.parameters())
        final = self.out / "final"
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.deepspeed.zero_stage == 3):
            if self.is_main:
                backup = None
                if self.ema is not None:
                    backup = {n: p.detach().clone() for n, p in self.module.named_parameters() if n in self.ema}
                    with torch.no_grad():
                        for n, p in self.module.named_parameters():
                            if n in self.ema:
                                p.copy_(self.ema[n].to(p.dtype))
                if self.cfg.stage.merge_lora_on_export and "mllm" in self.model.lora:
                    self.model.merge_lora("mllm")
                self.model.save_pretrained(final, config=self.cfg)
                if backup is not None:
                    with torch.no_grad():
                        for n, p in self.module.named_parameters():
                            if n in backup:
                                p.copy_(backup[n])
        torch.distributed.barrier()
        return final
