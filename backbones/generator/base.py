"""What every generator adapter shares: the flow-matching loss and the sampling loop.

A family file (``wan.py``, ``cosmos.py``, ``sana.py``) wraps the diffusers DiT, VAE and
scheduler and implements three things:

* (the VAE comes in its slot, ``backbones/generator/vae.py``: the checkpoint's own autoencoder
  class with its latent normalisation);
* ``_frames_velocity(frames [B,F,C,h,w], t [B], n_cond, text, mask, lengths) -> v [B,F,C,h,w]``:
  one DiT forward over the condition frames (the first ``n_cond``, clean) and the noisy
  target (the last), each family conditioning its own native way, returning velocities
  under the toolkit's convention (:mod:`fusion.flow`). ``lengths`` (None, or [B]) marks
  batch padding: a row's text positions at or past its length were added only to stack
  rows of different lengths, and the family keeps its cross-attention off them, so each
  row's velocity is the one its own text alone gives (:func:`pad_text`);
* ``text_dim`` (the width its cross-attention expects, read from the model config).

Everything else is here, the same for all families: :meth:`velocity` (the contract's
``velocity(noisy_target, t, cond_latents, text_states, text_mask)``), :meth:`flow_loss`
(condition frames never carry loss) and :meth:`sample` (one loop over a diffusers flow
scheduler, classifier-free guidance with its passes batched, condition frames held clean at
every step).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from backbones.paths import architecture_diff, local_folder, plain
from fusion.flow import add_noise, target_velocity


def to_tensor_images(images: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL image(s) or a [B,3,H,W] tensor in [-1,1] -> float tensor [B,3,H,W] in [-1,1]."""
    if isinstance(images, torch.Tensor):
        x = images if images.ndim == 4 else images[None]
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = nn.functional.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return x.float()
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and (im.height, im.width) != tuple(size):
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, 3)
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1,1] -> PIL images."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


