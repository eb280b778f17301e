"""The stage-2 feature cache: same samples and same loss as the uncached path (contexts packed or one by one);
stale caches never read."""

from __future__ import annotations

import json

import pytest
import torch

from fusion import feature_cache as fc
from fusion.data import SkipReport, read_jsonl
from fusion.errors import DataError
from fusion.model import FusedModel
from tests.conftest import compose_config


def build_model(tiny_dir, *extra, family="qwen2_5_vl", connector="multilayer_concat"):
    from tests.conftest import MLLM_FAMILIES

    cfg = compose_config([f"tiny_dir={tiny_dir}", f"mllm={MLLM_FAMILIES[family][1]}", "stage=align", "generator=tiny_wan",
                          f"connector={connector}", "stage.p_drop_cond=0", *extra])
    torch.manual_seed(0)
    return FusedModel.build(cfg).eval(), cfg


@pytest.fixture(scope="module")
def convs(tiny_dir):
    return list(read_jsonl(tiny_dir / "demo_data" / "conversations.jsonl"))


@pytest.fixture(scope="module")
def cache(tiny_dir, convs, tmp_path_factory, mllm_family):
    model, _ = build_model(tiny_dir, family=mllm_family)
    root = tmp_path_factory.mktemp("cache")
    path = fc.build(model, convs, root, "k1", {"test": 1}, "error", SkipReport(), progress=False, shard_samples=3)
    return fc.FeatureCache(path)


@pytest.mark.parametrize("extra", [
    [],
    ["stage.target_image=random"],
    ["stage.include_bov=false"],
    ["stage.p_drop_text=1.0", "stage.text_dropout_form=duogen"],  # the DuoGen negative: a shorter slice of the same states
    ["stage.batching=none"],  # uncached contexts one forward each (default: packed into one row)
    ["stage.batching=none", "stage.p_drop_text=1.0", "stage.text_dropout_form=duogen"],
    ["stage.distill_steps=1", "stage.distill_target=aligned", "connector.refiner_layers=1"],  # reads the cached ids
    ["stage.frame_select=learned"],  # the frame head reads the cached states and finds the images in the cached ids
    # the connector's window after the last image: cut from the cached states as from the MLLM's (packed or one by one)
    ["stage.connector_span=since_image", "stage.distill_steps=1", "stage.distill_target=aligned", "connector.refiner_layers=1"],
    ["stage.connector_span=since_image", "stage.batching=none", "stage.frame_select=learned"],
])
def test_cached_and_uncached_give_the_same_loss(tiny_dir, convs, cache, extra, mllm_family):
    model, cfg = build_model(tiny_dir, *extra, family=mllm_family)
    if cfg.stage.distill_steps:
        from backbones.generator.text_encoder import TextEncoder

        model.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
    for seed in range(3):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        plain = [model.prepare_align_sample(c, g1) for c in convs]
        cached = [cache.sample(c, model.settings, g2) for c in convs]
        for p, c in zip(plain, cached):
            # latents: the cache encodes a conversation's images as one VAE batch (float noise ~3e-7 vs one at a time)
            assert torch.allclose(p.target, c.target, atol=1e-5) and p.neg_len == c.neg_len
            assert (p.cond is None) == (c.cond is None) and (p.cond is None or torch.allclose(p.cond, c.cond, atol=1e-5))
            assert c.ctx_hidden.shape[1] == len(p.ctx_ids) and torch.equal(c.ctx_ids, p.ctx_ids)  # the ids (aligned distillation)
        with torch.no_grad():
            a = model.align_loss(plain, torch.Generator().manual_seed(10 + seed))
            b = model.align_loss(cached, torch.Generator().manual_seed(10 + seed))
        assert torch.allclose(a["loss"], b["loss"], atol=1e-5, rtol=1e-5), (extra, a, b)


@pytest.mark.parametrize("connector,extra", [
    ("queries", []),
    ("multiscale_queries", ["stage.p_drop_text=1.0", "stage.text_dropout_form=duogen"]),  # the negative: a shorter prefix of the cache
    ("queries", ["stage.gradient_checkpointing=[mllm]"]),  # the frozen MLLM in train mode so that it checkpoints: its layers would drop a cache
])
def test_query_connectors_read_the_stored_prefix_with_the_same_loss_and_gradients(tiny_dir, convs, tmp_path, mllm_family, connector, extra):
    """Query connectors' cache (kind kv): each context's keys and values; a step runs only the queries after them."""
    model, cfg = build_model(tiny_dir, *extra, family=mllm_family, connector=connector)
    if cfg.stage.gradient_checkpointing:
        model.apply_trainable(cfg.stage)
        model.apply_memory_and_speed(cfg.stage)
        assert model.mllm.language_model.training  # the case where a checkpointed layer would drop the cache
    cache = fc.FeatureCache(fc.build(model, convs, tmp_path, "kv", {}, "error", SkipReport(), progress=False))
    assert cache.kind == "kv" and cache.manifest["kind"] == "kv"
    queries = [p for n, p in model.connector.named_parameters() if "quer" in n]
    assert queries
    for seed in range(2):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        plain = [model.prepare_align_sample(c, g1) for c in convs]
        cached = [cache.sample(c, model.settings, g2) for c in convs]
        for p, c in zip(plain, cached):
            assert c.ctx_hidden is None and c.ctx_kv[0].shape[3] == len(p.ctx_ids) == len(c.ctx_kv[1])
        grads = []
        for samples in (plain, cached):
            model.zero_grad()
            out = model.align_loss(samples, torch.Generator().manual_seed(10 + seed))
            out["loss"].backward()
            grads.append((out["loss"].detach(), [q.grad.clone() for q in queries]))
        (a, ga), (b, gb) = grads
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (connector, a, b)
        for x, y in zip(ga, gb):
            assert x.abs().sum() > 0 and torch.allclose(x, y, atol=1e-5, rtol=1e-3), (connector, (x - y).abs().max())


