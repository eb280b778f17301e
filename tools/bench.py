"""Benchmarks that print ratios measured side by side in one process (never pass/fail on time).

Run as:
    python tools/bench.py                                   # every section; the toy world if built (make_toy), else the tiny checkpoints
    python tools/bench.py sections=[cache,packing] repeats=9
    python tools/bench.py sections=[generation] model=outputs/demo/align/final history_turns=8 images=4

Sections (each a median over ``repeats`` with min-max shown; variants interleaved A B A B so
drift on a noisy machine hits both alike):

``cache``       stage-2 optimizer step (connector + DiT, MLLM frozen) from the feature cache vs
                without it (render, frozen MLLM forward, VAE encode every step); the build
                time of the cache; the loss difference of the two on the same batch and seed.
``cache_queries``  the same for the ``queries`` connector (MetaQuery-style learnable queries read through the
                frozen MLLM): its cache holds each context's key/value cache, so a cached step runs only
                the query tokens through the MLLM, against the whole context and its images uncached.
``stage2_batching``  stage-2 optimizer step (feature cache, micro-batch ``batch``) with the DiT run once per
                group of samples sharing a shape (``stage.dit_batching=grouped``, the default) vs once per
                sample (``none``, the loop before); DiT forwards per step; the loss difference of the two.
``frame_labels``  stage-2 optimizer step of the toy recipe's distillation warm-up (``frame_select=learned``, aligned
                distillation, the DiT frozen: no flow pass) with each sample's preferred frame probed once and
                reused (``stage.frame_label_memo=true``, opt-in; the steady state, every sample seen) vs probed
                with two DiT passes every step; DiT forwards per step.
``connector_batching``  stage-2 optimizer step of the toy recipe's distillation warm-up (its connector: refiner,
                window 3, gated norm; the frame labels probed every step, as the recipe does) with a per-token
                connector reading every sample's cached states in one padded, masked call
                (``stage.dit_batching=grouped``, the default) vs one call per sample (the loop before); connector
                calls per step; the loss difference of the two on the same batch and seed.
``sampling_guidance``  one image with classifier-free guidance (``sample_steps`` steps, DuoGen-style shorter
                negative, one condition frame): the guidance passes of a step batched into shared DiT
                forwards vs one forward per pass; with text guidance (2 passes) and with image guidance
                too (3 passes); the largest latent difference of the two.
``overhead``    a full stage-2 step of the fused model (cached features) vs the bare parts
                timed alone on the same tensors: connector forward + DiT loss forward/backward
                (one pass per shape, as the fused step) + optimizer step, with pre-drawn t and
                noise. The ratio is the glue's cost.
``stage1_overhead``  a stage-1 optimizer step as the trainer runs it (``Trainer._train_step``: loader, the data
                policy, DeepSpeed ZeRO-``stage1_zero`` forward/backward/step, the NaN/Inf guard, metrics) vs the
                bare parts on the same pre-rendered, pre-collated tensors (MLLM forward, per-sample loss,
                backward, the configured gradient clipping, a plain torch AdamW step). The ratio is the
                trainer's cost per step.
``packing``     stage-1 tokens per second with packed rows vs right-padded rows vs one forward
                per sample, on the same micro-batches; the padding fraction of each.
``muon``        one optimizer step of the toy Wan's Muon (make_toy dit_optimizer=muon: its and its text encoder's
                hidden matrices, as make_toy builds them, random gradients): ``torch.optim.Muon`` (one Newton-Schulz
                orthogonalisation per matrix) vs ``GroupedMuon`` (one per matrix shape, the matrices stacked); the
                largest weight difference after the same steps (0: bit for bit the same update).
``generation``  one answer with ``images`` images (``<|bov|>`` forced at fixed decode steps, so
                every variant produces the same tokens) after ``history_turns`` earlier turns:
                the KV-cached loop vs re-encoding the context at each image vs fully uncached;
                token forwards per final token and wall time.

Writes bench.json and bench.md to the run folder.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs

register_configs()
CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose("config", overrides)


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each fn ``repeats`` times, round robin, after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------- models and data
def world(cfg: DictConfig) -> dict:
    """The toy world's models and data if make_toy built them, else the tiny checkpoints (what the figures ran on)."""
    toy = Path(cfg.toy_dir)
    if cfg.use_toy and (toy / "qwen2_5_vl" / "config.json").is_file() and (toy / "wan" / "transformer").is_dir():
        return {"name": f"toy world ({toy})", "overrides": [f"toy_dir={toy}", "mllm=toy", "generator=toy_wan"],
                "data": toy / "toyworld" / "train.jsonl"}
    tiny = Path(cfg.tiny_dir)
    return {"name": f"tiny checkpoints ({tiny})", "overrides": [f"tiny_dir={tiny}", "mllm=tiny", "generator=tiny_wan"],
            "data": tiny / "demo_data" / "conversations.jsonl"}


