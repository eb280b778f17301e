"""Interleaved generation: the MLLM writes, ``<|bov|>`` makes the DiT draw, the chat goes on.

One turn (:meth:`Chat.send`):

1. the user's turn (text and images) is appended to the MLLM's KV cache;
2. the MLLM decodes until ``<|bov|>`` or end of turn;
3. at ``<|bov|>``: the selected-layer hidden states of the whole prefix, already kept by
   the decoding (never recomputed), go through the connector (query connectors run their
   queries after the cache, which is cropped back); every earlier image of the conversation
   (the user's and the generated ones, latents cached) becomes a condition frame; the DiT
   samples with classifier-free guidance whose negative is what stage 2 trained as "no
   text" (``negative="auto"``, read from the manifest): zeros (null) or the DuoGen negative
   that keeps the visual conditions and drops the final text chunk (the prefix up to the
   last image); the image is decoded and appended to the MLLM's cache as vision tokens;
   decoding goes on;
4. limits: ``max_new_tokens`` text tokens and ``max_images_per_turn`` images per turn
   (past it ``<|bov|>`` is suppressed).

The :class:`Chat` keeps the whole history (text, user images, generated images, the cache),
so turn 5 can edit the image of turn 1. ``recompute="images"`` is the naive baseline the
benchmark compares against (the full context re-encoded at each image).

Run as: ``python tools/generate.py model=outputs/demo/align/final prompt="Draw a red circle"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from backbones.generator.base import to_pil
from fusion.data import Conversation, open_image
from fusion.errors import CheckpointError, ConfigError, DataError
from fusion.model import FusedModel

log = logging.getLogger(__name__)

NEGATIVES = ("auto", "duogen", "null")
"""Text-guidance negatives a chat accepts; auto follows the model's training."""


def resolve_negative(requested: str, trained: str | None) -> str:
    """The negative a chat samples with: ``auto`` becomes what stage 2 trained as a dropped text
    (``trained``: null or duogen; null when unknown). An explicit choice is kept, with a warning
    when the model was trained with the other one."""
    if requested not in NEGATIVES:
        raise ConfigError(f"negative must be auto, duogen or null, got {requested!r}")
    if requested == "auto":
        return trained or "null"
    if trained is not None and requested != trained:
        log.warning("negative=%s, but this model was trained with text_dropout_form=%s: the guidance negative is "
                    "an input it never learned as 'no text' (negative=auto follows training)", requested, trained)
    return requested


@dataclass
class GenerationSettings:
    """How a chat decodes text and draws images."""

    max_new_tokens: int = 256
    """Text tokens per assistant turn (the turn is closed when reached)."""
    max_images_per_turn: int = 4
    """Images per assistant turn; past it <|bov|> cannot be drawn."""
    steps: int = 20
    """DiT sampler steps."""
    guidance: float = 4.0
    """Text guidance scale."""
    image_guidance: float = 1.0
    """Image (condition-frame) guidance scale; 1 disables the extra pass."""
    negative: str = "auto"
    """Text-guidance negative: auto (what stage 2 trained with, null if unknown), duogen (prefix up to the last image) or null (zeros)."""
    seed: int = 0
    """Seed of image i is seed + i; text sampling uses its own generator from seed."""
    temperature: float = 0.0
    """0: greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling when temperature > 0."""
    height: int | None = None
    """Image height (None: the trained bucket nearest the last user image's aspect with data.buckets, else the generator's image_size)."""
    width: int | None = None
    """Image width (None: as height)."""
    max_condition_frames: int | None = None
    """Use only the most recent N earlier images as condition frames (None: all)."""


@dataclass
class Segment:
    """One piece of the transcript."""

    turn: int
    role: str
    kind: str  # "text" or "image"
    text: str = ""
    image: Image.Image | None = None
    path: str | None = None


@dataclass
class DrawRecord:
    """What the DiT saw for one drawn image (for tests and inspection)."""

    context_tokens: int
    negative_tokens: int
    condition_images: list[int] = field(default_factory=list)  # indices into Chat.images


class ForceTokens:
    """A logits processor forcing ``token`` at the given decode calls (0-based), for tests and benchmarks."""

    def __init__(self, schedule: dict[int, int]):
        self.schedule = dict(schedule)
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.schedule.get(self.calls)
        self.calls += 1
        if token is not None:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, token] = 0.0
        return scores


