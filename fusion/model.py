"""The fused model: MLLM + connector + generator, what trains in each stage, the two losses,
and save/load of the whole thing as plain library folders.

* :meth:`FusedModel.build` instantiates the three parts from a composed Hydra config,
  reading the connector's widths from the two backbones.
* :meth:`FusedModel.apply_trainable` turns ``stage.trainable`` into ``requires_grad``
  flags (LoRA through peft where a part says ``lora``); :meth:`param_groups` gives the
  optimizer one group per part with its own learning rate.
* :meth:`sft_loss` (stage 1): next-token loss on assistant text, ``<|bov|>`` and end of turn.
* :meth:`align_loss` (stage 2): one target assistant image per sample; context = MLLM hidden
  states of the tokens before its ``<|bov|>`` (or through it); condition frames = every
  earlier image; flow matching on the target only; classifier-free-guidance dropout of the
  text and of the condition frames; the multi-scale alignment loss when the connector has one.
* :meth:`save_pretrained` / :meth:`from_pretrained`: ``mllm/`` (transformers), ``generator/``
  (diffusers), ``connector/`` (safetensors + config), ``lora/<part>/`` (peft) and
  ``unifuse.json``, the manifest that rebuilds the model with no Hydra config at hand.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from backbones.generator.base import DiTRow
from backbones.mllm.base import RenderedConversation
from fusion.data import Conversation, load_images
from fusion.errors import CheckpointError, ConfigError, DataError
from fusion.distill import aligned_distill_loss
from fusion.flow import add_noise, sample_t, target_velocity

MANIFEST = "unifuse.json"
FORMAT_VERSION = 1
_UNSET = object()


@dataclass
class AlignSample:
    """One stage-2 sample: the context before the target's ``<|bov|>``, the target and its conditions."""

    ctx_ids: torch.Tensor  # [L]
    ctx_pixel_values: torch.Tensor | None
    ctx_grids: torch.Tensor | None
    neg_len: int  # DuoGen negative: context length with the final text chunk dropped (0: none left)
    target: torch.Tensor  # [C, h, w] latent
    cond: torch.Tensor | None  # [N, C, h, w] latents of every earlier image
    where: str = ""
    ctx_hidden: torch.Tensor | None = None  # [n_layers, L, D] from the feature cache (then the pixels and grids are None)
    request: str = ""  # the text the generator's own encoder would read (Conversation.text_before_image)
    bucket: tuple[int, int] | None = None  # (height, width) every image of the sample was fitted to (data.buckets; None: square)
    ctx_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # feature cache, query connectors: (keys/values [layers, 2, H, L, d], next rope position [L])
    text_only: bool = False  # stage.distill_data: read by the distillation alone (its target a stand-in: no flow, alignment or frame loss)


def set_distill_loss(states: torch.Tensor, mask: torch.Tensor, t_states: torch.Tensor, t_mask: torch.Tensor) -> torch.Tensor:
    """``stage.distill_target=set``: the connector's tokens as a *set* regressed onto the teacher's.

    A DiT whose cross-attention has no position signal on its text (Wan, Cosmos, SANA: rope /
    position embeddings act on the image tokens only) reads its text states as a set: order is
    irrelevant, zero tokens are its padding. So each of the teacher's real tokens is matched to
    one connector token (greedy one-to-one on squared distance, no gradient through the match,
    as DETR's set loss) and the connector regresses onto that layout: matched tokens onto their
    teacher token, every other valid token onto zero. Any connector, any number of tokens.
    """
    s = states[0].float()[mask[0].bool()]  # [T, D]: the connector's valid tokens
    real = t_states[0].float()[t_mask[0].bool()]  # [K, D]: the teacher's real (non-padding) tokens
    target = torch.zeros_like(s)
    with torch.no_grad():
        cost = torch.cdist(real, s).pow(2)  # [K, T]
        for _ in range(min(len(real), len(s))):
            k, t = divmod(int(cost.argmin()), cost.shape[1])
            target[t] = real[k]
            cost[k, :] = float("inf")
            cost[:, t] = float("inf")
    return nn.functional.mse_loss(s, target)


def _zero_through(params, device) -> torch.Tensor:
    """0.0 with a graph through one element of each trainable parameter (of those held on this rank): their gradients
    are then defined, and zero."""
    return sum((p.reshape(-1)[0] for p in params if p.requires_grad and p.numel()), torch.zeros((), device=device)) * 0.0


def _to_container(node: Any) -> Any:
    if not isinstance(node, DictConfig):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run: keep the interpolation text
        return OmegaConf.to_container(node, resolve=False)