def pad_text(states: list[torch.Tensor], masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stack text conditions of different lengths for one batched DiT pass.

    ``states``: each ``[1, T_i, D]`` (or ``[T_i, D]``); ``masks``: each ``[1, T_i]`` or None (all
    real). Returns ``(states [B, T, D], mask [B, T], lengths [B])``, zeros past each row's own
    length (mask 0 there too); ``lengths`` is None when every row has the same length, so the
    batch carries no padding at all.
    """
    rows = [s[0] if s.ndim == 3 else s for s in states]
    ms = [torch.ones(r.shape[0], dtype=torch.long, device=r.device) if m is None else (m[0] if m.ndim == 2 else m).long()
          for r, m in zip(rows, masks)]
    n = max(r.shape[0] for r in rows)
    lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    out = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.long, device=rows[0].device)
    for i, (r, m) in enumerate(zip(rows, ms)):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = m
    return out, mask, (None if bool((lengths == n).all()) else lengths)


def length_mask(lengths: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``[B, n]`` bool, True on each row's own positions (``pad_text``'s lengths); None for no padding."""
    if lengths is None:
        return None
    return torch.arange(n, device=lengths.device)[None] < lengths[:, None]


@dataclass
class DiTRow:
    """One row of a batched DiT pass (:meth:`FlowGenerator.batched_velocity`)."""

    x: torch.Tensor  # [C, h, w] the noisy target
    t: torch.Tensor  # its time in [0, 1] (one value)
    cond: torch.Tensor | None  # [N, C, h, w] clean condition latents, or None
    states: torch.Tensor  # [T, D] its text condition
    mask: torch.Tensor | None  # [T] (None: all real)


class FlowGenerator(nn.Module):
    """Base class of the generator adapters (see the module docstring)."""

    #: whether condition frames reach the DiT (False for SANA's ``mllm_only``)
    uses_condition_frames: bool = True
    #: whether the DiT attends its text padding (no text mask: Wan, Cosmos), so that the number of zero
    #: positions it was pretrained with is part of what it reads (see :attr:`text_length`)
    attends_text_padding: bool = False
    #: the text length the family's pipeline pads its encoder's states to (zeros), which the DiT was
    #: trained with; shorter conditions are zero-padded to it when :attr:`attends_text_padding` (None: never)
    text_length: int | None = None

    def __init__(self, transformer: nn.Module, vae: nn.Module, scheduler: Any = None, image_size: int = 512):
        super().__init__()
        self.transformer = transformer
        if not hasattr(vae, "encode") or not hasattr(vae, "spatial_factor"):
            from backbones.generator.vae import SLOTS

            vae = SLOTS[type(vae).__name__](vae)  # a bare diffusers autoencoder: put it in its slot
        self.vae_slot = vae
        self.vae = vae.vae
        self.vae.requires_grad_(False)
        if vae.latent_channels != self.latent_channels:
            from fusion.errors import CheckpointError

            raise CheckpointError(f"generator: the VAE has {vae.latent_channels} latent channels but the DiT expects {self.latent_channels}")
        self.image_size = image_size
        if scheduler is None:
            raise ValueError("generator.scheduler is required (a diffusers flow scheduler: _target_ + kwargs)")
        if not hasattr(scheduler, "from_config"):  # a config dict: build it once
            from hydra.utils import instantiate

            with torch.device("cpu"):  # schedulers compute their tables in numpy, also when the model is built on meta
                scheduler = instantiate(scheduler)
        self._scheduler_cls, self._scheduler_cfg = type(scheduler), scheduler.config

    # ---- family hooks --------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along each side."""
        return self.vae_slot.spatial_factor

    @property
    def size_unit(self) -> int:
        """Pixels per DiT token along each side (latent cell x patch): image sides are multiples of it."""
        p = self.transformer.config.patch_size
        return self.spatial_factor * int(p[-1] if isinstance(p, (list, tuple)) else p)

    #: the family's published (height, width) sizes (``data.buckets=generator`` scales them, :mod:`fusion.buckets`)
    published_buckets: tuple[tuple[int, int], ...] = ()

    def text_width_notes(self, mllm_layers: int, mllm_width: int) -> list[str]:
        """What a planner should say about this checkpoint's text width next to an MLLM of ``mllm_layers`` x ``mllm_width``
        (a checkpoint whose text projection was trained on one particular MLLM); none by default."""
        return []

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae_slot.encode(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae_slot.decode(z)

    def _frames_velocity(self, frames, t, n_cond, text_states, text_mask, text_lengths=None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def pads_text(self) -> bool:
        """Whether rows with texts of different lengths can share one DiT pass right now
        (:func:`pad_text`); when False the batched paths group rows by text length too."""
        return True

    def dit_blocks(self) -> nn.ModuleList:
        """The DiT's transformer blocks (for feature hooks such as representation alignment)."""
        raise NotImplementedError

    @property
    def dit_hidden_size(self) -> int:
        c = self.transformer.config
        return c.num_attention_heads * c.attention_head_dim

    def target_grid(self, tokens: torch.Tensor, frames_shape: tuple[int, ...]) -> torch.Tensor:
        """A block's token states [B, N, C] -> the target frame's tokens as a grid [B, gh, gw, C]."""
        raise NotImplementedError

    @contextmanager
    def capture_block(self, index: int):
        """Keep the output of DiT block ``index`` of the next forward: yields a dict with ``grid``."""
        blocks = self.dit_blocks()
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(f"connector.align_layer={index} is out of range for a DiT with {len(blocks)} blocks")
        store: dict[str, Any] = {}

        def hook(module, args, out):
            store["tokens"] = out[0] if isinstance(out, tuple) else out

        handle = blocks[index].register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()
            if "tokens" in store:
                store["grid"] = self.target_grid(store.pop("tokens"), self._last_frames_shape)

    # ---- shared API ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Any, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images (PIL or [-1,1] tensor) -> normalised latents [B,C,h,w]. ``size`` resizes first."""
        x = to_tensor_images(images, size).to(self.device, self.vae.dtype)
        return self._encode(x).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,C,h,w] -> images [B,3,H,W] in [-1,1]."""
        return self._decode(latents.to(self.device, self.vae.dtype)).float().clamp(-1, 1)

    def _frames(self, target: torch.Tensor, cond_latents: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        if cond_latents is None or not self.uses_condition_frames or cond_latents.shape[1] == 0:
            return target[:, None], 0
        if cond_latents.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"condition latents {tuple(cond_latents.shape[-2:])} and target {tuple(target.shape[-2:])} differ in size; "
                "encode earlier images with encode(images, size=target size)"
            )
        return torch.cat([cond_latents.to(target.dtype), target[:, None]], dim=1), cond_latents.shape[1]

    def velocity(
        self,
        noisy_target: torch.Tensor,
        t: torch.Tensor,
        cond_latents: torch.Tensor | None,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        text_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (``eps - x0``) of the noisy target [B,C,h,w] at ``t`` [B] in [0,1].

        ``text_lengths`` [B] (from :func:`pad_text`): each row's own text length; positions past
        it are batch padding, never attended, so a row's velocity is the one of its text alone.
        """
        frames, n_cond = self._frames(noisy_target, cond_latents)
        self._last_frames_shape = tuple(frames.shape)
        t = torch.as_tensor(t, device=frames.device, dtype=torch.float32).reshape(-1).expand(frames.shape[0])
        if text_mask is None:
            text_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
        if text_lengths is not None and not self.pads_text:
            raise ValueError(f"{type(self).__name__} cannot take padded text rows right now (pads_text is False): group rows by text length")
        text_states, text_mask, text_lengths = self.pad_to_text_length(text_states, text_mask, text_lengths)
        return self._frames_velocity(frames, t, n_cond, text_states, text_mask, text_lengths)[:, -1]

    def pad_to_text_length(self, states: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None):
        """Zero-pad a text condition shorter than :attr:`text_length`, as the family's pipeline pads its encoder's.

        A DiT with no text mask (Wan, Cosmos) attends its zero padding: the pipeline's zeros take
        part of every softmax, so the DiT reads a condition through the share of attention those
        zeros hold. A connector that emits fewer tokens than the DiT was pretrained with (a fixed
        number of queries) would hand it a condition it never saw, even if each token were exactly
        its encoder's (measured on the toy Wan DiT: its own encoder's real tokens with no padding
        explain less than nothing at t=0.7; padded to its 48 tokens, 0.32 of the loss). Rows of a
        batch (``lengths``) each attend at least :attr:`text_length` positions, as they would alone.
        """
        n = self.text_length
        if not self.attends_text_padding or not n or (states.shape[1] >= n and lengths is None):
            return states, mask, lengths
        extra = max(0, n - states.shape[1])
        if extra:
            states = torch.nn.functional.pad(states, (0, 0, 0, extra))
            mask = torch.nn.functional.pad(mask, (0, extra), value=1)
        if lengths is not None:
            lengths = lengths.clamp(min=n)
            if bool((lengths == states.shape[1]).all()):
                lengths = None
        return states, mask, lengths

    def flow_loss(
        self,
        target: torch.Tensor,
        cond_latents: torch.Tensor | None,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Mean squared velocity error on the target frame.

        ``noise`` is either [B,C,h,w] (the target's) or [B,F,C,h,w] with one slice per
        frame, condition frames first as a family's native pipeline draws it; condition
        frames always enter clean, so their noise never changes the loss.
        """
        eps = noise[:, -1] if noise.ndim == target.ndim + 1 else noise
        x_t = add_noise(target, eps, t)
        v = self.velocity(x_t, t, cond_latents, text_states, text_mask)
        return torch.nn.functional.mse_loss(v.float(), target_velocity(target, eps).float())

    def make_scheduler(self):
        """A fresh diffusers scheduler (schedulers keep per-run state)."""
        return self._scheduler_cls.from_config(self._scheduler_cfg)

    def batched_velocity(self, rows: list[DiTRow], batch: bool = True, capture: int | None = None):
        """Velocities of many rows in as few DiT passes as their shapes allow.

        Rows sharing a target shape and a number of condition frames go through one forward
        (texts of different lengths padded, :func:`pad_text`; grouped by text length too when
        :attr:`pads_text` is False); each row's velocity is the one it gets alone, to float
        tolerance. ``batch=False``: one forward per row, in order (the reference). ``capture``:
        also return the target-frame grid of DiT block ``capture`` per row (:meth:`capture_block`).
        Returns ``(velocities, grids)``: lists aligned with ``rows`` (``grids`` holds None
        without ``capture``).
        """
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(rows):
            key = (tuple(r.x.shape), self._n_cond(r.cond), None if self.pads_text else r.states.shape[-2]) if batch else i
            groups.setdefault(key, []).append(i)
        velocities: list[torch.Tensor | None] = [None] * len(rows)
        grids: list[torch.Tensor | None] = [None] * len(rows)
        for idx in groups.values():
            first = rows[idx[0]]
            x = torch.stack([rows[i].x for i in idx])
            t = torch.stack([torch.as_tensor(rows[i].t, dtype=torch.float32, device=x.device).reshape(()) for i in idx])
            cond = torch.stack([rows[i].cond for i in idx]) if self._n_cond(first.cond) else None
            states, mask, lengths = pad_text([rows[i].states for i in idx], [rows[i].mask for i in idx])
            with self.capture_block(capture) if capture is not None else nullcontext() as store:
                v = self.velocity(x, t, cond, states, mask, lengths)
            for j, i in enumerate(idx):
                velocities[i] = v[j]
                if store is not None:
                    grids[i] = store["grid"][j]
        return velocities, grids

    def _n_cond(self, cond: torch.Tensor | None) -> int:
        """Condition frames one row's ``cond`` [N,C,h,w] puts in front of its target."""
        return 0 if cond is None or not self.uses_condition_frames else int(cond.shape[0])

    @torch.no_grad()
    def sample(
        self,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        cond_latents: torch.Tensor | None = None,
        steps: int = 20,
        guidance: float = 1.0,
        negative: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        image_guidance: float = 1.0,
        decode: bool = True,
        callback: Any = None,
        batch_guidance: bool = True,
    ) -> torch.Tensor:
        """Draw images [B,3,H,W] in [-1,1] (or latents if ``decode=False``).

        Classifier-free guidance: ``v = v_neg + guidance * (v_pos - v_neg)`` where the
        negative is ``negative=(states, mask)`` with the *same* condition frames (DuoGen:
        the negative drops the final text chunk, keeps the visual conditions); zeros if
        not given. ``image_guidance > 1`` adds a third pass without condition frames:
        ``v = v_uncond_img + image_guidance * (v_neg - v_uncond_img) + guidance * (v_pos - v_neg)``.
        Condition frames enter clean at every step; only the target evolves.

        ``batch_guidance`` (default): the passes of a step share DiT forwards
        (:meth:`batched_velocity`: positive and negative in one batch, texts of different
        lengths padded; the no-image pass joins them where its frame layout is the same, else
        it is a second batch); False runs each pass as its own forward (the same latents to
        float tolerance, slower).
        """
        device = self.device
        height, width = height or self.image_size, width or self.image_size
        b = text_states.shape[0]
        f = self.spatial_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this generator, got {height}x{width}")
        shape = (b, self.latent_channels, height // f, width // f)
        x = torch.randn(shape, generator=generator, device="cpu" if generator is None else generator.device).to(device)
        if text_mask is None:
            text_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)
        passes = [(cond_latents, text_states, text_mask)]  # positive, then negative, then (image guidance) no image
        if guidance != 1.0 or image_guidance != 1.0:
            if negative is None:
                negative = (torch.zeros_like(text_states), text_mask)
            neg_states, neg_mask = negative
            if neg_mask is None:
                neg_mask = torch.ones(neg_states.shape[:2], dtype=torch.long, device=neg_states.device)
            passes.append((cond_latents, neg_states, neg_mask))
            if image_guidance != 1.0 and cond_latents is not None:
                passes.append((None, neg_states, neg_mask))
        sched = self.make_scheduler()
        sched.set_timesteps(steps, device=device)
        sigmas = sched.sigmas
        for i, ts in enumerate(sched.timesteps):
            t = sigmas[i].reshape(1).expand(b).to(device)
            if len(passes) == 1 or not batch_guidance:
                vs = [self.velocity(x, t, c, s, m) for c, s, m in passes]
            else:
                rows = [DiTRow(x[j], t[j], None if c is None else c[j], s[j], m[j]) for c, s, m in passes for j in range(b)]
                out, _ = self.batched_velocity(rows)
                vs = [torch.stack(out[k * b : (k + 1) * b]) for k in range(len(passes))]
            if len(vs) == 3:
                v_pos, v_neg, v_none = vs
                v = v_none + image_guidance * (v_neg - v_none) + guidance * (v_pos - v_neg)
            elif len(vs) == 2:
                v_pos, v_neg = vs
                v = v_neg + guidance * (v_pos - v_neg)
            else:
                v = vs[0]
            x = sched.step(v.to(x.dtype), ts, x, return_dict=False)[0]
            if callback is not None:
                callback(i, t, x)
        return self.decode(x) if decode else x


def load_transformer(cls: type, path: str, width_key: str, width: int | None, dtype: torch.dtype = torch.float32, subfolder: str = "transformer"):
    """``cls.from_pretrained(path, subfolder)``; if ``width`` differs from the checkpoint's
    ``width_key``, re-initialise only the tensors whose shape depends on it.

    diffusers' ``ignore_mismatched_sizes=True`` loads every other tensor but leaves the
    mismatched ones on the meta device (no values); here each module owning such a tensor
    is materialised, reset with its own ``reset_parameters`` and given back every tensor
    that did load, so all other weights stay bit-identical to the checkpoint.
    """
    from fusion.errors import CheckpointError

    local_folder(path, "generator.path")
    try:
        config = cls.load_config(path, subfolder=subfolder)
        if width is None or config.get(width_key) == width:
            return cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
        model = cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, ignore_mismatched_sizes=True, **{width_key: width})
    except OSError as e:
        raise CheckpointError(f"generator.path: could not load {subfolder!r} from {path!r}: {str(e).splitlines()[0]}") from None
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if not any(p.is_meta for p in own.values()):
            continue
        loaded = {n: p.detach().clone() for n, p in own.items() if not p.is_meta}
        module.to_empty(device="cpu", recurse=False)
        module.reset_parameters()
        with torch.no_grad():
            for n, v in loaded.items():
                getattr(module, n).copy_(v)
        module.to(dtype)
    return model


def reinitialised_keys(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ (shape or value) between two state dicts."""
    return sorted(k for k in after if k not in before or before[k].shape != after[k].shape or not torch.equal(before[k], after[k]))


def transformer_config(cls: type, path: str, architecture: dict | None) -> dict:
    """The DiT's config: the yaml's ``architecture.transformer`` if written out, else the checkpoint's."""
    architecture = plain(architecture)
    if architecture is not None:
        return dict(architecture["transformer"])
    return dict(cls.load_config(path, subfolder="transformer"))


def load_parts(cls: type, path: str, width_key: str, width: int | None, dtype: torch.dtype,
               architecture: dict | None = None, device: str | None = None):
    """(transformer, VAE slot) of a diffusers pipeline folder or hub id.

    ``device="meta"``: the architecture only, no weights and no memory, from the yaml's
    ``architecture`` (``transformer`` and ``vae`` config.json fields) or the local folder's
    config files; a hub id without ``architecture`` cannot be built this way. On a real load,
    every ``architecture`` field that differs from the checkpoint's config is logged.
    """
    import logging

    import diffusers

    from backbones.generator.vae import SLOTS
    from fusion.errors import CheckpointError

    architecture = plain(architecture)
    if str(device) == "meta":
        if architecture is None and local_folder(path, "generator.path") is None:
            raise CheckpointError(f"generator.path: {path!r} is a hub id and generator.architecture is not written out; "
                                  "building on the meta device needs one of them")
        tcfg = transformer_config(cls, path, architecture)
        try:
            vcfg = dict(architecture["vae"]) if architecture is not None else dict(diffusers.AutoencoderKL.load_config(path, subfolder="vae"))
        except OSError as e:
            raise CheckpointError(f"generator.path: could not read vae/config.json from {path!r}: {str(e).splitlines()[0]}") from None
        if width is not None:
            tcfg[width_key] = width
        name = vcfg.get("_class_name")
        if name not in SLOTS:
            raise CheckpointError(f"generator.architecture.vae._class_name must name one of {', '.join(SLOTS)}, got {name!r}")
        with torch.device("meta"):
            transformer = cls.from_config({k: v for k, v in tcfg.items() if not k.startswith("_")})
            if dtype != torch.float32:  # (diffusers warns that a cast by to() skips its keep-in-fp32 modules: no weights here)
                level = diffusers.utils.logging.get_verbosity()
                diffusers.utils.logging.set_verbosity_error()
                transformer = transformer.to(dtype)
                diffusers.utils.logging.set_verbosity(level)
            vae = getattr(diffusers, name).from_config({k: v for k, v in vcfg.items() if not k.startswith("_")})
        return transformer, SLOTS[name](vae)
    from backbones.generator.vae import load_vae

    transformer = load_transformer(cls, path, width_key, width, dtype)
    vae = load_vae(path)
    if architecture is not None:
        want = {k: v for k, v in architecture["transformer"].items() if not (width is not None and k == width_key)}
        differ = architecture_diff(want, dict(transformer.config), "transformer.")
        differ += architecture_diff(architecture["vae"], dict(vae.vae.config), "vae.")
        if differ:
            logging.getLogger(__name__).warning("generator.architecture differs from %s (the checkpoint's values are used): %s",
                                                path, "; ".join(differ))
    return transformer, vae

