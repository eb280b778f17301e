"""The conditioning gain: is the DiT using the connector's states at all?

A falling stage-2 loss proves nothing: a DiT can lower its flow loss while ignoring its text
(it learns the average image). The instrument compares, on a fixed batch, at fixed ``t`` and
fixed noise, the flow loss with

* the true states (the connector's output for each sample's context),
* zero states (the null condition of classifier-free guidance),
* shuffled states (another sample's states),

and reports ``gain@t = (loss_zero - loss_true) / loss_zero``: the share of the loss the text
explains, and ``shuffle_gain@t`` likewise against the shuffled states (positive only when the
states carry something specific to *this* sample). With the generator's own text encoder at
hand, ``reference_gain@t`` is the same figure for the DiT reading its own encoder's states of
each sample's request: what a working connector should approach, and ``reference_real_gain@t``
the same with only its real tokens, no padding: equal to ``reference_gain@t`` when the generator
zero-pads short conditions to the length its DiT was trained with (``generator.text_length``); far
below it where the DiT attends its padding and that length is not set (toy Wan, t=0.7: -0.54 vs 0.32). With a per-token connector,
``oracle_gain@t`` feeds the DiT the teacher's states laid on the context tokens that say the same
words, zeros elsewhere (:mod:`fusion.distill`, what ``stage.distill_target=aligned`` regresses
onto): the ceiling of a connector that imitates the teacher perfectly, through the real path
(the context's length and padding count, not the teacher's).

The DiT gets each sample's condition frames as generation would (``stage.frame_select``: every
earlier image, the latest, or the learned head's pick).

Healthy stage 2: the gain rises well above zero in the first few hundred steps. A gain that
stays near 0 means the DiT is not using the connector's states; the trainer warns
(``stage.gain_every``, ``stage.gain_warn``). It warns too when the DiT's own-encoder gain falls
well below its highest value so far (``stage.erosion_warn``): the DiT is being worn away, and the
ratio of the fused gain to a shrinking own gain overstates the connector.

Run as: ``python tools/evaluate.py model=outputs/demo/align/final`` (reports it), or read
``gain@0.7`` in a stage-2 run's ``metrics.jsonl`` / ``train.log`` / ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from backbones.generator.base import DiTRow
from fusion.flow import add_noise, target_velocity

DEFAULT_TS = (0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def conditioning_gain(model, samples: Sequence, ts: Sequence[float] = DEFAULT_TS, seed: int = 0, batch: bool = True,
                      rows_per_pass: int = 32) -> dict[str, float]:
    """Losses with true / zero / shuffled states (and the reference encoder's, when the model has one)
    at each ``t`` in ``ts``, averaged over ``samples`` (prepared :class:`fusion.model.AlignSample`).

    Every (sample, t, condition) is one row of :meth:`~backbones.generator.base.FlowGenerator.batched_velocity`:
    rows that share a shape go through the DiT together, ``rows_per_pass`` at most, each row's velocity the one it gets
    alone to float tolerance (``batch=False``: one DiT pass per row, the reference; tested equal)."""
    if len(samples) < 2:
        raise ValueError("the conditioning gain needs at least 2 samples (one to shuffle with)")
    gen = model.generator
    dev = gen.device
    was = model.connector.training, gen.transformer.training
    model.connector.eval()
    gen.transformer.eval()
    try:
        conds = [model.sample_states(s)[:2] for s in samples]
        teacher = getattr(model, "teacher", None)
        refs = [model._teacher_states(s.request) if teacher is not None and s.request else None for s in samples]
        oracles = [_oracle(model, s, ref, st) if ref is not None else None for s, ref, (st, _) in zip(samples, refs, conds)]
        rows, keys, targets = [], [], []  # targets: (target, noise) of each row's sample and t
        g = torch.Generator().manual_seed(seed)
        for i, s in enumerate(samples):
            target = s.target[None].to(dev)
            frames = model.condition_frames(s)  # as generation picks them (stage.frame_select)
            cond = None if frames is None else frames.to(dev)
            states, mask = conds[i]
            other_states, other_mask = conds[(i + 1) % len(conds)]
            for tv in ts:
                noise = torch.randn(target.shape, generator=g).to(dev)
                t = torch.full((1,), float(tv), device=dev)
                x_t = add_noise(target, noise, t)[0]
                parts = {"true": (states, mask), "zero": (torch.zeros_like(states), mask), "shuffled": (other_states, other_mask)}
                if refs[i] is not None:
                    parts["reference"] = refs[i]
                    parts["reference_zero"] = (torch.zeros_like(refs[i][0]), refs[i][1])
                    real = refs[i][0][:, refs[i][1][0].bool()]  # its real tokens alone: the generator pads them (text_length) or not
                    parts["reference_real"] = (real, torch.ones(real.shape[:2], dtype=torch.long, device=real.device))
                if oracles[i] is not None:
                    parts["oracle"] = (oracles[i], mask)
                targets.append((target[0], noise[0]))
                for name, (st, mk) in parts.items():
                    rows.append(DiTRow(x_t, t[0], cond, st[0].to(gen.dtype), None if mk is None else mk[0]))
                    keys.append((f"loss_{name}@{tv:g}", len(targets) - 1))
        sums: dict[str, float] = {}
        for start in range(0, len(rows), rows_per_pass):  # each pass's losses at once: no velocity outlives its pass
            velocities = gen.batched_velocity(rows[start : start + rows_per_pass], batch=batch)[0]
            for (key, j), v in zip(keys[start : start + rows_per_pass], velocities):
                target, noise = targets[j]
                loss = float(nn.functional.mse_loss(v.float(), target_velocity(target, noise).float()))
                sums[key] = sums.get(key, 0.0) + loss
        n_ref, n_oracle = sum(r is not None for r in refs), sum(o is not None for o in oracles)
        out = {k: v / (n_ref if k.startswith("loss_reference") else n_oracle if k.startswith("loss_oracle") else len(samples))
               for k, v in sums.items()}
        for tv in ts:
            z, tr, sh = out[f"loss_zero@{tv:g}"], out[f"loss_true@{tv:g}"], out[f"loss_shuffled@{tv:g}"]
            out[f"gain@{tv:g}"] = (z - tr) / z if z > 0 else 0.0
            out[f"shuffle_gain@{tv:g}"] = (sh - tr) / sh if sh > 0 else 0.0
            if f"loss_reference@{tv:g}" in out:
                rz, r = out[f"loss_reference_zero@{tv:g}"], out[f"loss_reference@{tv:g}"]
                out[f"reference_gain@{tv:g}"] = (rz - r) / rz if rz > 0 else 0.0
                out[f"reference_real_gain@{tv:g}"] = (rz - out[f"loss_reference_real@{tv:g}"]) / rz if rz > 0 else 0.0
            if f"loss_oracle@{tv:g}" in out and n_oracle == len(samples):
                out[f"oracle_gain@{tv:g}"] = (z - out[f"loss_oracle@{tv:g}"]) / z if z > 0 else 0.0
        out["gain"] = sum(out[f"gain@{tv:g}"] for tv in ts) / len(ts)
        out["samples"] = len(samples)
        return out
    finally:
        model.connector.train(was[0])
        gen.transformer.train(was[1])


def _oracle(model, sample, ref, states: torch.Tensor) -> torch.Tensor | None:
    """The teacher's states laid on the sample's context tokens [1, L, D] (None: not a per-token connector or no ids)."""
    from fusion.errors import ConfigError

    try:
        target, _ = model.aligned_teacher(sample, ref[0], ref[1], states.shape[1])
    except ConfigError:
        return None
    return target[None].to(states.device)


#: below this own-encoder gain the ratio of the fused model's gain to it says nothing (a DiT that reads
#: no text at some t gives 0 / 0): it is reported as None, "undefined"
RATIO_FLOOR = 0.05


def gain_ratios(g: dict[str, float], ts: Sequence[float] = (0.7, 0.9), floor: float = RATIO_FLOOR) -> dict[str, float | None]:
    """Headline figures at each ``t`` of ``ts``: ``gain@t``, ``reference_gain@t`` (the DiT reading its own
    encoder) and ``gain_ratio@t`` = their ratio, None where the reference gain is under ``floor``."""
    out: dict[str, float | None] = {}
    for t in ts:
        if f"gain@{t:g}" not in g:
            continue
        out[f"gain@{t:g}"] = g[f"gain@{t:g}"]
        if f"reference_gain@{t:g}" in g:
            ref = out[f"reference_gain@{t:g}"] = g[f"reference_gain@{t:g}"]
            out[f"gain_ratio@{t:g}"] = g[f"gain@{t:g}"] / ref if ref >= floor else None
    return out


def gain_warning(g: dict[str, float], threshold: float, default_t: float = 0.7) -> str | None:
    """Stage 2's warning when the DiT is not using the connector's states: the gain at the ``t`` where
    the DiT's own encoder gains most (``default_t`` without a reference; a DiT trained mostly at high
    t may need no text at 0.7, its own encoder included) is under ``threshold``. None: no warning."""
    refs = {float(k.split("@")[1]): v for k, v in g.items() if k.startswith("reference_gain@")}
    t = max(refs, key=refs.get) if refs else default_t
    value = g.get(f"gain@{t:g}")
    if value is None or value >= threshold:
        return None
    own = f" (the DiT's own text encoder: {refs[t]:.3f})" if refs else ""
    return (f"conditioning gain at t={t:g} is {value:.3f}{own}, under stage.gain_warn={threshold:g}: the DiT is not using the "
            "connector's states; the falling loss is the DiT learning the average image (see README, 'Is stage 2 working?')")


def erosion_warning(history: Sequence[dict[str, float]], now: dict[str, float], threshold: float) -> str | None:
    """Stage 2's warning when the DiT's own conditioning is eroding: at some ``t`` its own-encoder gain
    (``reference_gain@t``) in ``now`` is more than ``threshold`` (a share) under the highest value ``history``
    (the run's earlier measurements, each with its ``step``) holds for that ``t``; the ``t`` with the largest
    fall is named. The highest, not the first: before its learned frame head picks frames, the DiT's own gain
    at step 0 reads lower (toy demo: 0.365 at t=0.7 at step 0, 0.736 from step 500 on). The fused gain may
    still rise meanwhile, and its ratio to the own-encoder gain then flatters the connector: the yardstick
    itself is shrinking. None: no warning (``threshold`` 0, no reference, or no own gain of at least
    :data:`RATIO_FLOOR` to fall from)."""
    if not threshold:
        return None
    worst = None
    for key, value in now.items():
        if not key.startswith("reference_gain@"):
            continue
        earlier = [(h[key], int(h.get("step", 0))) for h in history if key in h]
        if not earlier:
            continue
        peak, step = max(earlier, key=lambda e: e[0])  # (the first step at the highest value)
        if peak < RATIO_FLOOR or value >= peak * (1 - threshold):
            continue
        fall = (peak - value) / peak
        if worst is None or fall > worst[0]:
            worst = (fall, key.split("@")[1], peak, step, value)
    if worst is None:
        return None
    fall, t, peak, step, value = worst
    return (f"the DiT's own-encoder gain at t={t} fell from {peak:.3f} (step {step}) to {value:.3f} ({-fall:+.0%}), past "
            f"stage.erosion_warn={threshold:g}: stage 2 is wearing away the DiT's own conditioning, and the gain ratio "
            "(fused / own) flatters the connector; lower stage.lr_scale.generator, freeze the DiT longer "
            "(stage.generator_frozen_steps) or throughout (stage.trainable.generator=frozen)")


def summary_line(g: dict[str, float], ts: Sequence[float] = DEFAULT_TS) -> str:
    """``gain t=0.3/0.5/0.7/0.9: a/b/c/d (shuffled ..., reference ...)`` for logs."""
    fmt = lambda key: "/".join(f"{g[f'{key}@{t:g}']:.3f}" for t in ts)  # noqa: E731
    line = f"conditioning gain at t={'/'.join(f'{t:g}' for t in ts)}: {fmt('gain')} (vs shuffled states {fmt('shuffle_gain')}"
    if f"reference_gain@{ts[0]:g}" in g:
        line += f"; the DiT's own text encoder {fmt('reference_gain')}"
        if f"reference_real_gain@{ts[0]:g}" in g:
            line += f", its real tokens alone {fmt('reference_real_gain')}"
    if f"oracle_gain@{ts[0]:g}" in g:
        line += f"; its states laid on the context {fmt('oracle_gain')}"
    return line + f"; {g['samples']} samples)"