class Chat:
    """A multi-turn interleaved conversation with a fused model."""

    def __init__(self, model: FusedModel, settings: GenerationSettings | None = None, system: str | None = None,
                 recompute: str = "never", logits_processor: Any = None, on_text: Callable[[str], None] | None = None):
        if model.generator is None or model.connector is None:
            raise CheckpointError("this fused model has no generator or connector part, so it cannot draw images")
        self.model = model.eval()
        self.mllm = model.mllm
        self.settings = settings or GenerationSettings()
        self.negative = resolve_negative(self.settings.negative, model.trained_negative)
        """The resolved text-guidance negative: duogen or null."""
        self.system = system
        self.logits_processor = logits_processor
        self.on_text = on_text
        self.on_progress: Callable[[int, int], None] | None = None
        """Called with (step, steps) after each sampler step of a drawing (the web chat's progress line)."""
        self.state = self.mllm.new_state()
        self.state.recompute = recompute
        self.turn = 0
        self.images: list[Image.Image] = []  # every image of the conversation, in order
        self._latent_at: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}  # (image index, size) -> its latent, encoded once
        self.segments: list[Segment] = []
        self.draws: list[DrawRecord] = []
        self._text_rng = torch.Generator().manual_seed(self.settings.seed)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", **kwargs) -> Chat:
        return cls(FusedModel.from_pretrained(path, device=device), **kwargs)

    # ------------------------------------------------------------------ sizes and latents
    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the next drawing: ``height=`` / ``width=`` when set; else, for a model trained with
        ``data.buckets``, the trained bucket nearest the last user image's aspect; else the generator's square."""
        g, s = self.model.generator, self.settings
        h, w = g.image_size, g.image_size
        users = [seg.image for seg in self.segments if seg.kind == "image" and seg.role == "user" and seg.image is not None]
        if users and self.model.settings.get("buckets"):
            h, w = self.model.bucket_for(users[-1].height, users[-1].width)
        return (s.height or h, s.width or w)

    def _add_image(self, image: Image.Image, latent: torch.Tensor | None = None) -> int:
        """Add an image to the conversation (a drawn one with the latent it was drawn as); returns its index."""
        self.images.append(image)
        if latent is not None:
            f = self.model.generator.spatial_factor
            self._latent_at[(len(self.images) - 1, (latent.shape[-2] * f, latent.shape[-1] * f))] = latent
        return len(self.images) - 1

    def _latent(self, i: int, size: tuple[int, int]) -> torch.Tensor:
        """Image ``i``'s latent at ``size``, encoded once per size (as stage 2 saw its images: fitted to the bucket with
        ``data.buckets``, else resized)."""
        key = (i, tuple(size))
        if key not in self._latent_at:
            gen = self.model.generator
            if self.model.settings.get("buckets"):
                from fusion.buckets import fit

                self._latent_at[key] = gen.encode(fit(self.images[i], size))[0]
            else:
                self._latent_at[key] = gen.encode(self.images[i], size=size)[0]
        return self._latent_at[key]

    @property
    def _latents(self) -> list[torch.Tensor]:
        """Every image's latent at the current drawing size."""
        size = self.size
        return [self._latent(i, size) for i in range(len(self.images))]

    # ------------------------------------------------------------------ one turn
    def send(self, text: str, images: list[str | Image.Image] = ()) -> list[Segment]:
        """Add a user turn and generate the assistant's answer; returns the new segments."""
        if not text or not text.strip():
            raise DataError("the prompt is empty")
        loaded = []
        for ref in images:
            loaded.append(open_image(ref, where=str(ref) if isinstance(ref, str) else "image"))
        turn = self._render_user_turn(text, loaded)  # every check of the user's turn, before the chat changes
        self.turn += 1
        start = len(self.segments)
        for img in loaded:
            self._add_image(img)
            self.segments.append(Segment(self.turn, "user", "image", image=img))
        self.segments.append(Segment(self.turn, "user", "text", text=text))
        self.mllm.extend(self.state, *turn)
        self._assistant_turn()
        return self.segments[start:]

    def _render_user_turn(self, text: str, images: list[Image.Image]) -> tuple:
        """(ids, pixel_values, image_grid_thw) of a user turn to append; raises DataError when it does not fit the
        context. Changes nothing."""
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        first = self.state.length == 0
        # later turns render behind a placeholder system turn that is cut off below
        system = self.system if first else "-"
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        messages.append({"role": "user", "content": content})
        r = self.mllm.render(Conversation(messages), add_generation_prompt=True, check_length=False)
        ids = r.input_ids[0]
        if not first:
            cut = int((ids == self.mllm.end_of_turn_id).nonzero()[0]) + 1  # after the placeholder's end of turn
            ids = ids[cut:]
        if self.state.length + len(ids) > self.mllm.max_length:
            raise DataError(f"the message does not fit: the conversation would be {self.state.length + len(ids)} tokens, over "
                            f"mllm.max_length={self.mllm.max_length} (start a new conversation, or send less)", kind="too_long")
        return ids, r.pixel_values, r.image_grid_thw

    def _assistant_turn(self) -> None:
        s, mllm = self.settings, self.mllm
        bov, eot = mllm.bov_token_id, mllm.end_of_turn_id
        used, drawn = 0, 0
        while True:
            suppress = [bov] if drawn >= s.max_images_per_turn else []
            budget = s.max_new_tokens - used
            if budget <= 0:
                mllm.extend(self.state, [eot])  # close the turn so the history stays well formed
                break
            streamed: list[int] = []

            def on_token(tok: int) -> None:
                if tok not in (bov, eot):
                    streamed.append(tok)
                    if self.on_text is not None:
                        self.on_text(mllm.tokenizer.decode([tok]))

            new, reason = mllm.decode(self.state, budget, s.temperature, s.top_p, self._text_rng,
                                      logits_processor=self.logits_processor, suppress_ids=suppress, on_token=on_token)
            used += len(new)
            text = mllm.tokenizer.decode(streamed, skip_special_tokens=True)
            if text:
                self.segments.append(Segment(self.turn, "assistant", "text", text=text))
            if reason == "bov":
                image, latent = self._draw()
                self._add_image(image, latent)
                self.segments.append(Segment(self.turn, "assistant", "image", image=image))
                mllm.append_image(self.state, image)
                drawn += 1
                continue
            if reason == "length":
                mllm.extend(self.state, [eot])
            break

    # ------------------------------------------------------------------ drawing
    def _connector_states(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.model.connector_start(self.state.ids[:length])  # stage.connector_span
        hidden = self.state.hidden_states()[None, :, start:length]
        out = self.model.connector(hidden, torch.ones(1, length - start, dtype=torch.long, device=hidden.device))
        return out.states, out.mask

    def _frames_for(self, ctx: int) -> list[int]:
        """Indices of the earlier images the DiT gets, as the model was trained (``stage.frame_select``): all, the
        latest, or the one the learned head picks from the MLLM's states of the first ``ctx`` tokens (none: [])."""
        ids = torch.as_tensor(self.state.ids[:ctx])

        def hidden() -> torch.Tensor:
            n = len(self.model.image_spans(ids))
            if n != len(self.images):
                raise CheckpointError(f"frame_select=learned: the context shows {n} images, the chat holds {len(self.images)}")
            return self.state.hidden_states()[:, :ctx]

        return self.model.frame_indices(len(self.images), ids, hidden)

    @torch.no_grad()
    def _draw(self) -> tuple[Image.Image, torch.Tensor]:
        s, m = self.settings, self.model
        ids = self.state.ids
        if m.connector.uses_queries:
            qh = self.mllm.run_queries(self.state, m.connector.query_embeds())
            out = m.connector(qh)
            states, mask, ctx = out.states, out.mask, len(ids)
        else:
            ctx = len(ids) if m.settings.get("include_bov", True) else len(ids) - 1
            states, mask = self._connector_states(ctx)
        vision_end = self.mllm.vision_end_id
        neg_len = max((i + 1 for i in range(ctx) if ids[i] == vision_end), default=0)
        if self.negative == "duogen" and neg_len > 0 and not m.connector.uses_queries:
            if m.settings.get("connector_span", "all") == "since_image":
                raise ConfigError("negative=duogen: this model's connector reads only the tokens after the last image "
                                  "(stage.connector_span=since_image), and the DuoGen negative ends at that image: it holds "
                                  "no token (use negative=auto or null)")
            neg_states, neg_mask = self._connector_states(neg_len)
        else:
            neg_states, neg_mask, neg_len = torch.zeros_like(states), mask, 0
        cond_idx = self._frames_for(ctx)
        if s.max_condition_frames is not None:
            cond_idx = cond_idx[-s.max_condition_frames:] if s.max_condition_frames > 0 else []
        gen = m.generator
        h, w = self.size
        cond = torch.stack([self._latent(i, (h, w)) for i in cond_idx])[None] if cond_idx and gen.uses_condition_frames else None
        self.draws.append(DrawRecord(ctx, neg_len, cond_idx if cond is not None else []))
        latent = gen.sample(states.to(gen.dtype), mask, cond, steps=s.steps, guidance=s.guidance,
                            negative=(neg_states.to(gen.dtype), neg_mask), image_guidance=s.image_guidance,
                            generator=torch.Generator().manual_seed(s.seed + len(self.draws) - 1), height=h, width=w, decode=False,
                            callback=None if self.on_progress is None else (lambda i, t, x: self.on_progress(i + 1, s.steps)))
        image = to_pil(gen.decode(latent))[0]
        return image, latent[0]