def stage2_model(w: dict, cfg: DictConfig, dropout: bool = False, connector: str | None = None):
    """An untrained stage-2 model (connector ``connector_name``, or ``connector``) and its optimizer; ``dropout``: the
    stage's default classifier-free-guidance dropout (else none, so two variants see the very same samples)."""
    from fusion.model import FusedModel

    drops = [] if dropout else ["stage.p_drop_text=0", "stage.p_drop_cond=0"]
    c = compose([*w["overrides"], "stage=align", f"connector={connector or cfg.connector_name}", *drops, "stage.target_image=last"])
    torch.manual_seed(0)
    model = FusedModel.build(c)
    model.apply_trainable(c.stage)
    opt = torch.optim.AdamW(model.param_groups(c.stage), lr=1e-4)
    return model, opt


def target_convs(path: Path, n: int) -> list:
    from fusion.data import read_jsonl

    out = [c for c in read_jsonl(path) if c.num_target_images()]
    return [out[i % len(out)] for i in range(n)]


def cached_micro_batches(model, convs: list, cfg: DictConfig):
    """``convs`` split into ``cfg.batches`` micro-batches of ``cfg.batch``, and a feature cache of them built for ``model``."""
    from fusion import feature_cache as fc
    from fusion.data import SkipReport

    batches = [convs[i * cfg.batch : (i + 1) * cfg.batch] for i in range(cfg.batches)]
    with tempfile.TemporaryDirectory() as tmp:
        return batches, fc.FeatureCache(fc.build(model, convs, tmp, "bench", {}, "error", SkipReport(), progress=False))


def optimizer_step(loss: torch.Tensor, opt) -> None:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- sections
def bench_cache(cfg: DictConfig, w: dict, connector: str | None = None) -> dict:
    from fusion import feature_cache as fc
    from fusion.data import SkipReport, load_images

    model, opt = stage2_model(w, cfg, connector=connector)
    convs = target_convs(w["data"], cfg.batch * cfg.batches)
    batches = [convs[i * cfg.batch : (i + 1) * cfg.batch] for i in range(cfg.batches)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = fc.FeatureCache(fc.build(model, convs, tmp, "bench", {}, "error", SkipReport(), progress=False))
        build_s = time.perf_counter() - t0
        g = torch.Generator()
        with torch.no_grad():
            a = model.align_loss([model.prepare_align_sample(load_images(c)) for c in batches[0]], g.manual_seed(1))["loss"]
            b = model.align_loss([cache.sample(c, model.settings) for c in batches[0]], g.manual_seed(1))["loss"]
        it = {"uncached": 0, "per_context": 0, "cached": 0}

        def uncached():
            batch = batches[it["uncached"] % len(batches)]
            it["uncached"] += 1
            optimizer_step(model.align_loss([model.prepare_align_sample(load_images(c)) for c in batch], g.manual_seed(2))["loss"], opt)

        def uncached_per_context():  # stage.batching=none: one MLLM forward per context (the path before packing)
            batch = batches[it["per_context"] % len(batches)]
            it["per_context"] += 1
            model.settings["batching"] = "none"
            try:
                optimizer_step(model.align_loss([model.prepare_align_sample(load_images(c)) for c in batch], g.manual_seed(2))["loss"], opt)
            finally:
                model.settings["batching"] = "packed"

        def cached():
            batch = batches[it["cached"] % len(batches)]
            it["cached"] += 1
            optimizer_step(model.align_loss([cache.sample(c, model.settings) for c in batch], g.manual_seed(2))["loss"], opt)

        times = interleaved({"uncached": uncached, "uncached_per_context": uncached_per_context, "cached": cached}, cfg.repeats)
    r = {k: spread(v) for k, v in times.items()}
    return {"step_seconds": r, "speedup": r["uncached"]["median"] / r["cached"]["median"],
            "speedup_vs_per_context": r["uncached_per_context"]["median"] / r["cached"]["median"], "cache_build_seconds": build_s,
            "cache_build_samples": len(convs), "loss_diff_same_batch": abs(float(a - b)), "batch": cfg.batch,
            "connector": connector or cfg.connector_name, "cache_kind": cache.kind}


class DiTForwards(list):
    """Fills with the batch size of every DiT forward until ``remove()``."""

    def __init__(self, gen):
        super().__init__()
        self.handle = gen.transformer.register_forward_hook(
            lambda m, args, kwargs, out: self.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]),
            with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()


def bench_stage2_batching(cfg: DictConfig, w: dict) -> dict:
    model, opt = stage2_model(w, cfg, dropout=True)
    convs = target_convs(w["data"], cfg.batch * cfg.batches)
    batches, cache = cached_micro_batches(model, convs, cfg)
    it = {"per_sample": 0, "batched": 0}
    forwards = {"per_sample": [], "batched": []}

    def step(name, mode):
        def fn():
            batch = batches[it[name] % len(batches)]
            seed = it[name]
            it[name] += 1
            model.settings["dit_batching"] = mode
            counter = DiTForwards(model.generator)
            try:
                optimizer_step(model.align_loss([cache.sample(c, model.settings) for c in batch], torch.Generator().manual_seed(seed))["loss"], opt)
            finally:
                counter.remove()
                model.settings["dit_batching"] = "grouped"
            forwards[name].append(len(counter))
        return fn

    with torch.no_grad():
        loss = {}
        for mode in ("none", "grouped"):
            model.settings["dit_batching"] = mode
            loss[mode] = float(model.align_loss([cache.sample(c, model.settings) for c in batches[0]], torch.Generator().manual_seed(0))["loss"])
        model.settings["dit_batching"] = "grouped"
    times = interleaved({"per_sample": step("per_sample", "none"), "batched": step("batched", "grouped")}, cfg.repeats)
    r = {k: spread(v) for k, v in times.items()}
    return {"step_seconds": r, "speedup": r["per_sample"]["median"] / r["batched"]["median"], "batch": cfg.batch,
            "dit_forwards_per_step": {k: statistics.mean(v) for k, v in forwards.items()},
            "loss_diff_same_batch": abs(loss["none"] - loss["grouped"]),
            "dropout": {"p_drop_text": model.settings.get("p_drop_text"), "p_drop_cond": model.settings.get("p_drop_cond")}}


