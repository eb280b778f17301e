"""Aspect-ratio buckets (data.buckets): sizes, nearest bucket, fit; stage-2 samples and micro-batches within one bucket on
a data set with three aspect ratios, on each tiny generator, from the feature cache or not; exact resume of the sampler."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from fusion import buckets as B
from fusion.data import SkipReport, read_jsonl
from fusion.errors import ConfigError
from fusion.model import FusedModel
from tests.conftest import compose_config

SIZES = {"square": (64, 64), "wide": (64, 96), "tall": (96, 64)}  # (height, width) of the data set's images
BUCKETS = ["64x64", "64x96", "96x64"]


def write_ragged_data(d):
    """Twelve conversations in ``d``: text-to-image and edits (one condition frame), images of three aspect ratios
    (slightly off each bucket's, so every image is resized and centre-cropped). Returns the JSONL path."""
    from fusion.demo_data import draw_scene

    off = {"square": (70, 66), "wide": (60, 100), "tall": (100, 62)}
    lines = []
    for i in range(12):
        kind = list(SIZES)[i % 3]
        h, w = off[kind]
        src, dst = d / f"src{i}.png", d / f"dst{i}.png"
        draw_scene([("circle", "red", 1, i % 3)]).resize((w, h)).save(src)
        draw_scene([("square", "blue", 2, i % 3)]).resize((w, h)).save(dst)
        user = [{"type": "text", "text": f"Draw scene {i}."}]
        if i % 2:  # an edit: the user's image is a condition frame of the target
            user = [{"type": "image", "image": src.name}, {"type": "text", "text": f"Change scene {i}."}]
        lines.append({"messages": [{"role": "user", "content": user},
                                   {"role": "assistant", "content": [{"type": "text", "text": "Here."}, {"type": "image", "image": dst.name}]}]})
    path = d / "ragged.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def ragged_data(tmp_path_factory):
    return write_ragged_data(tmp_path_factory.mktemp("ragged"))


def build(tiny_dir, generator, data_path, *extra):
    cfg = compose_config([f"tiny_dir={tiny_dir}", "stage=align", f"generator={generator}", "connector=last_mlp", "data=jsonl",
                          f"data.path={data_path}", f"data.buckets=[{','.join(BUCKETS)}]", "stage.p_drop_cond=0", *extra])
    torch.manual_seed(0)
    return FusedModel.build(cfg), cfg


def test_sizes_nearest_bucket_and_fit(tiny_dir):
    from hydra.utils import instantiate

    gen = instantiate(compose_config([f"tiny_dir={tiny_dir}", "generator=tiny_sana"]).generator)
    unit = gen.size_unit
    assert B.resolve(None, gen, 64) == [(64, 64)]
    assert B.resolve(["64x64", [32, 96], "64x64"], gen, 64) == [(64, 64), (32, 96)]  # duplicates dropped, order kept
    with pytest.raises(ConfigError, match="not multiples"):
        B.resolve([f"{unit + 1}x{unit}"], gen, 64)
    with pytest.raises(ConfigError, match="not a size"):
        B.resolve(["wide"], gen, 64)
    published = B.resolve("generator", gen, 64)  # SANA's 1024 bins scaled to 64x64's area
    assert len(published) > 5 and all(h % unit == 0 and w % unit == 0 for h, w in published)
    assert (64, 64) in published and max(w / h for h, w in published) >= 3
    buckets = [(64, 64), (64, 96), (96, 64)]
    assert B.nearest(buckets, 60, 100) == (64, 96) and B.nearest(buckets, 100, 62) == (96, 64) and B.nearest(buckets, 70, 66) == (64, 64)
    im = Image.new("RGB", (100, 60))
    im.paste((255, 0, 0), (0, 0, 2, 60))  # a red band at the far left: cropped away by the centre crop (5 px of 107 each side)
    out = B.fit(im, (64, 96))
    assert out.size == (96, 64) and out.getpixel((0, 32)) == (0, 0, 0)


@pytest.mark.parametrize("generator", ["tiny_wan", "tiny_cosmos", "tiny_sana"])
def test_three_aspect_ratios_train_within_their_buckets(tiny_dir, ragged_data, tmp_path, generator):
    from fusion import feature_cache as fc

    model, cfg = build(tiny_dir, generator, ragged_data)
    model.apply_trainable(cfg.stage)
    assert model.settings["buckets"] == [[64, 64], [64, 96], [96, 64]]
    convs = list(read_jsonl(ragged_data))
    f = model.generator.spatial_factor
    samples = [model.prepare_align_sample(c) for c in convs]
    for i, s in enumerate(samples):
        want = SIZES[list(SIZES)[i % 3]]
        assert s.bucket == want and tuple(s.target.shape[-2:]) == (want[0] // f, want[1] // f), (i, s.bucket)
        if i % 2:
            assert s.cond.shape[0] == 1 and s.cond.shape[-2:] == s.target.shape[-2:]
    cache = fc.FeatureCache(fc.build(model, convs, tmp_path, "k", {}, "error", SkipReport(), progress=False))
    cached = [cache.sample(c, model.settings) for c in convs]
    for a, b in zip(samples, cached):
        assert a.bucket == b.bucket and torch.allclose(a.target, b.target, atol=1e-4)

    # micro-batches of one bucket each: the DiT runs one pass per (bucket, condition frames)
    sampler = B.BucketBatchSampler([BUCKETS.index(f"{s.bucket[0]}x{s.bucket[1]}") for s in samples], 4, seed=0)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(convs)))
    assert all(len({samples[i].bucket for i in b}) == 1 for b in batches)
    sizes = []
    hook = model.generator.transformer.register_forward_hook(lambda m, a, kw, out: sizes.append(1), with_kwargs=True)
    out = model.align_loss([cached[i] for i in batches[0]], torch.Generator().manual_seed(0))
    hook.remove()
    out["loss"].backward()
    with_frames = {bool(i % 2) and model.generator.uses_condition_frames for i in batches[0]}  # SANA (mllm_only) reads none
    assert torch.isfinite(out["loss"]) and len(sizes) == len(with_frames)


