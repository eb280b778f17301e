"""Aspect-ratio buckets for stage 2 (``data.buckets``) and for drawing (``height=`` / ``width=``).

Real data and every published DiT here use several aspect ratios, so a stage-2 target is not
squashed into one square: each conversation goes to the bucket (an ``H x W`` size) whose aspect
is nearest its last assistant image's, and *all* its images (the target, whichever one
``stage.target_image`` picks, and every condition frame) are resized to cover the bucket and
centre-cropped to it (:func:`fit`). Micro-batches are built within one bucket
(:class:`BucketBatchSampler`), so the DiT still runs one pass per shape.

``data.buckets``:

* ``null`` (default): one square bucket of ``stage.image_size`` (else ``generator.image_size``);
* a list of sizes, ``["64x64", "48x80", "80x48"]`` (``HxW``, multiples of the generator's
  :attr:`~backbones.generator.base.FlowGenerator.size_unit`);
* ``generator``: the family's published sizes (``published_buckets`` on the adapter: SANA's
  1024 aspect-ratio bins, Wan2.1's 480p sizes, Cosmos-Predict2.5's 16:9) scaled to the area of
  the configured square size and rounded to the size unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from fusion.errors import ConfigError

Bucket = tuple[int, int]  # (height, width) in pixels


def parse_size(text: Any, key: str = "data.buckets") -> Bucket:
    """``"48x80"`` or ``[48, 80]`` -> (48, 80)."""
    try:
        if isinstance(text, str):
            h, w = (int(v) for v in text.lower().split("x"))
        else:
            h, w = (int(v) for v in text)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {text!r} is not a size; write HxW, e.g. 48x80") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"{key}: {text!r} must be positive")
    return h, w


def resolve(spec: Any, generator: Any, side: int) -> list[Bucket]:
    """The buckets of a run: ``data.buckets`` checked against the generator (see the module docstring)."""
    unit = generator.size_unit
    if spec is None:
        buckets = [(side, side)]
    elif isinstance(spec, str) and spec == "generator":
        published = getattr(generator, "published_buckets", None)
        if not published:
            raise ConfigError(f"data.buckets=generator: {type(generator).__name__} has no published sizes; list them (data.buckets=[HxW,...])")
        buckets = scale(published, side, unit)
    elif isinstance(spec, str):
        raise ConfigError(f"data.buckets must be null, 'generator' or a list of HxW sizes, got {spec!r}")
    else:
        buckets = [parse_size(b) for b in spec]
        if not buckets:
            raise ConfigError("data.buckets is an empty list (null: one square bucket)")
    bad = [f"{h}x{w}" for h, w in buckets if h % unit or w % unit]
    if bad:
        raise ConfigError(f"data.buckets: {', '.join(bad)} not multiples of {unit} pixels ({type(generator).__name__}'s latent cell x patch)")
    return list(dict.fromkeys(buckets))


def scale(published: Sequence[Bucket], side: int, unit: int) -> list[Bucket]:
    """Published sizes rescaled to the area of ``side x side`` (aspects kept), rounded to multiples of ``unit``."""
    out = []
    for h, w in published:
        k = side / math.sqrt(h * w)
        out.append((max(unit, round(h * k / unit) * unit), max(unit, round(w * k / unit) * unit)))
    return list(dict.fromkeys(out))


def nearest(buckets: Sequence[Bucket], height: int, width: int) -> Bucket:
    """The bucket whose aspect (in log space, so 2:1 and 1:2 are as far from 1:1) is nearest ``width / height``."""
    a = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - a))


def fit(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize to cover the bucket (aspect kept), then centre-crop to it exactly."""
    h, w = bucket
    k = max(h / image.height, w / image.width)
    rh, rw = max(h, round(image.height * k)), max(w, round(image.width * k))
    im = image.convert("RGB")
    if (rh, rw) != (im.height, im.width):
        im = im.resize((rw, rh), Image.BICUBIC)
    top, left = (rh - h) // 2, (rw - w) // 2
    return im.crop((left, top, left + w, top + h))


def image_size(ref: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an image file (its header only: nothing is decoded)."""
    if isinstance(ref, Image.Image):
        return ref.height, ref.width
    with Image.open(ref) as im:
        return im.height, im.width


class BucketBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of one bucket each: per epoch a permutation from (seed, epoch), cut into batches
    within each bucket, the batches shuffled across buckets with the same generator, then sharded by
    rank. ``start`` (samples of this rank's epoch already consumed, as :class:`fusion.train.SeededSampler`)
    resumes exactly: the batches already run are skipped whole."""

    def __init__(self, buckets_of: Sequence[int], batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.buckets_of, self.batch_size = list(buckets_of), batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.epoch, self.start = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.buckets_of), generator=g).tolist()
        by_bucket: dict[int, list[int]] = {}
        for i in perm:
            by_bucket.setdefault(self.buckets_of[i], []).append(i)
        out = [idx[k : k + self.batch_size] for _, idx in sorted(by_bucket.items()) for k in range(0, len(idx), self.batch_size)]
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[k] for k in order][self.rank :: self.world]

    def __iter__(self):
        done = 0
        for batch in self.batches(self.epoch):
            done += len(batch)
            if done > self.start:
                yield batch

    def __len__(self) -> int:
        done, n = 0, 0
        for batch in self.batches(self.epoch):
            done += len(batch)
            n += done > self.start
        return n