def warmup_model(cfg: DictConfig, w: dict, connector: list[str] = ()):
    """An untrained stage-2 model set up as the toy recipe's distillation warm-up (learned frame head, aligned
    distillation onto the generator's own encoder, the DiT frozen: no flow pass), ``connector`` overrides added."""
    from backbones.generator.text_encoder import TextEncoder
    from fusion.model import FusedModel

    recipe = ["stage.frame_select=learned", "stage.distill_steps=1000000", "stage.distill_weight=1.0", "stage.distill_target=aligned",
              "stage.trainable.generator=frozen", "stage.connector_span=since_image"]
    c = compose([*w["overrides"], "stage=align", f"connector={cfg.connector_name}", "stage.target_image=last", *recipe, *connector])
    torch.manual_seed(0)
    model = FusedModel.build(c)
    model.apply_trainable(c.stage)
    model.set_teacher(TextEncoder.from_pretrained(c.generator.path))
    return model, torch.optim.AdamW(model.param_groups(c.stage), lr=1e-4)


def bench_connector_batching(cfg: DictConfig, w: dict) -> dict:
    model, opt = warmup_model(cfg, w, ["connector.out_norm=rms_gated", "connector.refiner_layers=4", "connector.window=3"])
    convs = target_convs(w["data"], cfg.batch * cfg.batches)
    batches, cache = cached_micro_batches(model, convs, cfg)
    it = {"per_sample": 0, "batched": 0}
    calls = {"per_sample": [], "batched": []}
    batched_states = model.states_from_cache

    def loss(batch, seed, name):
        model.states_from_cache = batched_states if name == "batched" else (lambda samples: None)  # per sample: the loop before
        n = []
        hook = model.connector.register_forward_hook(lambda m, args, out: n.append(1))
        try:
            return model.align_loss([cache.sample(x, model.settings) for x in batch], torch.Generator().manual_seed(seed))["loss"]
        finally:
            hook.remove()
            del model.states_from_cache
            calls[name].append(len(n))

    def step(name):
        def fn():
            batch = batches[it[name] % len(batches)]
            optimizer_step(loss(batch, it[name], name), opt)
            it[name] += 1
        return fn

    with torch.no_grad():
        diff = abs(float(loss(batches[0], 0, "per_sample")) - float(loss(batches[0], 0, "batched")))
    times = interleaved({"per_sample": step("per_sample"), "batched": step("batched")}, cfg.repeats)
    r = {k: spread(v) for k, v in times.items()}
    return {"step_seconds": r, "speedup": r["per_sample"]["median"] / r["batched"]["median"], "batch": cfg.batch,
            "connector_calls_per_step": {k: statistics.mean(v) for k, v in calls.items()}, "loss_diff_same_batch": diff}


def bench_frame_labels(cfg: DictConfig, w: dict) -> dict:
    model, opt = warmup_model(cfg, w)
    model.settings["frame_label_memo"] = True  # (off by default: this section measures what it saves)
    convs = [x for x in target_convs(w["data"], 4 * cfg.batch * cfg.batches) if x.num_target_images() and len(x.image_items()) > 1]
    convs = [convs[i % len(convs)] for i in range(cfg.batch * cfg.batches)] if convs else []
    if not convs:
        return {"skipped": "no conversation with an image before its target in this data"}
    batches, cache = cached_micro_batches(model, convs, cfg)
    it = {"every_step": 0, "memo": 0}
    forwards = {"every_step": [], "memo": []}

    def step(name, memo):
        def fn():
            batch = batches[it[name] % len(batches)]
            seed = it[name]
            it[name] += 1
            model.settings["frame_label_memo"] = memo
            counter = DiTForwards(model.generator)
            try:
                optimizer_step(model.align_loss([cache.sample(x, model.settings) for x in batch], torch.Generator().manual_seed(seed))["loss"], opt)
            finally:
                counter.remove()
                model.settings["frame_label_memo"] = True
            forwards[name].append(len(counter))
        return fn

    for b in batches:  # the steady state of a long run: every sample's label in the memo
        model.align_loss([cache.sample(x, model.settings) for x in b], torch.Generator().manual_seed(0))
    times = interleaved({"every_step": step("every_step", False), "memo": step("memo", True)}, cfg.repeats)
    r = {k: spread(v) for k, v in times.items()}
    return {"step_seconds": r, "speedup": r["every_step"]["median"] / r["memo"]["median"], "batch": cfg.batch,
            "dit_forwards_per_step": {k: statistics.mean(v) for k, v in forwards.items()},
            "samples_with_earlier_images": len(convs)}


