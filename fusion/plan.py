"""Plan a run before it spends a GPU-hour: exact parameter counts and per-GPU memory.

The fused model of a composed config is built on the meta device (``FusedModel.build(cfg,
device="meta")``: shapes only, no weights, no memory; published configs carry their full
architecture in the yaml), so every count is the real module's, to the parameter.

Per stage and per GPU, in bytes:

* **model states** (parameters, gradients, optimizer states) of the *trainable* parameters come
  from DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs``, with and without offload); the frozen parameters
  inside the engine add their 16-bit copy (replicated under ZeRO 0-2, sharded under ZeRO-3, on
  the CPU with ``offload_param``); the parts the trainer holds outside the engine (stage 2: the
  frozen MLLM and the VAE) are replicated on every GPU in their own dtypes. ZeRO 0 and 1 have no DeepSpeed estimator: the same per-parameter bytes
  (16-bit weights 2, gradients 2 + 4, fp32 master weights 4, Adam moments 8) are used, the
  optimizer states sharded under ZeRO-1.
* **activations**: the stage's forward (stage 1: the MLLM over ``micro_batch x seq_len`` with its
  logits and loss; stage 2: the frozen MLLM, the connector and the DiT's flow loss on one target
  with ``cond_frames`` earlier images, per sample) runs on the meta device while a
  ``saved_tensors_hooks`` counts every tensor autograd keeps for backward (each storage once,
  parameters excluded). Attention is counted as a fused kernel keeps it (q, k, v, output and the
  row log-sum-exp; no ``L x L`` matrix), as flash / memory-efficient SDPA does on GPUs. With
  gradient checkpointing, a checkpointed block keeps only its input, and the block with the most
  saved bytes is added once for its recomputation in backward.
* **reserve**: CUDA context, allocator fragmentation, communication buckets and transient
  buffers, a flat ``reserve_gb`` (not measured).

What is not counted: vision-tower activations when the vision tower trains (it is frozen in the
shipped stages), the optimizer's temporary buffers, and activation memory outside autograd.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

GB = 1024**3


@dataclass
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    cpu_memory_gb: float | None = None  # per node; None: not checked
    reserve_gb: float = 4.0

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Workload:
    micro_batch: int = 1
    seq_len: int = 2048
    image_size: int = 512
    cond_frames: int = 1


# ---------------------------------------------------------------------------- counting
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def unique_numel(params) -> int:
    """Parameters counted once each (tied weights share a storage), as DeepSpeed's model_to_params does."""
    return sum({_storage_key(p): p.numel() for p in params}.values())


def parts_with_vae(model) -> dict[str, nn.Module]:
    """The fused model's parts (mllm, vision_tower, connector, generator) and the VAE."""
    parts = dict(model.parts())
    if model.generator is not None:
        parts["vae"] = model.generator.vae
    return parts


def count_parts(model) -> dict[str, dict[str, int]]:
    """{part: {total, trainable}} for mllm, vision_tower, connector, generator (the DiT) and vae."""
    parts = parts_with_vae(model)
    seen: set[int] = set()
    out = {}
    for name, module in parts.items():
        total = trainable = 0
        for p in module.parameters():
            key = _storage_key(p)
            if key in seen:
                continue
            seen.add(key)
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        out[name] = {"total": total, "trainable": trainable}
    return out