def test_bucket_sampler_is_deterministic_shuffles_across_buckets_and_resumes_exactly():
    of = [i % 3 for i in range(30)]
    s = B.BucketBatchSampler(of, 4, seed=7)
    e0, e1 = s.batches(0), s.batches(1)
    assert e0 == B.BucketBatchSampler(of, 4, seed=7).batches(0) and e0 != e1
    assert all(len({of[i] for i in b}) == 1 for b in e0) and Counter(of[b[0]] for b in e0) == {0: 3, 1: 3, 2: 3}
    assert [of[b[0]] for b in e0] != sorted(of[b[0]] for b in e0)  # buckets interleaved, not one after another
    consumed = sum(len(b) for b in e0[:4])
    s.epoch, s.start = 0, consumed
    assert list(s) == e0[4:] and len(s) == len(e0) - 4
    ranks = [B.BucketBatchSampler(of, 4, seed=7, rank=r, world=2).batches(0) for r in range(2)]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(30))


def test_chat_draws_at_the_bucket_nearest_the_users_image(tiny_dir, ragged_data, tmp_path):
    from fusion.generate import Chat, ForceTokens, GenerationSettings

    model, _ = build(tiny_dir, "tiny_wan", ragged_data)
    model.eval()
    for name, want in (("wide", (64, 96)), ("tall", (96, 64))):
        chat = Chat(model, GenerationSettings(steps=2, max_new_tokens=4))
        chat.logits_processor = ForceTokens({0: chat.mllm.bov_token_id, 1: chat.mllm.end_of_turn_id})
        h, w = SIZES[name]
        segs = chat.send("Change it.", images=[Image.new("RGB", (w + 4, h - 2), (0, 200, 0))])
        drawn = [s.image for s in segs if s.kind == "image" and s.role == "assistant"]
        assert drawn and drawn[0].size == (want[1], want[0])
    chat = Chat(model, GenerationSettings(steps=2, max_new_tokens=4, height=64, width=64))  # explicit size wins
    chat.logits_processor = ForceTokens({0: chat.mllm.bov_token_id, 1: chat.mllm.end_of_turn_id})
    segs = chat.send("Change it.", images=[Image.new("RGB", (100, 60))])
    assert [s.image.size for s in segs if s.kind == "image" and s.role == "assistant"] == [(64, 64)]