def bench_sampling_guidance(cfg: DictConfig, w: dict) -> dict:
    model, _ = stage2_model(w, cfg)
    gen = model.generator.eval()
    g = torch.Generator().manual_seed(0)
    f, side = gen.spatial_factor, gen.image_size
    states = torch.randn(1, 48, gen.text_dim, generator=g)
    negative = (states[:, :36].clone(), None)  # DuoGen: the context without its final text chunk, shorter
    cond = torch.randn(1, 1, gen.latent_channels, side // f, side // f, generator=g)
    out, latents = {}, {}
    for name, image_guidance in (("text_guidance", 1.0), ("text_and_image_guidance", 1.5)):
        def run(batch, image_guidance=image_guidance, name=name):
            def fn():
                counter = DiTForwards(gen)
                latents[(name, batch)] = gen.sample(states, None, cond, steps=cfg.sample_steps, guidance=3.0, negative=negative,
                                                    image_guidance=image_guidance, generator=torch.Generator().manual_seed(1),
                                                    decode=False, batch_guidance=batch)
                counter.remove()
                out.setdefault(name, {}).setdefault("dit_forwards", {})["batched" if batch else "separate"] = len(counter)
            return fn

        times = interleaved({"separate": run(False), "batched": run(True)}, cfg.repeats)
        r = {k: spread(v) for k, v in times.items()}
        out[name].update(seconds=r, speedup=r["separate"]["median"] / r["batched"]["median"],
                         max_latent_diff=float((latents[(name, True)] - latents[(name, False)]).abs().max()))
    out["meta"] = {"steps": cfg.sample_steps, "image_size": side, "text_tokens": states.shape[1], "negative_tokens": negative[0].shape[1],
                   "condition_frames": 1, "generator": type(gen).__name__}
    return out


def bench_overhead(cfg: DictConfig, w: dict) -> dict:
    from fusion import feature_cache as fc
    from fusion.data import SkipReport
    from fusion.flow import sample_t

    model, opt = stage2_model(w, cfg)
    convs = target_convs(w["data"], cfg.batch)
    with tempfile.TemporaryDirectory() as tmp:
        cache = fc.FeatureCache(fc.build(model, convs, tmp, "bench", {}, "error", SkipReport(), progress=False))
        samples = [cache.sample(c, model.settings) for c in convs]
    gen, conn = model.generator, model.connector
    g = torch.Generator().manual_seed(3)
    t = [sample_t(1, "logit_normal", g, "cpu") for _ in samples]
    noise = [torch.randn((1, *s.target.shape), generator=g) for s in samples]

    def full():
        optimizer_step(model.align_loss(samples, torch.Generator().manual_seed(3))["loss"], opt)

    from backbones.generator.base import pad_text
    from fusion.flow import add_noise, target_velocity

    groups: dict = {}  # the DiT batched by shape, as the fused step runs it
    for i, s in enumerate(samples):
        groups.setdefault((tuple(s.target.shape), 0 if s.cond is None else s.cond.shape[0]), []).append(i)

    def bare():
        outs = []
        for s in samples:
            h = s.ctx_hidden[None]
            outs.append(conn(h, torch.ones(1, h.shape[2], dtype=torch.long)))
        total = 0.0
        for idx in groups.values():
            target = torch.stack([samples[i].target for i in idx])
            cond = torch.stack([samples[i].cond for i in idx]) if samples[idx[0]].cond is not None else None
            states, mask, lengths = pad_text([outs[i].states for i in idx], [outs[i].mask for i in idx])
            ti, ni = torch.cat([t[i] for i in idx]), torch.cat([noise[i] for i in idx])
            v = gen.velocity(add_noise(target, ni, ti), ti, cond, states, mask, lengths)
            total = total + (v.float() - target_velocity(target, ni).float()).square().mean(dim=(1, 2, 3)).sum()
        optimizer_step(total / len(samples), opt)

    times = interleaved({"fused_step": full, "bare_parts": bare}, cfg.repeats)
    r = {k: spread(v) for k, v in times.items()}
    return {"step_seconds": r, "overhead": r["fused_step"]["median"] / r["bare_parts"]["median"], "batch": cfg.batch}


def bench_stage1_overhead(cfg: DictConfig, w: dict) -> dict:
    import logging

    from omegaconf import OmegaConf

    from fusion.packing import collate, per_sample_loss
    from fusion.train import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_stage1_")
    c = compose([*w["overrides"], "stage=sft", "data=jsonl", f"data.path={w['data']}", "data.num_workers=0",
                 f"stage.micro_batch_size={cfg.sft_batch}", "stage.max_steps=1000000", "stage.lr=1e-5",
                 f"deepspeed.zero_stage={cfg.stage1_zero}", "logger=jsonl"])
    OmegaConf.set_struct(c, False)
    c.output_dir = tmp
    logging.getLogger("fusion.train").setLevel(logging.WARNING)
    trainer = Trainer(c)
    trainer._setup_distributed()
    trainer._setup_model()
    trainer._setup_data()
    bare_model = copy.deepcopy(trainer.model)  # before DeepSpeed hooks the trainer's parameters: the bare parts are plain torch
    trainer._setup_engine()
    rendered = trainer.dataset.rendered
    state = {"it": iter(trainer._loader())}

    def trainer_step():
        state["it"], _ = trainer._train_step(state["it"])

    model = bare_model
    params = [p for p in model.mllm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # as the trainer's
    mllm = model.mllm
    order = trainer.sampler.indices(0)
    batches = [[rendered[i] for i in order[k : k + cfg.sft_batch]] for k in range(0, len(order) - cfg.sft_batch + 1, cfg.sft_batch)]
    collated = [collate(b, mllm.rope_positions, mllm.tokenizer.pad_token_id, "packed", max(r.length for r in b)) for b in batches]
    collated = [(model._on_mllm(b.inputs), b) for b in collated]
    it = {"bare": 0}

    clip = c.deepspeed.gradient_clipping

    def bare():
        inputs, batch = collated[it["bare"] % len(collated)]
        it["bare"] += 1
        logits = mllm(**inputs)["logits"]
        per_sample_loss(logits, batch).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)  # the configured clipping, as the trainer applies it
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = interleaved({"trainer_step": trainer_step, "bare_parts": bare}, cfg.repeats * 4, warmup=2)
    r = {k: spread(v) for k, v in times.items()}
    shutil.rmtree(tmp, ignore_errors=True)
    return {"step_seconds": r, "overhead": r["trainer_step"]["median"] / r["bare_parts"]["median"], "batch": cfg.sft_batch,
            "samples": len(trainer.dataset), "rendered_once": len(rendered), "zero_stage": trainer.engine.zero_optimization_stage(),
            "trainable_params": sum(p.numel() for p in params)}


def bench_packing(cfg: DictConfig, w: dict) -> dict:
    from fusion.data import load_images, read_jsonl
    from fusion.model import FusedModel
    from fusion.packing import collate

    c = compose([*w["overrides"], "stage=sft"])
    torch.manual_seed(0)
    model = FusedModel.build(c)
    model.apply_trainable(c.stage)
    opt = torch.optim.AdamW(model.param_groups(c.stage), lr=1e-5)
    convs = list(read_jsonl(w["data"]))[: cfg.sft_batch * cfg.batches]
    rendered = [model.mllm.render(load_images(x)) for x in convs]
    batches = [rendered[i * cfg.sft_batch : (i + 1) * cfg.sft_batch] for i in range(cfg.batches)]
    batches = [b for b in batches if b]
    # packed: rows as long as the longest sample (the default); packed_one_row: the whole micro-batch in one row
    layouts = ("padded", "packed", "packed_one_row", "none")
    it = dict.fromkeys(layouts, 0)
    one_row = 1 << 30

    def step(layout):
        def fn():
            batch = batches[it[layout] % len(batches)]
            it[layout] += 1
            model.settings["pack_length"] = one_row if layout == "packed_one_row" else None
            optimizer_step(model.sft_loss(batch, batching=layout.removesuffix("_one_row"))["loss"], opt)
            model.settings["pack_length"] = None
        return fn

    times = interleaved({k: step(k) for k in layouts}, cfg.repeats)
    # every layout ran the same batches in the same order: tokens per step are the mean over the batches run
    n_run = cfg.repeats + 1
    real = sum(sum(r.length for r in batches[i % len(batches)]) for i in range(1, n_run)) / cfg.repeats
    out = {"batch": cfg.sft_batch, "real_tokens_per_step": real}
    for layout in layouts:
        if layout == "none":
            pad = 0.0
        else:
            tb = [collate(b, model.mllm.rope_positions, model.mllm.tokenizer.pad_token_id, layout.removesuffix("_one_row"),
                          one_row if layout == "packed_one_row" else max(r.length for r in b)) for b in batches]  # as sft_loss packs
            pad = 1 - sum(b.real_tokens for b in tb) / sum(b.slots for b in tb)
        s = spread(times[layout])
        out[layout] = {"step_seconds": s, "tokens_per_second": real / s["median"], "pad_fraction": pad}
    out["packed_vs_padded_throughput"] = out["packed"]["tokens_per_second"] / out["padded"]["tokens_per_second"]
    out["packed_one_row_vs_padded_throughput"] = out["packed_one_row"]["tokens_per_second"] / out["padded"]["tokens_per_second"]
    return out


def build_generation_model(cfg: DictConfig, w: dict):
    from fusion.model import FusedModel

    if cfg.model:
        return FusedModel.from_pretrained(cfg.model)
    overrides = [*w["overrides"], "stage=align", f"connector={cfg.connector_name}", "mllm.max_length=32768"]  # a long chat on purpose
    if cfg.mllm_hidden:  # a wider MLLM of the real class, so the MLLM's share of the time is not negligible
        from backbones.mllm.tiny_qwen2_5_vl import make_tiny

        path = make_tiny(Path(cfg.output_dir) / "bench_mllm", name="qwen2_5_vl", hidden_size=cfg.mllm_hidden, num_layers=cfg.mllm_layers)
        overrides.append(f"mllm.path={path}")
    c = compose(overrides)
    torch.manual_seed(0)
    return FusedModel.build(c)


def history_images(n: int):
    import random

    from fusion.toyworld.scenes import random_scene, render

    rng = random.Random(0)
    return [render(random_scene(rng, 1 + i % 3)) for i in range(n)]


def run_answer(model, cfg: DictConfig, recompute: str):
    from fusion.generate import Chat, ForceTokens, GenerationSettings

    words = " ".join(["the red circle moves next to the blue square"] * (cfg.words_per_turn // 9 + 1)).split()[: cfg.words_per_turn]
    chat = Chat(model, GenerationSettings(steps=cfg.steps, guidance=3.0, max_new_tokens=8 * cfg.images + 8), recompute=recompute)
    # history: force an immediate end of turn so every variant holds the same context
    for i, img in enumerate(history_images(cfg.history_turns)):
        chat.logits_processor = ForceTokens({0: chat.mllm.end_of_turn_id})
        chat.send(f"Turn {i}: " + " ".join(words), images=[img])
    bov, eot = chat.mllm.bov_token_id, chat.mllm.end_of_turn_id
    schedule = {2 + 3 * k: bov for k in range(cfg.images)}
    schedule[2 + 3 * cfg.images] = eot
    chat.logits_processor = ForceTokens(schedule)
    start_forwards = chat.state.tokens_forwarded
    t0 = time.perf_counter()
    chat.send("Now draw it step by step.")
    seconds = time.perf_counter() - t0
    return chat, seconds, chat.state.tokens_forwarded - start_forwards


def bench_generation(cfg: DictConfig, w: dict) -> dict:
    model = build_generation_model(cfg, w).eval()
    variants = {"cached": "never", "reencode_at_images": "images", "uncached": "always"}
    results, chats = {}, {}
    run_answer(model, cfg, "never")  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(cfg.repeats):
        for name, mode in variants.items():
            chat, seconds, _ = run_answer(model, cfg, mode)
            times[name].append(seconds)
            chats[name] = chat
    for name, chat in chats.items():
        drawn = len([s for s in chat.segments if s.kind == "image" and s.role == "assistant"])
        results[name] = {"seconds": spread(times[name]), "median_seconds": statistics.median(times[name]), "images": drawn,
                         "sequence_length": chat.state.length, "tokens_forwarded_total": chat.state.tokens_forwarded,
                         "forwards_per_token": chat.state.tokens_forwarded / chat.state.length}
    ref = chats["cached"]
    for name, chat in chats.items():
        results[name]["same_tokens_as_cached"] = chat.state.ids == ref.state.ids
        results[name]["max_latent_diff_vs_cached"] = max(float((a - b).abs().max()) for a, b in zip(ref._latents, chat._latents))
        results[name]["speedup_of_cached"] = results[name]["median_seconds"] / results["cached"]["median_seconds"]
    results["meta"] = {"model": cfg.model or f"untrained {cfg.connector_name} on {w['name']}" + (f", MLLM width {cfg.mllm_hidden}" if cfg.mllm_hidden else ""),
                       "mllm_params": sum(p.numel() for p in model.mllm.parameters()),
                       "dit_params": sum(p.numel() for p in model.generator.transformer.parameters()), "images": cfg.images,
                       "history_turns": cfg.history_turns, "words_per_turn": cfg.words_per_turn, "steps": cfg.steps}
    return results


# ---------------------------------------------------------------------------- tables
def bench_muon(cfg: DictConfig) -> dict:
    """torch.optim.Muon against GroupedMuon on the toy Wan's hidden matrices (make_toy's defaults), the same gradients."""
    from fusion.config import MakeToyConfig
    from fusion.toyworld.pretrain import GroupedMuon, toy_optimizers, toy_text_encoder, toy_tokenizer, toy_transformer

    mt = MakeToyConfig()
    side = mt.image_size // 2 ** (len(mt.vae_channels) - 1)
    dit = toy_transformer("wan", 8, 64, coord_freqs=mt.dit_coord_freqs, patch=mt.dit_patch, latent_side=side)
    enc = toy_text_encoder("wan", len(toy_tokenizer(mt.dit_text_length)), 64, mt.dit_text_layers)
    hidden = toy_optimizers("muon", [dit, enc], mt.dit_lr)[0].param_groups[0]["params"]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in hidden]
    kw = dict(lr=mt.dit_lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    weights = {name: [p.detach().clone() for p in hidden] for name in ("torch", "grouped")}
    opts = {"torch": torch.optim.Muon(weights["torch"], **kw), "grouped": GroupedMuon(weights["grouped"], **kw)}
    for name, ws in weights.items():
        for w, grad in zip(ws, grads):
            w.grad = grad

    times = interleaved({name: opt.step for name, opt in opts.items()}, cfg.repeats * 10, warmup=2)
    diff = max((a - b).abs().max().item() for a, b in zip(weights["torch"], weights["grouped"]))
    st = {k: spread(v) for k, v in times.items()}
    return {"step_seconds": st, "speedup": st["torch"]["median"] / st["grouped"]["median"], "matrices": len(hidden),
            "shapes": len({tuple(sorted(p.shape)) for p in hidden}), "max_weight_diff": diff}


def fmt(s: dict) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def markdown(results: dict) -> str:
    parts = [f"{results['meta']['world']}; {results['meta']['repeats']} repeats, median (min-max) seconds; "
             f"{results['meta']['torch_threads']} torch threads"]
    for section in ("cache", "cache_queries"):
        if section not in results:
            continue
        r = results[section]
        kv = r.get("cache_kind") == "kv"
        parts.append(
            f"### stage 2: feature cache ({r.get('connector', 'multilayer_concat')}"
            f"{': each context stored as its key/value cache, only the queries run' if kv else ''})\n\n"
            "| variant | step s | ratio |\n|---|---|---|\n"
            f"| without cache ({'the whole context and the queries through the MLLM, one forward per context' if kv else 'contexts packed, one MLLM forward'}) "
            f"| {fmt(r['step_seconds']['uncached'])} | {r['speedup']:.2f}x slower |\n"
            + ("" if kv else f"| without cache (one MLLM forward per context) | {fmt(r['step_seconds']['uncached_per_context'])} | "
                                f"{r['speedup_vs_per_context']:.2f}x slower |\n")
            + f"| with cache | {fmt(r['step_seconds']['cached'])} | 1.00x |\n\n"
            f"Micro-batch {r['batch']}; cache build {r['cache_build_seconds']:.1f} s for {r['cache_build_samples']} samples "
            f"(paid once); loss difference on the same batch and seed {r['loss_diff_same_batch']:.1e}.")
    if "stage2_batching" in results:
        r = results["stage2_batching"]
        parts.append(
            "### stage 2: batched DiT passes\n\n| variant | step s | DiT forwards / step | ratio |\n|---|---|---|---|\n"
            f"| one DiT pass per sample (stage.dit_batching=none) | {fmt(r['step_seconds']['per_sample'])} | "
            f"{r['dit_forwards_per_step']['per_sample']:.1f} | {r['speedup']:.2f}x slower |\n"
            f"| one DiT pass per shape (grouped, default) | {fmt(r['step_seconds']['batched'])} | "
            f"{r['dit_forwards_per_step']['batched']:.1f} | 1.00x |\n\n"
            f"Micro-batch {r['batch']}, feature cache on, CFG dropout {r['dropout']}; loss difference on the same batch and seed "
            f"{r['loss_diff_same_batch']:.1e}. (Each DiT forward is followed by its backward.)")
    if "connector_batching" in results:
        r = results["connector_batching"]
        parts.append(
            "### stage 2: the connector over a micro-batch in one call\n\n| variant | step s | connector calls / step | ratio |\n"
            "|---|---|---|---|\n"
            f"| one call per sample | {fmt(r['step_seconds']['per_sample'])} | {r['connector_calls_per_step']['per_sample']:.1f} | "
            f"{r['speedup']:.2f}x slower |\n"
            f"| one padded, masked call (stage.dit_batching=grouped, default) | {fmt(r['step_seconds']['batched'])} | "
            f"{r['connector_calls_per_step']['batched']:.1f} | 1.00x |\n\n"
            f"Micro-batch {r['batch']}, the toy recipe's distillation warm-up (refiner, window 3, gated norm; frame labels probed every "
            f"step), feature cache on; loss difference on the same batch and seed {r['loss_diff_same_batch']:.1e}.")
    if "frame_labels" in results and "skipped" not in results["frame_labels"]:
        r = results["frame_labels"]
        parts.append(
            "### stage 2: the learned frame head's labels while the DiT is frozen\n\n| variant | step s | DiT forwards / step | ratio |\n"
            "|---|---|---|---|\n"
            f"| probed every step (stage.frame_label_memo=false, default) | {fmt(r['step_seconds']['every_step'])} | "
            f"{r['dit_forwards_per_step']['every_step']:.1f} | {r['speedup']:.2f}x slower |\n"
            f"| probed once per sample, reused (stage.frame_label_memo=true) | {fmt(r['step_seconds']['memo'])} | {r['dit_forwards_per_step']['memo']:.1f} | 1.00x |\n\n"
            f"Micro-batch {r['batch']} of samples that all have earlier images, the distillation warm-up (no flow pass), feature cache on; "
            "the steady state of a long run (every sample's label already in the memo).")
    if "sampling_guidance" in results:
        r = results["sampling_guidance"]
        rows = "\n".join(f"| {k.replace('_', ' ')} | {fmt(r[k]['seconds']['separate'])} ({r[k]['dit_forwards']['separate']}) | "
                         f"{fmt(r[k]['seconds']['batched'])} ({r[k]['dit_forwards']['batched']}) | {r[k]['speedup']:.2f}x | {r[k]['max_latent_diff']:.1e} |"
                         for k in ("text_guidance", "text_and_image_guidance"))
        parts.append("### sampling: batched guidance passes\n\n" + json.dumps(r["meta"]) +
                     "\n\n| guidance | separate passes s (DiT forwards) | batched s (DiT forwards) | separate / batched | max latent diff |\n"
                     "|---|---|---|---|---|\n" + rows)
    if "overhead" in results:
        r = results["overhead"]
        parts.append(
            "### stage 2: fusion overhead\n\n| variant | step s | ratio |\n|---|---|---|\n"
            f"| fused model step | {fmt(r['step_seconds']['fused_step'])} | {r['overhead']:.3f}x |\n"
            f"| bare parts (connector + DiT loss per shape + optimizer) | {fmt(r['step_seconds']['bare_parts'])} | 1.000x |")
    if "stage1_overhead" in results:
        r = results["stage1_overhead"]
        parts.append(
            "### stage 1: trainer overhead\n\n| variant | step s | ratio |\n|---|---|---|\n"
            f"| trainer step (loader, DeepSpeed ZeRO-{r['zero_stage']} on one rank, NaN/Inf guard, metrics) | {fmt(r['step_seconds']['trainer_step'])} | "
            f"{r['overhead']:.3f}x |\n"
            f"| bare parts (forward, loss, backward, clipping, torch AdamW) on pre-collated tensors | {fmt(r['step_seconds']['bare_parts'])} | 1.000x |\n\n"
            f"Micro-batch {r['batch']}; {r['rendered_once']} of {r['samples']} samples rendered once before training "
            f"(data.render_cache_mb); {r['trainable_params']:,} trainable parameters.")
    if "packing" in results:
        r = results["packing"]
        rows = "\n".join(f"| {k} | {fmt(r[k]['step_seconds'])} | {r[k]['tokens_per_second']:.0f} | {r[k]['pad_fraction']:.1%} |"
                         for k in ("packed", "packed_one_row", "padded", "none"))
        parts.append("### stage 1: packed sequences\n\n| layout | step s | tokens/s | padding |\n|---|---|---|---|\n" + rows +
                     f"\n\nMicro-batch {r['batch']}; packed / padded throughput {r['packed_vs_padded_throughput']:.2f}x "
                     f"(one row: {r['packed_one_row_vs_padded_throughput']:.2f}x).")
    if "muon" in results:
        r = results["muon"]
        parts.append(
            "### toy DiT pretraining: Muon's orthogonalisation per shape\n\n| variant | optimizer step s | ratio |\n|---|---|---|\n"
            f"| torch.optim.Muon (one Newton-Schulz per matrix) | {fmt(r['step_seconds']['torch'])} | {r['speedup']:.2f}x slower |\n"
            f"| GroupedMuon (one per shape, stacked; make_toy's) | {fmt(r['step_seconds']['grouped'])} | 1.00x |\n\n"
            f"The toy Wan's and its text encoder's {r['matrices']} hidden matrices ({r['shapes']} shapes), the same gradients; "
            f"largest weight difference after the same steps {r['max_weight_diff']:.1e}.")
    if "generation" in results:
        g = results["generation"]
        rows = "\n".join(f"| {k} | {g[k]['images']} | {g[k]['sequence_length']} | {g[k]['forwards_per_token']:.2f} | {fmt(g[k]['seconds'])} | "
                         f"{g[k]['speedup_of_cached']:.2f}x | {g[k]['same_tokens_as_cached']} | {g[k]['max_latent_diff_vs_cached']:.1e} |"
                         for k in ("cached", "reencode_at_images", "uncached"))
        parts.append("### interleaved generation\n\n" + json.dumps(g["meta"]) + "\n\n| variant | images | seq len | token forwards / seq len | "
                     "s | cached is faster by | same tokens | max latent diff |\n|---|---|---|---|---|---|---|---|\n" + rows)
    return "\n\n".join(parts)


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    from omegaconf import OmegaConf

    OmegaConf.to_object(cfg)
    w = world(cfg)
    results: dict = {"meta": {"world": w["name"], "repeats": cfg.repeats, "torch_threads": torch.get_num_threads(),
                              "sections": list(cfg.sections)}}
    run = {"cache": lambda: bench_cache(cfg, w), "cache_queries": lambda: bench_cache(cfg, w, "queries"), "stage2_batching": lambda: bench_stage2_batching(cfg, w),
           "frame_labels": lambda: bench_frame_labels(cfg, w), "connector_batching": lambda: bench_connector_batching(cfg, w),
           "sampling_guidance": lambda: bench_sampling_guidance(cfg, w), "overhead": lambda: bench_overhead(cfg, w),
           "stage1_overhead": lambda: bench_stage1_overhead(cfg, w), "packing": lambda: bench_packing(cfg, w),
           "muon": lambda: bench_muon(cfg), "generation": lambda: bench_generation(cfg, w)}
    from hydra.core.hydra_config import HydraConfig

    command = " ".join(["python tools/bench.py", *HydraConfig.get().overrides.task])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in cfg.sections:
        print(f"bench: {name} ...", flush=True)
        results[name] = run[name]()
        # written after every section: a later failure never loses what was measured
        table = markdown(results)
        tmp = out / "bench.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(out / "bench.json")
        (out / "bench.md").write_text(f"# unifuse benchmarks\n\n`{command}`\n\n{table}\n")
    print(table)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


if __name__ == "__main__":
    main()