def largest_layer_params(model: nn.Module) -> int:
    """The most parameters any one module owns directly (ZeRO-3 gathers one such layer at a time)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


# ---------------------------------------------------------------------------- model states
def model_states(trainable: int, frozen: int, largest_layer: int, zero_stage: int, offload_optimizer: str,
                 offload_param: str, hw: Hardware, bf16: bool = True) -> dict[str, Any]:
    """Per-GPU and per-node CPU bytes of parameters, gradients and optimizer states.

    ``source`` says whether DeepSpeed's estimator gave the trainable part ("deepspeed") or the
    per-parameter formula did (ZeRO 0/1, fp32)."""
    n, offload_opt, offload_p = hw.gpus, offload_optimizer != "none", offload_param != "none"
    frozen_bytes = 2 if bf16 else 4
    if bf16 and zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, hw.gpus_per_node, hw.nodes, cpu_offload=offload_opt)
        return {"gpu": gpu + frozen_bytes * frozen, "cpu_per_node": cpu, "trainable_gpu": gpu, "source": "deepspeed estimate_zero2_model_states_mem_needs"}
    if bf16 and zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, hw.gpus_per_node, hw.nodes,
                                                            cpu_offload=offload_opt, cpu_offload_params=offload_p)
        if offload_p:
            cpu += frozen_bytes * frozen / hw.nodes
            frozen_gpu = 0
        else:
            frozen_gpu = frozen_bytes * frozen / n
        return {"gpu": int(gpu + frozen_gpu), "cpu_per_node": int(cpu), "trainable_gpu": gpu, "source": "deepspeed estimate_zero3_model_states_mem_needs"}
    # ZeRO 0/1 (or fp32): weights, gradients (16-bit + fp32 accumulation), fp32 master weights + Adam moments
    w = 2 if bf16 else 4
    grads = (2 + 4) if bf16 else 4
    opt = 12 if bf16 else 8
    if zero_stage >= 2:  # fp32 under ZeRO 2/3: shard what DeepSpeed shards
        grads, opt = grads / n, opt / n
        if zero_stage == 3:
            w = w / n
    elif zero_stage == 1:  # optimizer states and the fp32 gradient partition sharded; 16-bit gradients whole
        opt = opt / n
        if bf16:
            grads = 2 + 4 / n
    cpu = 0.0
    if offload_opt:
        cpu, opt = opt * trainable * hw.gpus_per_node, 0
    gpu = trainable * (w + grads + opt) + frozen_bytes * frozen / (n if zero_stage == 3 else 1)
    return {"gpu": int(gpu), "cpu_per_node": int(cpu), "trainable_gpu": int(trainable * (w + grads + opt)), "source": "formula"}


# ---------------------------------------------------------------------------- activations
class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA on the meta device: keeps what a fused GPU kernel keeps for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the planner never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return _FusedAttention.apply(query, key, value)
    return query.new_empty(query.shape[:-1] + (value.shape[-1],))


@contextlib.contextmanager
def fused_attention():
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


class SavedCounter:
    """Counts the bytes autograd keeps for backward (each storage once, parameters excluded),
    split by block: {block name: bytes saved inside it, its input bytes}."""

    def __init__(self, model: nn.Module):
        self.params = {_storage_key(p) for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self.total = 0
        self.current: str | None = None
        self.blocks: dict[str, dict[str, int]] = {}

    def pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key not in self.params and key not in self.storages:
            size = t.untyped_storage().nbytes()
            self.storages[key] = size
            self.total += size
            if self.current is not None:
                self.blocks[self.current]["saved"] += size
        return t

    def hold(self, t: torch.Tensor) -> None:
        """Count a tensor that stays referenced until backward although autograd does not keep it."""
        current, self.current = self.current, None
        self.pack(t)
        self.current = current

    def watch(self, blocks: dict[str, nn.Module], part: str | None):
        """Forward hooks on ``blocks`` so saved bytes are attributed to them; ``part`` names the
        ``stage.gradient_checkpointing`` entry that checkpoints them (None: they cannot be)."""
        handles = []
        for name, block in blocks.items():
            def pre(module, args, kwargs, name=name):
                x = args[0] if args else kwargs.get("hidden_states")
                self.blocks[name] = {"saved": 0, "input": x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0,
                                     "part": part}
                self.current = name

            def post(module, args, kwargs, out):
                self.current = None

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        return handles

    def bytes(self, checkpointed: set[str] | frozenset = frozenset(), samples: int = 1) -> int:
        """Saved bytes of ``samples`` graphs like this one when the blocks of the ``checkpointed`` parts
        keep only their inputs; backward recomputes one block at a time, so the largest is added once."""
        ck = [b for b in self.blocks.values() if b["part"] in checkpointed]
        if not ck:
            return self.total * samples
        kept = self.total - sum(b["saved"] for b in ck) + sum(b["input"] for b in ck)
        return kept * samples + max(b["saved"] for b in ck)


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def measure_activations(model, stage: dict, work: Workload) -> dict[str, Any]:
    """Bytes autograd keeps for backward per GPU, without and with gradient checkpointing (see the module docstring)."""
    hf = model.mllm.model
    counter = SavedCounter(model)
    mllm_trains = any(p.requires_grad for p in model.mllm.language_model.parameters())
    # checkpointed MLLM blocks: when it trains, or when query connectors backpropagate through it frozen (fusion/model.py)
    mllm_ckpt = mllm_trains or (stage["name"] == "align" and getattr(model.connector, "uses_queries", False))
    handles = counter.watch({f"mllm.{i}": layer for i, layer in enumerate(model.mllm.language_model.layers)},
                            "mllm" if mllm_ckpt else None)
    if model.generator is not None:
        handles += counter.watch({f"dit.{i}": b for i, b in enumerate(model.generator.dit_blocks())}, "generator")
    notes = []
    b, length = work.micro_batch, work.seq_len
    try:
        with torch.enable_grad(), fused_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            if stage["name"] == "sft":
                ids = torch.zeros(b, length, dtype=torch.long, device="meta")
                pos = torch.zeros(3, b, length, dtype=torch.long, device="meta")
                logits = model.mllm(ids, position_ids=pos, compute_logits=True)["logits"]
                flat = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
                flat.sum()
                per_sample = 1
            else:
                _align_forward(model, work, notes, counter)
                per_sample = b  # stage 2 keeps every sample's graph until the one backward
    finally:
        for h in handles:
            h.remove()
    if stage.get("trainable", {}).get("vision_tower"):
        notes.append("vision-tower activations are not counted (it trains in this stage)")
    ck = set(stage.get("gradient_checkpointing") or [])
    if stage["name"] == "align" and getattr(model.connector, "align_weight", 0.0) > 0:
        notes.append("the multi-scale alignment loss's own activations (one DiT block's grid) are not counted")
    ran = {b["part"] for b in counter.blocks.values()}  # parts whose blocks ran and can be checkpointed
    able = [p for p in ("mllm", "generator") if p in ran]
    return {"bytes": counter.bytes(samples=per_sample), "bytes_checkpointed": counter.bytes(set(able), per_sample),
            "bytes_stage": counter.bytes(ck, per_sample), "checkpointable": able,
            "stage_checkpoints": [p for p in able if p in ck], "notes": notes}


def _align_forward(model, work: Workload, notes: list[str], counter: SavedCounter) -> None:
    """One stage-2 sample on the meta device: the MLLM's context states, the connector, the DiT's flow loss."""
    mllm, gen, conn = model.mllm, model.generator, model.connector
    hf = mllm.model
    length = work.seq_len
    dtype = hf.dtype
    if getattr(conn, "uses_queries", False):
        nq = conn.query_embeds().shape[0]
        emb = torch.cat([_meta(1, length, mllm.hidden_size, dtype=dtype), conn.query_embeds()[None].to(dtype)], dim=1)
        ids = torch.zeros(1, length + nq, dtype=torch.long, device="meta")
        pos = torch.zeros(3, 1, length + nq, dtype=torch.long, device="meta")
        hidden = mllm(ids, position_ids=pos, inputs_embeds=emb, compute_logits=False)["hidden"][:, :, length:]
        out = conn(hidden)
    else:
        ids = torch.zeros(1, length, dtype=torch.long, device="meta")
        pos = torch.zeros(3, 1, length, dtype=torch.long, device="meta")
        with torch.no_grad():
            hidden = mllm(ids, position_ids=pos, compute_logits=False)["hidden"]
        counter.hold(hidden)  # the packed context states stay referenced until the step ends
        out = conn(hidden, torch.ones(1, length, dtype=torch.long, device="meta"))
    f = gen.spatial_factor
    side = work.image_size // f
    c = gen.latent_channels
    target = _meta(1, c, side, side, dtype=torch.float32)
    cond = _meta(1, work.cond_frames, c, side, side, dtype=torch.float32) if work.cond_frames and gen.uses_condition_frames else None
    if work.cond_frames and not gen.uses_condition_frames:
        notes.append("this generator takes no condition frames: cond_frames ignored")
    t = _meta(1, dtype=torch.float32)
    noise = _meta(1, c, side, side, dtype=torch.float32)
    gen.flow_loss(target, cond, out.states.to(gen.dtype), out.mask, t, noise)


# ---------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    name: str
    config: str
    workload: dict[str, Any]
    trainable: dict[str, int]
    frozen: int
    model_states: dict[str, Any]
    activations: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    fits: bool = False


#: per stage: the parts DeepSpeed's engine wraps (``fusion.train.StageModule``) and the parts held outside it
ENGINE = {"sft": ("mllm", "vision_tower"), "align": ("connector", "generator", "frame_selector")}
LOADED = {"sft": ("mllm", "vision_tower"), "align": ("mllm", "vision_tower", "connector", "generator", "frame_selector", "vae")}


def plan_stage(model, stage: dict, ds: dict, hw: Hardware, work: Workload, config_name: str = "") -> StagePlan:
    """Counts, model states and activations of one stage; ``rows`` = one per ZeRO option with its per-GPU total.

    As the trainer runs it: stage 1 loads the MLLM only and hands all of it to DeepSpeed; stage 2
    hands the connector and the DiT to DeepSpeed and holds the frozen MLLM and the VAE outside the
    engine, replicated on every GPU in their own dtypes (never sharded, never offloaded)."""
    model.apply_trainable(stage)
    name = stage["name"]
    parts = parts_with_vae(model)
    engine = [parts[p] for p in ENGINE[name] if p in parts]
    outside = [parts[p] for p in LOADED[name] if p in parts and p not in ENGINE[name]]
    engine_params = list({_storage_key(p): p for m in engine for p in m.parameters()}.values())
    trainable = sum(p.numel() for p in engine_params if p.requires_grad)
    frozen_engine = sum(p.numel() for p in engine_params if not p.requires_grad)
    outside_bytes = sum(p.numel() * p.element_size() for m in outside for p in m.parameters())
    outside_params = sum(p.numel() for m in outside for p in m.parameters())
    largest = max(largest_layer_params(m) for m in engine)
    bf16 = str(ds.get("bf16", "auto")).lower() != "false"
    acts = measure_activations(model, stage, work)
    options = [(0, "none", "none"), (1, "none", "none"), (2, "none", "none"), (2, "cpu", "none"),
               (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu")]
    chosen = (ds["zero_stage"], ds.get("offload_optimizer", "none"), ds.get("offload_param", "none"))
    if chosen not in options:
        options.append(chosen)
    # gradient checkpointing: none, every part that can be, and the stage's own list when it is neither
    staged = "+".join(acts["stage_checkpoints"]) or "no"
    able = "+".join(acts["checkpointable"])
    variants = [("no", acts["bytes"])] + ([(able, acts["bytes_checkpointed"])] if able else [])
    if staged not in ("no", able):
        variants.append((staged, acts["bytes_stage"]))
    rows, states_of = [], {}
    for zero, oo, op in options:
        ms = states_of[(zero, oo, op)] = model_states(trainable, frozen_engine, largest, zero, oo, op, hw, bf16)
        for ck, act in variants:
            states = ms["gpu"] + outside_bytes
            gpu = states + act + hw.reserve_gb * GB
            row = {"zero_stage": zero, "offload_optimizer": oo, "offload_param": op, "gradient_checkpointing": ck,
                   "model_states_gb": states / GB, "activations_gb": act / GB, "reserve_gb": hw.reserve_gb,
                   "total_gb": gpu / GB, "cpu_per_node_gb": ms["cpu_per_node"] / GB, "source": ms["source"],
                   "fits": gpu <= hw.gpu_memory_gb * GB and (hw.cpu_memory_gb is None or ms["cpu_per_node"] <= hw.cpu_memory_gb * GB),
                   "chosen": (zero, oo, op) == chosen and ck == staged}
            rows.append(row)
    chosen_row = next(r for r in rows if r["chosen"])
    ms = dict(states_of[chosen])
    ms.update(outside_gpu=outside_bytes, outside_params=outside_params, frozen_in_engine=frozen_engine)
    counts = count_parts(model)
    return StagePlan(name, config_name or name, asdict(work), {k: counts[k]["trainable"] for k in LOADED[name] if k in counts},
                     frozen_engine + outside_params, ms, acts, rows, chosen_row["fits"])


def to_json(counts: dict, stages: list[StagePlan], hw: Hardware, meta: dict) -> dict[str, Any]:
    return {"config": meta, "hardware": asdict(hw), "parameters": counts,
            "stages": [asdict(s) for s in stages]}


def fmt_count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f} B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f} M)"


def render(plan: dict[str, Any]) -> str:
    """The plan as markdown: counts per part, then per stage one row per ZeRO option."""
    hw = plan["hardware"]
    lines = [f"# Plan: {plan['config'].get('name', '')}", "",
             f"{hw['nodes']} node(s) x {hw['gpus_per_node']} GPU(s) x {hw['gpu_memory_gb']:g} GB; "
             f"reserve {hw['reserve_gb']:g} GB per GPU", "", "## Parameters (built on the meta device)", "",
             "| part | parameters |", "|---|---:|"]
    counts = plan["parameters"]
    for name, c in counts.items():
        lines.append(f"| {name} | {fmt_count(c['total'])} |")
    lines.append(f"| **total** | {fmt_count(sum(c['total'] for c in counts.values()))} |")
    for note in plan["config"].get("notes", []):
        lines.append(f"\nNote: {note}")
    for st in plan["stages"]:
        tr = sum(st["trainable"].values())
        parts = ", ".join(f"{k} {v:,}" for k, v in st["trainable"].items() if v)
        verdict = "fits" if st["fits"] else "does NOT fit"
        work = st["workload"]
        cond = f", {work['cond_frames']} condition frame(s)" if st["name"] == "align" else ""
        lines += ["", f"## Stage {st['name']} ({st['config']}): trainable {fmt_count(tr)} ({parts or 'nothing'}); frozen {fmt_count(st['frozen'])}", "",
                  f"micro_batch {work['micro_batch']}, seq_len {work['seq_len']}" + (f", image {work['image_size']} px{cond}" if st["name"] == "align" else ""), "",
                  f"With the configured DeepSpeed settings (marked *) it **{verdict}** in {hw['gpu_memory_gb']:g} GB per GPU.", "",
                  "| ZeRO | offload opt | offload param | grad ckpt | model states GB | activations GB | total GB/GPU | CPU GB/node | fits | source |",
                  "|---|---|---|---|---:|---:|---:|---:|---|---|"]
        for r in st["rows"]:
            mark = " *" if r["chosen"] else ""
            lines.append(f"| {r['zero_stage']}{mark} | {r['offload_optimizer']} | {r['offload_param']} | {r['gradient_checkpointing']} | "
                         f"{r['model_states_gb']:.1f} | {r['activations_gb']:.1f} | {r['total_gb']:.1f} | {r['cpu_per_node_gb']:.0f} | "
                         f"{'yes' if r['fits'] else 'no'} | {r['source'].split(' ')[0]} |")
        for note in st["activations"]["notes"]:
            lines.append(f"\nNote: {note}")
    lines += ["", "model states: DeepSpeed's estimate for the engine's trainable parameters (source deepspeed) or the per-parameter "
              "formula (ZeRO 0/1), plus frozen weights; activations: tensors kept for backward, measured on the meta device; "
              "CPU GB/node: DeepSpeed's host-memory estimate (formula rows: offloaded optimizer states only)."]
    return "\n".join(lines) + "\n"