def test_cache_is_sharded_and_complete(cache, convs):
    assert len(cache) == len(convs) and len(cache.manifest["shards"]) == 2  # 4 conversations, 3 per shard
    assert cache.manifest["layers"] and cache.manifest["dtype"] == "float32"
    hidden, latents = cache.tensors(convs[-1].line)
    assert hidden.ndim == 3 and latents.ndim == 4
    assert not [p for p in cache.root.parent.iterdir() if p.name.startswith(".partial")]


def test_text_only_conversation_is_no_target(cache, convs, tiny_dir):
    model, _ = build_model(tiny_dir)
    e = cache.entries[convs[0].line]
    e_saved = dict(e)
    e["targets"] = []
    try:
        with pytest.raises(DataError) as ei:
            cache.sample(convs[0], model.settings)
        assert ei.value.kind == "no_target"
    finally:
        e.update(e_saved)


def test_key_changes_with_every_input(tiny_dir, convs, tmp_path):
    data = tiny_dir / "demo_data" / "conversations.jsonl"
    base = {"mllm": fc.folder_fingerprint(tiny_dir / "qwen2_5_vl"), "layers": [4], "image_size": 64,
            "vae": fc.folder_fingerprint(tiny_dir / "wan" / "vae"), "data": fc.data_fingerprint(data, convs)}
    assert fc.cache_key(base) == fc.cache_key(dict(base))
    for k, v in (("layers", [2, 4]), ("image_size", 32), ("mllm", fc.folder_fingerprint(tiny_dir / "wan"))):
        assert fc.cache_key({**base, k: v}) != fc.cache_key(base)
    copy = tmp_path / "data.jsonl"
    copy.write_text(data.read_text() + "\n")
    assert fc.data_fingerprint(copy, convs) != base["data"]


def test_explain_miss_names_what_changed(tmp_path):
    old = {"data_path": "/d.jsonl", "mllm": "a", "layers": [1], "data": "x"}
    (tmp_path / "k0").mkdir()
    (tmp_path / "k0" / fc.MANIFEST).write_text(json.dumps({"parts": old}))
    why = fc.explain_miss(tmp_path, {**old, "mllm": "b"})
    assert "k0" in why and "mllm changed" in why and "data" not in why.split("stale:")[1]
    assert fc.explain_miss(tmp_path, {**old, "data_path": "/other.jsonl"}) == "no cache of this data file"


def test_bad_image_during_build_stops_or_is_skipped(tiny_dir, tmp_path):
    """A corrupt image found while building: 'error' stops naming file and line, leaving no cache;
    'skip' records it, and the trainer sees the same DataError kind for that line."""
    import shutil

    demo = tiny_dir / "demo_data"
    shutil.copytree(demo, tmp_path / "data")
    data = tmp_path / "data" / "conversations.jsonl"
    lines = data.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["messages"][0]["content"][0]["image"] = "broken.png"  # a user image no other line uses
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    data.write_text("\n".join([lines[0], json.dumps(bad), *lines[1:]]) + "\n")
    convs = list(read_jsonl(data))
    model, _ = build_model(tiny_dir)
    with pytest.raises(DataError) as ei:
        fc.build(model, convs, tmp_path / "c", "k", {}, "error", SkipReport(), progress=False)
    assert ei.value.line == 2 and ei.value.kind == "bad_image" and "conversations.jsonl:2" in str(ei.value)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    report = SkipReport()
    cache = fc.FeatureCache(fc.build(model, convs, tmp_path / "c", "k", {}, "skip", report, progress=False))
    assert report.counts == {"bad_image": 1} and len(cache) == len(convs) - 1
    with pytest.raises(DataError) as ei:
        cache.entry(convs[1])
    assert ei.value.kind == "bad_image" and ei.value.line == 2


def test_the_mllm_stand_in_knows_where_images_start_and_end(tiny_dir, mllm, mllm_family):
    """stage.frame_select=learned finds the cached contexts' images without loading the MLLM."""
    folder = fc.MLLMFolder(tiny_dir / mllm_family)
    assert (folder.vision_start_id, folder.vision_end_id) == (mllm.vision_start_id, mllm.vision_end_id)