def _spec(node: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    d = dict(_to_container(node))
    return {k: v for k, v in d.items() if k not in drop}


class FusedModel(nn.Module):
    """MLLM + connector + generator (either of the last two may be absent for stage=sft)."""

    def __init__(self, mllm, generator=None, connector=None, specs: dict[str, dict] | None = None, settings: dict | None = None,
                 frame_selector: nn.Module | None = None):
        super().__init__()
        self.mllm = mllm
        self.generator = generator
        self.connector = connector
        self.frame_selector = frame_selector  # stage.frame_select=learned (fusion/frames.py)
        self.specs = specs or {}
        self.settings = dict(settings or {})
        self.lora: dict[str, dict] = {}
        self.token_rows: dict[int, tuple[int, Any]] = {}  # id(embedding weight) -> (rows that train, gradient hook)
        self.generator_source: str | None = None  # the generator folder the DiT was loaded from (manifest: generator_source)
        self.step = 0  # the optimizer step (set by the trainer): distillation warm-up and other schedules read it
        if connector is not None:
            self.mllm.hidden_layers = self._resolve_layers(connector.layers)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, cfg: DictConfig, device: str | None = None, mllm: nn.Module | None = None) -> FusedModel:
        """Instantiate the parts of a composed config; the connector's widths come from the backbones.

        ``device="meta"``: the architecture only, no weights and no memory (``tools/plan.py``).

        ``mllm``: an MLLM already built (e.g. :class:`fusion.feature_cache.MLLMFolder` when stage 2
        trains from cached features and the MLLM is never loaded)."""
        device = device or cfg.get("device", "cpu")
        mllm = mllm if mllm is not None else instantiate(cfg.mllm, device=device)
        generator = connector = None
        specs = {"mllm": _spec(cfg.mllm, drop=("path", "architecture"))}
        if cfg.get("generator") is not None:
            generator = instantiate(cfg.generator, device=device)
            specs["generator"] = _spec(cfg.generator, drop=("path", "text_dim", "architecture"))
        if cfg.get("connector") is not None:
            if generator is None:
                raise ConfigError("connector is set but generator is not: a connector maps MLLM states to a generator's text width")
            widths = dict(mllm_dim=mllm.hidden_size, text_dim=generator.text_dim,
                          num_mllm_layers=mllm.num_layers, dit_dim=generator.dit_hidden_size)
            try:
                with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():  # meta: tools/plan.py
                    connector = instantiate(cfg.connector, **widths)
            except Exception as e:  # width mismatches etc. raised by the design's constructor
                cause = e.__cause__ or e
                if isinstance(cause, (ValueError, TypeError)):
                    raise ConfigError(f"connector={cfg.connector._target_.rsplit('.', 1)[-1]}: {cause}") from None
                raise
            specs["connector"] = {**_spec(cfg.connector), **widths}
            if getattr(connector, "uses_queries", False) and not getattr(mllm, "supports_query_embeddings", False):
                raise ConfigError(f"connector={cfg.connector._target_}: this MLLM adapter cannot take extra query embeddings")
        settings = _to_container(cfg.stage) if cfg.get("stage") is not None else {}
        if generator is not None and cfg.get("data") is not None and cfg.data.get("buckets") is not None:
            from fusion.buckets import resolve

            side = settings.get("image_size") or generator.image_size
            settings["buckets"] = [list(b) for b in resolve(_to_container(cfg.data.buckets), generator, side)]
        if settings.get("connector_span", "all") != "all" and getattr(connector, "uses_queries", False):
            raise ConfigError(f"stage.connector_span={settings['connector_span']} chooses the context tokens a per-token connector "
                              f"reads; connector={cfg.connector._target_.rsplit('.', 1)[-1]} reads query states only (use all)")
        selector = None
        if settings.get("frame_select") == "learned" and connector is not None:
            from fusion.frames import FrameSelector

            if generator is not None and not generator.uses_condition_frames:
                raise ConfigError(f"stage.frame_select=learned: generator={type(generator).__name__} takes no condition frames")
            if getattr(connector, "uses_queries", False):
                raise ConfigError(f"stage.frame_select=learned reads the MLLM's states of the context's images; "
                                  f"connector={cfg.connector._target_.rsplit('.', 1)[-1]} reads query states only (use all or latest)")
            with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
                selector = FrameSelector(mllm.hidden_size)
        model = cls(mllm, generator, connector, specs, settings, frame_selector=selector)
        if generator is not None:
            model.generator_source = str(cfg.generator.path)
        return model.to(device)

    def _resolve_layers(self, layers: list[int]) -> list[int]:
        try:
            return self.mllm.resolve_layers(layers, "connector.layers")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    # ------------------------------------------------------------------ what trains
    def parts(self) -> dict[str, nn.Module]:
        """Named parameter groups: mllm (language model + head), vision_tower, connector, generator (DiT)."""
        hf = self.mllm.model
        out: dict[str, nn.Module] = {}
        if hf is not None:  # None: the MLLM's features come from the feature cache
            out = {"mllm": nn.ModuleList([self.mllm.language_model, self.mllm.lm_head]), "vision_tower": self.mllm.vision_tower}
        if self.connector is not None:
            out["connector"] = self.connector
        if self.generator is not None:
            out["generator"] = self.generator.transformer
        if self.frame_selector is not None:
            out["frame_selector"] = self.frame_selector
        return out

    def apply_trainable(self, stage: dict | DictConfig) -> dict[str, tuple[int, int]]:
        """Set ``requires_grad`` from ``stage.trainable``; inject LoRA where a part says ``lora``.

        Returns {part: (trainable, total)} parameter counts. Frozen parts go to eval mode.
        """
        stage = _to_container(stage)
        tr = stage["trainable"]
        self.requires_grad_(False)
        for _, hook in self.token_rows.values():
            hook.remove()
        self.token_rows.clear()
        parts = self.parts()
        if "mllm" not in parts and (tr["mllm"] != "frozen" or tr.get("vision_tower")):
            raise ConfigError("stage.trainable.mllm/vision_tower need the MLLM loaded; it is not (features from the cache)")
        if tr["mllm"] == "full":
            parts["mllm"].requires_grad_(True)
        elif tr["mllm"] == "lora":
            self._inject_lora("mllm", self.mllm.language_model, stage["lora_mllm"])
            self._train_token_rows([self.mllm.bov_token_id])
        if tr.get("vision_tower"):
            parts["vision_tower"].requires_grad_(True)
        if self.connector is not None and tr.get("connector"):
            self.connector.requires_grad_(True)
        elif tr.get("connector") and self.connector is None:
            raise ConfigError("stage.trainable.connector=true but no connector is configured (connector=...)")
        if self.frame_selector is not None:  # trains with the connector
            self.frame_selector.requires_grad_(bool(tr.get("connector")))
        if self.generator is not None:
            if tr["generator"] == "full":
                self.generator.transformer.requires_grad_(True)
            elif tr["generator"] == "lora":
                self._inject_lora("generator", self.generator.transformer, stage["lora_generator"])
        elif tr["generator"] != "frozen":
            raise ConfigError(f"stage.trainable.generator={tr['generator']} but no generator is configured (generator=...)")
        for name, module in parts.items():
            module.train(any(p.requires_grad for p in module.parameters()))
        if self.generator is not None:
            self.generator.vae.eval()
        return self.trainable_report()

    def apply_memory_and_speed(self, stage: dict | DictConfig) -> list[str]:
        """``stage.gradient_checkpointing`` (parts that recompute activations in backward) and
        ``stage.compile`` (``torch.compile`` the parts that train). Returns what was switched on."""
        stage = _to_container(stage)
        done = []
        hf = self.mllm.model  # None: the MLLM's features come from the feature cache
        for part in stage.get("gradient_checkpointing") or []:
            if part in ("mllm", "vision_tower") and hf is None:
                continue  # features come from the cache: no MLLM forward to checkpoint
            if part == "mllm":
                lm = self.mllm.language_model
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if not lm.training and getattr(self.connector, "uses_queries", False):
                    # A frozen MLLM that query connectors backpropagate through: transformers checkpoints only
                    # modules in training mode. Train mode changes nothing else when the model has no dropout.
                    if float(getattr(hf.config.get_text_config(), "attention_dropout", 0.0) or 0.0) != 0.0:
                        raise ConfigError("stage.gradient_checkpointing=[mllm] on a frozen MLLM needs train mode, "
                                          "and this MLLM has attention dropout; drop mllm from the list")
                    lm.train()
                    part = "mllm (frozen, in train mode: no dropout in it)"
            elif part == "vision_tower":
                self.mllm.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            elif part == "generator":
                if self.generator is None:
                    raise ConfigError("stage.gradient_checkpointing names generator but no generator is configured")
                self.generator.transformer.enable_gradient_checkpointing()
            done.append(f"gradient checkpointing: {part}")
        if stage.get("compile"):
            parts = self.parts()
            targets = {"mllm": self.mllm.language_model if hf is not None else None, "vision_tower": self.mllm.vision_tower if hf is not None else None,
                       "connector": self.connector, "generator": self.generator.transformer if self.generator is not None else None}
            for name, module in parts.items():
                if targets.get(name) is not None and any(p.requires_grad for p in module.parameters()):
                    targets[name].compile()  # in place: the module's forward runs compiled
                    done.append(f"torch.compile: {name}")
        return done

    def _inject_lora(self, part: str, module: nn.Module, lora: dict) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=list(lora["target_modules"]))
        try:
            inject_adapter_in_model(cfg, module)
        except ValueError as e:
            raise ConfigError(f"stage.lora_{part}.target_modules={lora['target_modules']}: {e}") from None
        for n, p in module.named_parameters():
            p.requires_grad_("lora_" in n)
        self.lora[part] = {"config": cfg, "module": module}

    def _train_token_rows(self, ids: list[int]) -> None:
        """Train rows ``ids`` of the MLLM's input and output embeddings and no others.

        LoRA reaches neither embedding, and ``<|bov|>`` starts as the mean of the other rows: without
        this a LoRA stage 1 never learns to predict it, and the model never draws. The gradients are
        masked to those rows and the rows' group has no weight decay (:meth:`param_groups`), so AdamW
        leaves every other row bit for bit as it was; the optimizer still holds full-size states for the
        two matrices (a published 7B: about 1.1 B parameters' worth, partitioned by ZeRO).
        """
        hf = self.mllm.model
        for w in {id(t): t for t in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)}.values():
            mask = torch.zeros(w.shape[0], 1, dtype=torch.bool, device=w.device)
            mask[sorted(set(ids))] = True
            w.requires_grad_(True)
            hook = w.register_hook(lambda g, m=mask: g * m.to(g.device))
            self.token_rows[id(w)] = (int(mask.sum()), hook)

    def merge_lora(self, part: str) -> None:
        """Fold a part's LoRA into its base weights and drop the adapter layers."""
        from peft.tuners.lora import LoraLayer

        module = self.lora.pop(part)["module"]
        for name, child in list(module.named_modules()):
            if isinstance(child, LoraLayer):
                child.merge()
                parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                setattr(parent, name.rsplit(".", 1)[-1], child.get_base_layer())

    def trainable_report(self) -> dict[str, tuple[int, int]]:
        """{part: (trainable, total)} parameter counts; an embedding that trains some rows counts those rows."""
        def trained(p: torch.Tensor) -> int:
            return self.token_rows[id(p)][0] * p.shape[1] if id(p) in self.token_rows else p.numel()

        return {name: (sum(trained(p) for p in m.parameters() if p.requires_grad), sum(p.numel() for p in m.parameters()))
                for name, m in self.parts().items()}

    def param_groups(self, stage: dict | DictConfig) -> list[dict[str, Any]]:
        """One optimizer group per part that trains: lr = stage.lr * stage.lr_scale[part] (and ``<part>_token_rows``, no weight decay, for embedding rows that train alone)."""
        stage = _to_container(stage)
        scale = stage.get("lr_scale") or {}
        groups = []
        for name, module in self.parts().items():
            params = [p for p in module.parameters() if p.requires_grad and id(p) not in self.token_rows]
            rows = [p for p in module.parameters() if p.requires_grad and id(p) in self.token_rows]
            lr = stage["lr"] * float(scale.get(name, 1.0))
            if params:
                groups.append({"name": name, "params": params, "lr": lr, "weight_decay": stage.get("weight_decay", 0.0)})
            if rows:  # weight decay would shrink the rows that do not train
                groups.append({"name": f"{name}_token_rows", "params": rows, "lr": lr, "weight_decay": 0.0})
        return groups

    # ------------------------------------------------------------------ stage 1
    def sft_loss(self, conversations: list, batching: str | None = None) -> dict[str, torch.Tensor]:
        """Stage-1 loss: the mean over samples of each sample's mean next-token loss.

        ``batching`` (default ``stage.batching``): ``packed`` (samples end to end in rows of
        ``stage.pack_length`` tokens, block-diagonal attention), ``padded`` (one right-padded
        row per sample) or ``none`` (one forward per sample, the model's own ``labels=`` loss);
        all three give the same loss (:mod:`fusion.packing`). Returns ``loss`` and ``pad_frac``.
        """
        from fusion.packing import collate, per_sample_loss

        batching = batching or self.settings.get("batching", "packed")
        rendered = [conv if isinstance(conv, RenderedConversation) else self.mllm.render(conv) for conv in conversations]
        if batching == "none":
            losses = [self.mllm(**self._on_mllm(r.model_inputs()), labels=r.labels.to(self.mllm.device))["loss"] for r in rendered]
            return {"loss": torch.stack(losses).mean(), "pad_frac": torch.tensor(0.0)}
        # default rows: as long as the longest sample (what padding would use), filled first-fit with the others
        capacity = self.settings.get("pack_length") or max(r.input_ids.shape[1] for r in rendered)
        batch = collate(rendered, self.mllm.rope_positions, self.mllm.tokenizer.pad_token_id, batching, capacity)
        logits = self.mllm(**self._on_mllm(batch.inputs))["logits"]
        return {"loss": per_sample_loss(logits, batch).mean(), "pad_frac": torch.tensor(batch.pad_fraction)}

    # ------------------------------------------------------------------ stage 2
    def prepare_align_sample(self, conv: Conversation, generator: torch.Generator | None = None) -> AlignSample:
        """Render a conversation and cut it at one target assistant image (``stage.target_image``)."""
        s = self.settings
        r = self.mllm.render(conv)
        targets = [i for i, role in enumerate(r.image_roles) if role == "assistant"]
        if not targets:
            raise DataError("stage=align sample has no assistant image to learn from", conv.source if conv.line else None, conv.line, kind="no_target")
        if s.get("target_image", "last") == "random":
            k = targets[int(torch.randint(len(targets), (1,), generator=generator))]
        else:
            k = targets[-1]
        ids = r.input_ids[0]
        starts = (ids == self.mllm.vision_start_id).nonzero().flatten().tolist()
        ends = (ids == self.mllm.vision_end_id).nonzero().flatten().tolist()
        ctx_end = starts[k] if s.get("include_bov", True) else starts[k] - 1  # ids[starts[k] - 1] is <|bov|>
        rows = [int(g.prod()) for g in r.image_grid_thw] if r.image_grid_thw is not None else []
        pv = r.pixel_values[: sum(rows[:k])] if k else None
        grids = r.image_grid_thw[:k] if k else None
        neg_len = ends[k - 1] + 1 if k else 0
        images = [item["image"] for _, item in load_images(conv).image_items()]
        gen = self.generator
        size, bucket = self.square_size, None
        if s.get("buckets"):  # every image of the conversation fitted to the bucket of its last assistant image
            from fusion.buckets import fit, image_size

            bucket = self.bucket_for(*image_size(images[targets[-1]]))
            images, size = [fit(im, bucket) for im in images[: k + 1]], None
        target = gen.encode(images[k], size=size)[0]
        cond = gen.encode(images[:k], size=size) if k else None
        return AlignSample(ids[:ctx_end], pv, grids, neg_len, target, cond, conv.where, request=conv.text_before_image(k), bucket=bucket)

    @property
    def square_size(self) -> tuple[int, int]:
        """The target size without buckets: ``stage.image_size`` (else the generator's) on both sides."""
        side = self.settings.get("image_size") or self.generator.image_size
        return side, side

    def bucket_for(self, height: int, width: int) -> tuple[int, int]:
        """The trained bucket (``data.buckets``) nearest an image's aspect; the square size when trained without buckets."""
        from fusion.buckets import nearest

        buckets = self.settings.get("buckets")
        return nearest([tuple(b) for b in buckets], height, width) if buckets else self.square_size

    def connector_start(self, ids: torch.Tensor | list[int]) -> int:
        """Where the connector's window starts in a context (``stage.connector_span``): 0 for ``all``, the token
        after the context's last image for ``since_image`` (0 when it shows none)."""
        if self.settings.get("connector_span", "all") != "since_image":
            return 0
        spans = self.image_spans(torch.as_tensor(ids))
        return spans[-1][1] + 1 if spans else 0

    def context_states(self, ctx_ids: torch.Tensor, pixel_values=None, grids=None):
        """Connector output for one context: (states [1, T, text_dim], mask [1, T], query_hidden or None)."""
        mllm, dev = self.mllm, self.mllm.device
        ids = ctx_ids.to(dev)[None]
        pv = pixel_values.to(dev, mllm.model.dtype) if pixel_values is not None else None
        grids = grids.to(dev) if grids is not None else None
        if getattr(self.connector, "uses_queries", False):
            q = self.connector.query_embeds()
            pad = torch.full((1, q.shape[0]), self.mllm.tokenizer.pad_token_id, dtype=ids.dtype, device=dev)
            full_ids = torch.cat([ids, pad], dim=1)
            emb = mllm.model.get_input_embeddings()(full_ids)
            emb = torch.cat([emb[:, : ids.shape[1]], q[None].to(emb.dtype)], dim=1)
            pos = mllm.rope_positions(full_ids, grids)
            hidden = mllm(full_ids, pixel_values=pv, image_grid_thw=grids, position_ids=pos, inputs_embeds=emb, compute_logits=False)["hidden"]
            query_hidden = hidden[:, :, ids.shape[1]:]
            out = self.connector(query_hidden)
            return out.states, out.mask, query_hidden
        grad = any(p.requires_grad for p in mllm.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden = mllm(ids, pixel_values=pv, image_grid_thw=grids, compute_logits=False)["hidden"]
        hidden = hidden[:, :, self.connector_start(ctx_ids):]
        out = self.connector(hidden, torch.ones(hidden.shape[0], hidden.shape[2], dtype=torch.long, device=dev))
        return out.states, out.mask, None

    def _on_mllm(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A collated batch's inputs on the MLLM's device, pixels in its dtype."""
        out = {k: (v.to(self.mllm.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if out.get("pixel_values") is not None:
            out["pixel_values"] = out["pixel_values"].to(self.mllm.model.dtype)
        return out

    def packed_context_states(self, samples: list[AlignSample]) -> list[AlignSample]:
        """The frozen MLLM run once over every context of a micro-batch, packed into one row
        (:mod:`fusion.packing`: no attention across samples, each sample's own positions);
        returns the samples with ``ctx_hidden`` set. The DuoGen negative is a prefix of the
        same states, so it costs no second forward."""
        from fusion.packing import collate

        todo = [i for i, smp in enumerate(samples) if smp.ctx_hidden is None]
        if not todo:
            return samples
        mllm = self.mllm
        items = [SimpleNamespace(input_ids=samples[i].ctx_ids[None], labels=torch.full_like(samples[i].ctx_ids[None], -100),
                                 mm_token_type_ids=(samples[i].ctx_ids == mllm.image_token_id).long()[None],
                                 pixel_values=samples[i].ctx_pixel_values, image_grid_thw=samples[i].ctx_grids) for i in todo]
        capacity = self.settings.get("pack_length") or max(len(samples[i].ctx_ids) for i in todo)
        batch = collate(items, mllm.rope_positions, mllm.tokenizer.pad_token_id, "packed", capacity)
        grad = any(p.requires_grad for p in mllm.parameters())
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden = mllm(**self._on_mllm(batch.inputs), compute_logits=False)["hidden"]  # [R, n_layers, L, D]
        out = list(samples)
        for i, (row, start, n) in zip(todo, batch.spans):
            out[i] = replace(samples[i], ctx_hidden=hidden[row, :, start : start + n])
        return out

    def draw_dropout(self, generator: torch.Generator | None = None) -> tuple[bool, bool]:
        """(drop the text condition, drop the condition frames) for one sample."""
        u = torch.rand(2, generator=generator)
        return bool(u[0] < self.settings.get("p_drop_text", 0.0)), bool(u[1] < self.settings.get("p_drop_cond", 0.0))

    def sample_states(self, sample: AlignSample, length: int | None = None):
        """Connector output for a sample's context (or its first ``length`` tokens): (states, mask, query_hidden).

        A sample from the feature cache carries the MLLM's states already (``ctx_hidden``):
        the connector reads them and the MLLM does not run.
        """
        if sample.ctx_kv is not None:  # query connectors from the feature cache: only the queries run, after the stored prefix
            kv, nxt = sample.ctx_kv
            n = kv.shape[3] if length is None else length
            query_hidden = self.mllm.queries_after_prefix(kv[:, :, :, :n], int(nxt[n - 1]), self.connector.query_embeds())
            out = self.connector(query_hidden)
            return out.states, out.mask, query_hidden
        if sample.ctx_hidden is not None:
            hidden = self.cached_window(sample, length)[None].to(self.generator.device, self.connector_dtype)
            out = self.connector(hidden, torch.ones(hidden.shape[0], hidden.shape[2], dtype=torch.long, device=hidden.device))
            return out.states, out.mask, None
        if length is None:
            return self.context_states(sample.ctx_ids, sample.ctx_pixel_values, sample.ctx_grids)
        n_img = int((sample.ctx_ids[:length] == self.mllm.vision_end_id).sum())
        rows = int(sample.ctx_grids[:n_img].prod(-1).sum()) if n_img else 0
        return self.context_states(sample.ctx_ids[:length], sample.ctx_pixel_values[:rows] if n_img else None,
                                   sample.ctx_grids[:n_img] if n_img else None)

    def queries_from_cache(self, samples: list[AlignSample]) -> torch.Tensor | None:
        """Query connectors with the feature cache: every sample's queries read after its stored prefix in one
        MLLM forward ([B, n_layers, N, D], row i the same as :meth:`sample_states` gives sample i); None otherwise."""
        if len(samples) < 2 or not all(smp.ctx_kv is not None for smp in samples):
            return None
        return self.mllm.queries_after_prefixes([(smp.ctx_kv[0], int(smp.ctx_kv[1][-1])) for smp in samples], self.connector.query_embeds())

    def cached_window(self, sample: AlignSample, length: int | None = None) -> torch.Tensor:
        """The connector's window (:meth:`connector_start`) of a sample's stored MLLM states (or of their first
        ``length`` tokens): [n_layers, L, D]."""
        hidden = sample.ctx_hidden[:, :length] if length is not None else sample.ctx_hidden
        return hidden[:, self.connector_start(sample.ctx_ids[: hidden.shape[1]]):]

    def states_from_cache(self, samples: list[AlignSample]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-token connectors on states already computed (feature cache or packed MLLM pass): every sample's
        window (:meth:`connector_start`) right-padded into one batch, masked, and read in one connector call;
        item i equals what :meth:`sample_states` gives sample i (the refiner ignores masked keys, the window
        convolution reads no padded token). None where a sample has no states or the connector is not per token."""
        from fusion.distill import per_token

        if len(samples) < 2 or not per_token(self.connector) or any(smp.ctx_hidden is None or smp.ctx_kv is not None for smp in samples):
            return None
        from backbones.generator.base import pad_text

        windows = [self.cached_window(smp) for smp in samples]
        n_layers, width = windows[0].shape[0], windows[0].shape[2]
        rows = [w.transpose(0, 1).reshape(w.shape[1], n_layers * width).to(self.generator.device, self.connector_dtype) for w in windows]
        flat, mask, _ = pad_text(rows, [None] * len(rows))  # [B, L, n_layers * D], zeros and mask 0 past each window
        out = self.connector(flat.view(len(rows), -1, n_layers, width).transpose(1, 2), mask)
        return [(out.states[i : i + 1, : w.shape[1]], out.mask[i : i + 1, : w.shape[1]]) for i, w in enumerate(windows)]

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def negative_states(self, sample: AlignSample, like: torch.Tensor, like_mask: torch.Tensor):
        """The text condition when it is dropped: zeros (``null``) or the DuoGen negative."""
        if self.settings.get("text_dropout_form", "null") == "duogen" and sample.neg_len > 0:
            states, mask, _ = self.sample_states(sample, sample.neg_len)
            return states, mask
        return torch.zeros_like(like), like_mask

    # ---- the generator's own text encoder: distillation teacher and gain reference
    @property
    def teacher(self):
        """The generator's own text encoder (:class:`backbones.generator.text_encoder.TextEncoder`) or None.
        Held outside the module tree: never trained, saved or counted with the fused model."""
        return self.__dict__.get("_teacher")

    def set_teacher(self, teacher) -> None:
        if teacher is not None and teacher.dim != self.generator.text_dim:
            raise ConfigError(f"the generator's text encoder is {teacher.dim} wide but its DiT reads {self.generator.text_dim}; "
                              "distillation needs the DiT's own encoder (generator.text_dim must stay the checkpoint's)")
        self.__dict__["_teacher"] = teacher
        self.__dict__["_teacher_memo"] = {}

    def distill_phase(self, step: int | None = None) -> tuple[float, float]:
        """(flow weight, distillation weight) at ``step`` (default: the current one, ``self.step``, set by the trainer).

        ``stage.distill_steps`` first steps: distillation alone (a warm-up in which the connector learns
        to say what the DiT already reads); afterwards ``1`` and ``stage.distill_weight``."""
        s = self.settings
        steps, weight = int(s.get("distill_steps", 0) or 0), float(s.get("distill_weight", 0.0) or 0.0)
        if (self.step if step is None else step) < steps:
            return 0.0, 1.0
        return 1.0, weight

    def distill_target(self, step: int | None = None) -> str:
        """The distillation target at ``step`` (default: the current one): ``stage.distill_target``, or
        ``stage.distill_target_late`` from step ``stage.distill_target_switch`` on."""
        s = self.settings
        late = s.get("distill_target_late")
        if late and (self.step if step is None else step) >= int(s.get("distill_target_switch", 0) or 0):
            return late
        return s.get("distill_target", "velocity")

    def _states_only(self, step: int | None = None) -> bool:
        """Whether the stage-2 loss at ``step`` is a distillation on the states alone (flow weight 0, no alignment loss): no DiT pass."""
        w_flow, _ = self.distill_phase(step) if self.teacher is not None else (1.0, 0.0)
        return w_flow == 0 and self.distill_target(step) in ("states", "set", "aligned") and not getattr(self.connector, "align_weight", 0.0)

    def reads_generator(self, step: int) -> bool:
        """Whether stage 2's step ``step`` trains on the generator's outputs (the flow loss, the velocity distillation
        target): what the connector learns then answers this copy of the generator (stage.stop_before_generator,
        resume_generator). The learned frame head's labels (stage.frame_select=learned) are not counted: they name which
        earlier picture a request refers to, which a copy part-way through the same pretraining names alike."""
        return not self._states_only(step)

    def _teacher_states(self, request: str):
        """The frozen teacher's (states, mask) of one request, memoised (a data set repeats its requests every epoch)."""
        memo = self.__dict__.setdefault("_teacher_memo", {})
        key = (request, self.generator.device, self.generator.dtype)
        if key not in memo:
            if len(memo) >= 8192:
                memo.clear()
            states, mask = self.teacher.encode([request])  # kept on the CPU: a corpus of distinct requests (stage.distill_data)
            memo[key] = (states.to("cpu", self.generator.dtype), mask.cpu())  # would fill an accelerator's memory
        states, mask = memo[key]
        return states.to(self.generator.device), mask.to(self.generator.device)

    def aligned_teacher(self, sample: AlignSample, t_states: torch.Tensor, t_mask: torch.Tensor, length: int):
        """The teacher's states laid on the sample's context tokens (:mod:`fusion.distill`): (target [L, D], real [L])."""
        from fusion.distill import align_request, aligned_target, context_pieces, per_token

        if not per_token(self.connector):
            raise ConfigError("stage.distill_target=aligned needs a per-token connector (last_mlp, layer_mix, multilayer_concat): "
                              f"{type(self.connector).__name__} does not emit one state per context token (use distill_target=set)")
        start = self.connector_start(sample.ctx_ids) if sample.ctx_ids is not None else 0
        if sample.ctx_ids is None or len(sample.ctx_ids) - start != length:
            raise ConfigError(f"{sample.where}: stage.distill_target=aligned needs the context's token ids "
                              "(a feature cache written before format 2 has none: rebuild it with cache=build)")
        memo = self.__dict__.setdefault("_alignment_memo", {})
        key = (tuple(sample.ctx_ids.tolist()), sample.request, sample.neg_len)
        if key not in memo:
            if len(memo) >= 8192:
                memo.clear()
            pieces = context_pieces(self.mllm.tokenizer, sample.ctx_ids)
            memo[key] = align_request(pieces, sample.request, self.teacher.tokenizer, start=sample.neg_len,
                                      max_length=self.teacher.max_length).positions
        real_states = t_states[0][t_mask[0].bool()]
        target, real = aligned_target(real_states.float(), memo[key], len(sample.ctx_ids))
        return target[start:], real[start:]  # (connector_span=since_image: the request's tokens are all after start)

    def align_loss(self, samples: list[AlignSample], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Stage-2 loss averaged over samples: flow matching on the target (+ alignment loss)
        (+ distillation onto the generator's own text encoder, ``stage.distill_*``).

        Each sample draws its own dropout, ``t`` and noise, in sample order (the same numbers
        whatever the batching). The DiT then runs once per group of samples that share a shape
        (``stage.dit_batching=grouped``: target size and condition frames; texts of different
        lengths padded and masked, :meth:`~backbones.generator.base.FlowGenerator.batched_velocity`)
        or once per sample (``none``); the loss is the mean of each sample's own loss either way. With
        ``grouped`` a per-token connector also reads every sample's cached or packed states in one call
        (:meth:`states_from_cache`).
        """
        s = self.settings
        gen, dev = self.generator, self.generator.device
        distills, drops = [], torch.zeros(2)
        w_flow, w_distill = self.distill_phase() if self.teacher is not None else (1.0, 0.0)
        if w_distill > 0 and self.teacher is None:
            raise ConfigError("stage.distill_steps / distill_weight need the generator's text encoder (FusedModel.set_teacher)")
        distill_target = self.distill_target()
        if (s.get("batching", "packed") == "packed" or self.frame_selector is not None) and not getattr(self.connector, "uses_queries", False):
            samples = self.packed_context_states(samples)  # (the frame selector reads these states too)
        align_w = getattr(self.connector, "align_weight", 0.0)
        states_only = self._states_only()  # a warm-up on the states alone needs no DiT pass: only the connector trains
        plans = []
        batched = s.get("dit_batching", "grouped") == "grouped"
        batched_queries = self.queries_from_cache(samples)
        batched_out = self.connector(batched_queries) if batched_queries is not None else None  # a fixed number of tokens: one call
        batched_states = self.states_from_cache(samples) if batched and batched_queries is None else None
        for i, sample in enumerate(samples):
            if batched_queries is not None:
                query_hidden = batched_queries[i : i + 1]
                states, mask = batched_out.states[i : i + 1], batched_out.mask[i : i + 1]
            elif batched_states is not None:
                (states, mask), query_hidden = batched_states[i], None
            else:
                states, mask, query_hidden = self.sample_states(sample)
            drop_text, drop_cond = self.draw_dropout(generator)
            drops += torch.tensor([drop_text, drop_cond], dtype=torch.float)
            if drop_text:
                states, mask = self.negative_states(sample, states, mask)
            target = sample.target[None].to(dev)
            t = sample_t(1, s.get("timestep_sampling", "logit_normal"), generator, dev,
                         s.get("logit_mean", 0.0), s.get("logit_std", 1.0), s.get("time_shift", 1.0))
            noise = torch.randn(target.shape, generator=generator).to(dev)
            plans.append(SimpleNamespace(sample=sample, states=states, mask=mask, query_hidden=query_hidden, drop_text=drop_text,
                                         cond=None if (drop_cond or sample.cond is None) else sample.cond.to(dev),
                                         target=target, noise=noise, t=t, x_t=add_noise(target, noise, t)))
        drawn = [p for p in plans if not p.sample.text_only]  # stage.distill_data's samples have no drawing to learn from
        selection = self._select_frames(drawn, batched)
        flows, aligns, velocities = [], [], []
        if not states_only and drawn:
            capture = self.connector.align_layer if align_w > 0 and any(p.query_hidden is not None for p in drawn) else None
            rows = [DiTRow(p.x_t[0], p.t[0], p.cond, p.states[0].to(gen.dtype), p.mask[0]) for p in drawn]
            velocities, grids = gen.batched_velocity(rows, batch=batched, capture=capture)
            for p, v, grid in zip(drawn, velocities, grids):
                flows.append(nn.functional.mse_loss(v[None].float(), target_velocity(p.target, p.noise).float()))
                if grid is not None and p.query_hidden is not None:
                    aligns.append(self.connector.alignment_loss(grid[None], p.query_hidden))
        kept, keep_w = [], float(s.get("distill_keep_weight", 0.0) or 0.0)
        if w_distill > 0:
            todo = [i for i, p in enumerate(plans) if not p.drop_text and p.sample.request]
            teacher = {i: self._teacher_states(plans[i].sample.request) for i in todo}
            if distill_target == "velocity":  # the DiT is the judge: its velocity from the connector vs from its own encoder
                drawn_todo = [i for i in todo if not plans[i].sample.text_only]  # (refused with stage.distill_data: none there)
                velocities = dict(zip([i for i, p in enumerate(plans) if not p.sample.text_only], velocities))
                with torch.no_grad():
                    rows = [DiTRow(plans[i].x_t[0], plans[i].t[0], plans[i].cond, teacher[i][0][0], teacher[i][1][0]) for i in drawn_todo]
                    v_teacher, _ = gen.batched_velocity(rows, batch=batched)
                distills = [nn.functional.mse_loss(velocities[i].float(), vt.float()) for i, vt in zip(drawn_todo, v_teacher)]
            else:
                distills = self._states_distill(plans, teacher, todo, distill_target)
            early = s.get("distill_target", "velocity")
            if keep_w > 0 and distill_target != early:  # stage.distill_keep_weight: the early target kept beside the late one
                kept = self._states_distill(plans, teacher, todo, early)
        if flows:
            flow = torch.stack(flows).mean()
        else:  # the states-only warm-up: a zero that still reaches every trainable DiT weight (ZeRO expects their gradients)
            flow = _zero_through(gen.parameters(), dev)
        out = {"flow": flow, "drop_text": drops[0], "drop_cond": drops[1]}
        loss = w_flow * flow
        if selection is not None:
            out["frame_select"] = selection[0]
            if selection[1] is not None:
                out["frame_acc"] = selection[1]  # share of this batch's samples with earlier images the head picks right
            loss = loss + float(s.get("frame_select_weight", 0.1)) * out["frame_select"]
        if aligns:
            out["align"] = torch.stack(aligns).mean()
            loss = loss + self.connector.align_weight * out["align"]
        if w_distill > 0:
            out["distill"] = torch.stack(distills).mean() if distills else flow.new_zeros(())
            loss = loss + w_distill * out["distill"] + (0.0 * flow if w_flow == 0 else 0.0)  # keeps the graph of every part
            if kept:
                out["distill_kept"] = torch.stack(kept).mean()
                loss = loss + w_distill * keep_w * out["distill_kept"]
        if not loss.requires_grad:  # nothing trainable reached: with the DiT frozen, a micro-batch with nothing to distil or
            # every request dropped (zero states); a zero through the trainable weights keeps the backward (DeepSpeed's) defined
            loss = loss + _zero_through(self.parameters(), dev)
        out["loss"] = loss
        return out

    def _states_distill(self, plans: list, teacher: dict, todo: list[int], target: str) -> list[torch.Tensor]:
        """Each of ``todo``'s samples' distillation loss on the teacher's states (``target``: states, set or aligned)."""
        losses = []
        for i in todo:
            p, (t_states, t_mask) = plans[i], teacher[i]
            if target == "states":
                if t_states.shape != p.states.shape:
                    raise ConfigError(f"stage.distill_target=states needs the connector to emit the teacher's {t_states.shape[1]} "
                                      f"tokens of width {t_states.shape[2]}, it emits {p.states.shape[1]} (use distill_target="
                                      f"velocity, or connector=resampler with connector.num_queries={t_states.shape[1]})")
                losses.append(nn.functional.mse_loss(p.states.float(), t_states.float()))
            elif target == "set":
                losses.append(set_distill_loss(p.states, p.mask, t_states, t_mask))
            else:  # aligned
                target_s, real = self.aligned_teacher(p.sample, t_states, t_mask, p.states.shape[1])
                losses.append(aligned_distill_loss(p.states[0], target_s, real))
        return losses

    # ---- condition frames (stage.frame_select, fusion/frames.py)
    def image_spans(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        from fusion.frames import image_spans

        return image_spans(ids, self.mllm.vision_start_id, self.mllm.vision_end_id)

    def pick_frame(self, hidden: torch.Tensor, ids: torch.Tensor) -> int | None:
        """``frame_select=learned``: the index of the earlier image the head picks for the drawing after context ``ids``
        (``hidden`` [n_layers, L, D]: the connector's layers of those ids), or None for no frame."""
        spans = self.image_spans(ids)
        if not spans:
            return None
        with torch.no_grad():
            k = int(self.frame_selector(hidden.to(self.generator.device), spans).argmax())
        return None if k == len(spans) else k

    def frame_indices(self, n: int, ids: torch.Tensor, hidden: Callable[[], torch.Tensor]) -> list[int]:
        """Which of ``n`` earlier images the DiT gets after context ``ids``, as ``stage.frame_select`` says: all, the
        latest, or the learned head's pick ([] for none; ``hidden()`` gives the context's states, asked for only then)."""
        mode = self.settings.get("frame_select", "all")
        every = list(range(n))
        if mode == "latest":
            return every[-1:]
        if mode != "learned" or self.frame_selector is None or not every:
            return every
        k = self.pick_frame(hidden(), ids)
        return [] if k is None else [k]

    def condition_frames(self, sample: AlignSample) -> torch.Tensor | None:
        """The condition frames [N, C, h, w] generation would hand the DiT for ``sample`` (:meth:`frame_indices`)."""
        if sample.cond is None:
            return None

        def hidden() -> torch.Tensor:
            return (sample.ctx_hidden if sample.ctx_hidden is not None else self.packed_context_states([sample])[0].ctx_hidden)

        idx = self.frame_indices(sample.cond.shape[0], sample.ctx_ids, hidden)
        return sample.cond[idx] if idx else None

    def _frame_label_memo(self) -> dict | None:
        """``stage.frame_label_memo``: while the DiT cannot move (the first ``stage.generator_frozen_steps`` steps, or
        every step with ``stage.trainable.generator=frozen``)
        the frame it prefers for a sample is a function of the sample alone, so each (conversation, condition
        frames) sample's label is computed once, from ``stage.frame_label_draws`` fixed noises through its own
        encoder's states, and reused: the toy world's 6000 distillation steps ran two DiT passes each for these
        labels (docs/toyworld_log.md, "Stage 2's frame labels, once per sample"). None (every step probes afresh, with the sample's noise) once
        the DiT trains, without a teacher, or with the DiT's weights partitioned (ZeRO-3: every rank must run
        the same DiT passes)."""
        s = self.settings
        moves = (s.get("trainable") or {}).get("generator", "full") != "frozen"
        if moves and self.step >= int(s.get("generator_frozen_steps", 0) or 0):  # the DiT moves: what it preferred is stale
            self.__dict__.pop("_frame_labels", None)
            return None
        if not s.get("frame_label_memo", False) or any(hasattr(q, "ds_status") for q in self.generator.parameters()):
            return None
        return self.__dict__.setdefault("_frame_labels", {})

    def _select_frames(self, plans: list, batched: bool):
        """Apply ``stage.frame_select`` to the plans' condition frames; with the learned head also its loss:
        (cross-entropy, accuracy) against the frame the DiT's own flow loss prefers, else None."""
        s = self.settings
        if s.get("frame_select", "all") == "latest":
            for p in plans:
                p.cond = None if p.cond is None else p.cond[-1:]
        if s.get("frame_select", "all") != "learned" or self.frame_selector is None:
            return None
        from fusion.frames import best_frames

        gen, dev = self.generator, self.generator.device
        memo = self._frame_label_memo()
        t_probe = float(s.get("frame_select_t", 0.8))
        todo, labels, probes, owners, keys = [], [], [], [], {}
        for p in plans:
            smp = p.sample
            if smp.cond is None:
                continue
            spans = self.image_spans(smp.ctx_ids)
            if len(spans) != smp.cond.shape[0]:
                raise DataError(f"stage.frame_select=learned: the context shows {len(spans)} images but the sample has "
                                f"{smp.cond.shape[0]} condition frames", smp.where or None, kind="frames")
            teacher = self.teacher is not None and bool(smp.request)
            if teacher:  # the probe reads the DiT's own encoder where there is one
                states, mask = self._teacher_states(smp.request)
            else:
                states, mask = p.states.detach().to(gen.dtype), p.mask
            todo.append((p, spans))
            key = (smp.where, smp.cond.shape[0]) if memo is not None and teacher and smp.where else None
            labels.append(memo.get(key) if key is not None else None)
            if labels[-1] is not None:
                continue
            keys[len(todo) - 1] = key
            cond = smp.cond.to(dev)
            if key is None:  # the sample's own noise, drawn afresh each step
                noises = [p.noise]
            else:  # fixed noises per sample and draw: the same label after a resume
                g = torch.Generator().manual_seed(zlib.crc32(f"{key[0]}|{key[1]}|{int(s.get('seed', 0))}".encode()))
                noises = [torch.randn(p.target.shape, generator=g).to(dev) for _ in range(int(s.get("frame_label_draws", 2)))]
            probes += [(p.target, noise, cond, states[0], mask[0]) for noise in noises]
            owners += [len(todo) - 1] * len(noises)
        sums: dict[int, torch.Tensor] = {}
        for i, (_, losses) in zip(owners, best_frames(gen, probes, t_probe, batched)):
            sums[i] = sums[i] + losses if i in sums else losses
        for i, total in sums.items():
            labels[i] = int(total.argmin())
            if keys[i] is not None:
                memo[keys[i]] = labels[i]
        losses, hits = [], []
        for (p, spans), best in zip(todo, labels):
            logits = self.frame_selector(p.sample.ctx_hidden.to(dev), spans)
            losses.append(nn.functional.cross_entropy(logits[None].float(), torch.tensor([best], device=dev)))
            hits.append(float(int(logits.argmax()) == best))
            if p.cond is not None:  # teacher forcing: the DiT learns from the frame it does best with
                p.cond = None if best == len(spans) else p.sample.cond[best : best + 1].to(dev)
        # every selector weight in the graph, also when no sample had earlier images (ZeRO expects their gradients)
        zero = self.frame_selector.zero_anchor().to(dev)
        if not losses:
            return zero, None
        return torch.stack(losses).mean() + zero, torch.tensor(sum(hits) / len(hits))

    # ------------------------------------------------------------------ save / load
    @property
    def trained_negative(self) -> str | None:
        """The text-guidance negative stage 2 trained with (``stage.text_dropout_form``: null or duogen);
        None when stage 2 never trained this model. A loaded manifest's ``guidance_negative`` wins."""
        recorded = getattr(self, "_guidance_negative", _UNSET)
        if recorded is not _UNSET:
            return recorded
        if self.settings.get("name") != "align":
            return None
        return self.settings.get("text_dropout_form", "null")

    def save_pretrained(self, path: str | Path, config: dict | DictConfig | None = None) -> Path:
        """Write the whole model to ``path`` atomically (a temporary sibling renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            manifest: dict[str, Any] = {"format": "unifuse-fused-model", "version": FORMAT_VERSION, "parts": {}, "lora": {}}
            self._save_mllm(tmp / "mllm")
            manifest["parts"]["mllm"] = {"folder": "mllm", "spec": {**self.specs.get("mllm", {}), "hidden_layers": self.mllm.hidden_layers}}
            if self.generator is not None:
                self._save_generator(tmp / "generator")
                spec = self.specs.get("generator") or {"_target_": f"{type(self.generator).__module__}.{type(self.generator).__name__}.from_pretrained"}
                if getattr(self.generator, "text_length", None):  # the saved folder has no tokenizer/ to derive it from
                    spec = {**spec, "text_length": int(self.generator.text_length)}
                manifest["parts"]["generator"] = {"folder": "generator", "spec": spec}
            if self.connector is not None:
                (tmp / "connector").mkdir()
                save_file({k: v.detach().contiguous().cpu() for k, v in self.connector.state_dict().items()}, str(tmp / "connector" / "model.safetensors"))
                (tmp / "connector" / "config.json").write_text(json.dumps(self.specs.get("connector", {}), indent=2))
                manifest["parts"]["connector"] = {"folder": "connector", "spec": self.specs.get("connector", {})}
            if self.frame_selector is not None:
                (tmp / "frame_selector").mkdir()
                save_file({k: v.detach().contiguous().cpu() for k, v in self.frame_selector.state_dict().items()},
                          str(tmp / "frame_selector" / "model.safetensors"))
                spec = {"_target_": "fusion.frames.FrameSelector", **self.frame_selector.config()}
                (tmp / "frame_selector" / "config.json").write_text(json.dumps(spec, indent=2))
                manifest["parts"]["frame_selector"] = {"folder": "frame_selector", "spec": spec}
            from fusion import faults

            faults.maybe_signal("kill_in_export", 0)  # reliability tests: die with the parts half written
            for part, entry in self.lora.items():
                from peft import get_peft_model_state_dict

                d = tmp / "lora" / part
                d.mkdir(parents=True)
                entry["config"].save_pretrained(str(d))
                save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(entry["module"]).items()}, str(d / "adapter_model.safetensors"))
                manifest["lora"][part] = f"lora/{part}"
            manifest["settings"] = self.settings
            source = self.generator_source
            if config is not None and config.get("generator") is not None:
                raw = str(config["generator"]["path"])
                source = str(Path(raw).resolve()) if Path(raw).exists() else raw
            manifest["generator_source"] = source  # where the DiT came from: its own text encoder (gain reference, teacher)
            manifest["guidance_negative"] = self.trained_negative  # what generation's negative=auto resolves to
            manifest["config"] = _to_container(config) if config is not None else None
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @staticmethod
    def _base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
        """A module's weights without LoRA tensors, under the names of the un-adapted model."""
        return {k.replace(".base_layer.", "."): v.detach().contiguous() for k, v in module.state_dict().items() if "lora_" not in k}

    def _save_mllm(self, d: Path) -> None:
        if self.mllm.model is None:  # features came from the cache: the frozen MLLM's folder, as it was
            self.mllm.save_pretrained(d)
        elif "mllm" in self.lora:  # base weights under their own names; the adapter goes to lora/mllm
            self.mllm.model.save_pretrained(d, state_dict=self._base_state_dict(self.mllm.model))
            self.mllm.processor.save_pretrained(d)
        else:
            self.mllm.save_pretrained(d)

    def _save_generator(self, d: Path) -> None:
        gen = self.generator
        if "generator" in self.lora:
            (d / "transformer").mkdir(parents=True)
            gen.transformer.save_config(d / "transformer")
            save_file(self._base_state_dict(gen.transformer), str(d / "transformer" / "diffusion_pytorch_model.safetensors"))
        else:
            gen.transformer.save_pretrained(d / "transformer")
        gen.vae.save_pretrained(d / "vae")
        gen.make_scheduler().save_pretrained(d / "scheduler")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> FusedModel:
        """Rebuild a model written by :meth:`save_pretrained` (no Hydra config needed)."""
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise CheckpointError(f"{path}: no {MANIFEST}; not a unifuse fused-model folder")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{mf}: not valid JSON ({e.msg})") from None
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{mf}: format version {manifest['version']} is newer than this unifuse ({FORMAT_VERSION})")
        parts = manifest.get("parts", {})
        required = {"mllm": "config.json", "generator": "transformer/config.json", "connector": "model.safetensors",
                    "frame_selector": "model.safetensors"}
        if "mllm" not in parts:
            raise CheckpointError(f"{mf}: names no mllm part")
        for name, entry in parts.items():
            needed = path / entry["folder"] / required.get(name, "")
            if not needed.exists():
                raise CheckpointError(f"{path}: part '{name}' is incomplete or missing ({needed} not found)")
        mspec = dict(parts["mllm"]["spec"])
        target = mspec.pop("_target_", "backbones.mllm.qwen2_5_vl.Qwen25VLAdapter.from_pretrained")
        mllm = instantiate({"_target_": target, "path": str(path / parts["mllm"]["folder"]), **mspec}, device=device)
        generator = connector = None
        if "generator" in parts:
            gspec = dict(parts["generator"]["spec"])
            generator = instantiate({**gspec, "path": str(path / parts["generator"]["folder"])}, device=device)
        if "connector" in parts:
            cspec = dict(parts["connector"]["spec"])
            connector = get_class(cspec.pop("_target_"))(**cspec)
            connector.load_state_dict(load_file(str(path / parts["connector"]["folder"] / "model.safetensors")))
        selector = None
        if "frame_selector" in parts:
            fspec = dict(parts["frame_selector"]["spec"])
            fspec.setdefault("request_heads", 0)  # saved before the head pooled its request: the mean, a linear query
            selector = get_class(fspec.pop("_target_"))(**fspec)
            selector.load_state_dict(load_file(str(path / parts["frame_selector"]["folder"] / "model.safetensors")))
        specs = {k: v["spec"] for k, v in parts.items() if k != "frame_selector"}
        model = cls(mllm, generator, connector, specs, manifest.get("settings"), frame_selector=selector)
        model.mllm.hidden_layers = parts["mllm"]["spec"]["hidden_layers"]
        model.generator_source = manifest.get("generator_source")
        if "guidance_negative" in manifest:  # older manifests: trained_negative is derived from settings
            if manifest["guidance_negative"] not in (None, "null", "duogen"):
                raise CheckpointError(f"{mf}: guidance_negative must be null, duogen or absent, got {manifest['guidance_negative']!r}")
            model._guidance_negative = manifest["guidance_negative"]
        for part, folder in manifest.get("lora", {}).items():
            from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

            module = model.mllm.language_model if part == "mllm" else model.generator.transformer
            cfg = LoraConfig.from_pretrained(str(path / folder))
            inject_adapter_in_model(cfg, module)
            set_peft_model_state_dict(module, load_file(str(path / folder / "adapter_model.safetensors")))
            model.lora[part] = {"config": cfg, "module": module}
        return model.to(device).eval()
