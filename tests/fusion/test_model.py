"""The fused model: each connector x each tiny generator, trainable sets, CFG dropout, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.data import parse_conversation, read_jsonl
from fusion.errors import ConfigError, DataError
from fusion.model import FusedModel
from tests.conftest import compose_config

CONNECTORS = ["last_mlp", "multilayer_concat", "layer_mix", "queries", "multiscale_queries", "resampler"]
GENERATORS = ["tiny_wan", "tiny_cosmos", "tiny_sana"]


def build(tiny_dir, connector="last_mlp", generator="tiny_wan", stage="align", extra=(), family="qwen2_5_vl"):
    from tests.conftest import MLLM_FAMILIES

    cfg = compose_config([f"tiny_dir={tiny_dir}", f"mllm={MLLM_FAMILIES[family][1]}", f"stage={stage}", f"generator={generator}",
                          f"connector={connector}", *extra])
    return FusedModel.build(cfg), cfg


@pytest.fixture(scope="module")
def convs(tiny_dir):
    return list(read_jsonl(tiny_dir / "demo_data" / "conversations.jsonl"))


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("connector", CONNECTORS)
def test_connector_x_generator_trains_a_step(tiny_dir, convs, connector, generator):
    torch.manual_seed(0)
    model, cfg = build(tiny_dir, connector, generator, extra=["stage.p_drop_text=0", "stage.p_drop_cond=0"])
    model.apply_trainable(cfg.stage)
    samples = [model.prepare_align_sample(c) for c in convs]  # lines 2-4 carry condition frames
    assert [0 if s.cond is None else s.cond.shape[0] for s in samples] == [0, 1, 1, 1]

    states, mask, _ = model.context_states(samples[1].ctx_ids, samples[1].ctx_pixel_values, samples[1].ctx_grids)
    expected_len = getattr(model.connector, "num_queries", None) or len(samples[1].ctx_ids)  # resampler: fixed, no MLLM queries
    assert states.shape == (1, expected_len, model.generator.text_dim)
    assert mask.shape == (1, expected_len) and mask.dtype == torch.long and bool(mask.all())

    opt = torch.optim.AdamW(model.param_groups(cfg.stage), lr=cfg.stage.lr)
    for group in opt.param_groups:
        group["lr"] = 3e-3

    def loss():
        return model.align_loss(samples, torch.Generator().manual_seed(1))  # same t and noise every call

    first = loss()
    if connector == "multiscale_queries":
        assert "align" in first and first["align"] > 0
    before = first["loss"].item()
    for _ in range(3):
        opt.zero_grad()
        out = loss()
        out["loss"].backward()
        opt.step()
    assert loss()["loss"].item() < before


def loss_and_grads(model, samples, seed=3):
    model.zero_grad(set_to_none=True)
    out = model.align_loss(samples, torch.Generator().manual_seed(seed))
    out["loss"].backward()
    return {k: float(v.detach()) for k, v in out.items()}, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("generator", GENERATORS)
def test_grouped_dit_passes_equal_the_per_sample_loop(tiny_dir, convs, tmp_path, generator):
    """stage.dit_batching=grouped (one DiT pass per shape) vs none (one per sample): the same losses and gradients, for
    per-token states of different lengths (DuoGen negatives shorter still), samples with and without condition frames,
    from the feature cache or not, with a query connector and its alignment loss, and with velocity distillation; with
    grouped a per-token connector (the recipe's: refiner, window, gated norm, since_image span, aligned distillation)
    reads every sample's states in one call."""
    from backbones.generator.text_encoder import TextEncoder
    from fusion import feature_cache as fc
    from fusion.data import SkipReport
    from fusion.distill import per_token

    drops = ["stage.p_drop_text=0.4", "stage.p_drop_cond=0.3", "stage.text_dropout_form=duogen"]
    cases = [("last_mlp", [], "plain"), ("last_mlp", [], "cache"), ("multiscale_queries", [], "plain")]
    if generator != "tiny_cosmos":  # the tiny Cosmos has no text encoder of its own (no distillation teacher)
        cases.append(("last_mlp", ["stage.distill_weight=0.5"], "plain"))
        cases.append(("multilayer_concat", ["stage.distill_weight=0.5", "stage.distill_target=aligned", "connector.refiner_layers=2",
                                            "connector.window=3", "connector.out_norm=rms_gated", "stage.connector_span=since_image"], "cache"))
    for connector, extra, source in cases:
        torch.manual_seed(0)
        negative = drops[:2] if "stage.connector_span=since_image" in extra else drops  # (since_image refuses duogen)
        model, cfg = build(tiny_dir, connector, generator, extra=[*negative, *extra])
        model.apply_trainable(cfg.stage)
        if cfg.stage.distill_weight:
            model.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
        if source == "cache":
            cache = fc.FeatureCache(fc.build(model, convs, tmp_path / connector, "k", {}, "error", SkipReport(), progress=False))
            samples = [cache.sample(c, model.settings) for c in convs * 2]
        else:
            samples = [model.prepare_align_sample(c) for c in convs * 2]
        results, widest = [], []
        hook = model.connector.register_forward_hook(lambda m, args, out: widest.append(len(out.states)))
        for mode in ("none", "grouped"):  # the same model and samples, the same draws (seeded), batched or not
            model.settings["dit_batching"] = mode
            widest.clear()
            results.append(loss_and_grads(model, samples))
            if per_token(model.connector):  # (query connectors: one call for every sample from the cache in either mode)
                assert max(widest) == (len(samples) if mode == "grouped" else 1), (connector, mode, widest)
        hook.remove()
        (la, ga), (lb, gb) = results
        case = f"{generator} {connector} {extra} {source}"
        assert la.keys() == lb.keys() and ga.keys() == gb.keys(), case
        assert 0 < la["drop_text"] < 8 and 0 < la["drop_cond"] < 8, case  # a mix: dropped and kept texts, with and without frames
        for k in la:
            assert math.isclose(la[k], lb[k], rel_tol=1e-5, abs_tol=1e-6), (case, k, la[k], lb[k])
        scale = max(g.abs().max() for g in ga.values())
        for k in ga:
            torch.testing.assert_close(gb[k], ga[k], atol=1e-5 * scale, rtol=1e-4, msg=f"{case}: {k}")


@pytest.mark.parametrize("connector", ["queries", "multiscale_queries"])
def test_query_connectors_train_only_their_own_embeddings_through_the_frozen_mllm(tiny_dir, convs, connector, mllm_family):
    model, cfg = build(tiny_dir, connector, "tiny_sana", extra=["stage.p_drop_text=0", "stage.p_drop_cond=0"], family=mllm_family)
    model.apply_trainable(cfg.stage)
    out = model.align_loss([model.prepare_align_sample(convs[1])], torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert all(p.grad is None for p in model.mllm.parameters())
    q = model.connector.queries if connector == "queries" else model.connector.queries[0]
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in model.mllm.parameters())


def names(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_trainable_set_align_full_and_lora(tiny_dir, convs):
    model, cfg = build(tiny_dir, "last_mlp", "tiny_wan")
    report = model.apply_trainable(cfg.stage)
    assert report["mllm"][0] == 0 and report["vision_tower"][0] == 0
    assert report["connector"][0] == report["connector"][1] > 0
    assert report["generator"][0] == report["generator"][1]
    assert not names(model.generator.vae) and not names(model.mllm)
    assert not model.mllm.model.training  # frozen MLLM in eval mode
    out = model.align_loss([model.prepare_align_sample(convs[0])], torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert all(p.grad is None for p in model.mllm.parameters())

    model, cfg = build(tiny_dir, "last_mlp", "tiny_wan", extra=["stage.trainable.generator=lora", "stage.lora_generator.r=4"])
    model.apply_trainable(cfg.stage)
    dit = names(model.generator.transformer)
    assert dit and all("lora_" in n for n in dit)
    assert any(n.endswith("to_q.lora_A.default.weight") for n in dit)


def test_trainable_set_sft_full_lora_and_vision(tiny_dir, convs, mllm_family):
    model, cfg = build(tiny_dir, "last_mlp", "tiny_wan", stage="sft", family=mllm_family)
    model.apply_trainable(cfg.stage)
    trained = names(model.mllm.model)
    assert trained and not any(n.startswith("model.visual.") for n in trained)
    assert "lm_head.weight" in trained
    assert not names(model.generator.transformer) and not names(model.connector)
    loss = model.sft_loss(convs[:2])["loss"]
    loss.backward()
    assert all(p.grad is None for p in model.generator.transformer.parameters())
    assert model.mllm.model.lm_head.weight.grad is not None

    model, cfg = build(tiny_dir, "last_mlp", "tiny_wan", stage="sft", extra=["stage.trainable.mllm=lora", "stage.trainable.vision_tower=true"],
                       family=mllm_family)
    model.apply_trainable(cfg.stage)
    trained = names(model.mllm.model)
    lm = {n for n in trained if n.startswith("model.language_model.")}
    assert lm and all("lora_" in n or n.endswith("embed_tokens.weight") for n in lm)  # embeddings: the <|bov|> rows
    assert any(n.startswith("model.visual.") for n in trained)


def test_lora_stage_1_trains_the_bov_rows_and_no_other_row(tiny_dir, convs, mllm_family):
    """LoRA reaches neither embedding: without their <|bov|> rows a LoRA stage 1 cannot learn to draw."""
    model, cfg = build(tiny_dir, "last_mlp", "tiny_wan", stage="sft", extra=["stage.trainable.mllm=lora", "stage.lr=0.01", "stage.weight_decay=0.1"],
                       family=mllm_family)
    report = model.apply_trainable(cfg.stage)
    hf, bov = model.mllm.model, model.mllm.bov_token_id
    weights = {id(w): w for w in (hf.get_input_embeddings().weight, hf.get_output_embeddings().weight)}
    lora = sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)
    assert report["mllm"][0] == lora + sum(w.shape[1] for w in weights.values())  # one row of each, not the whole matrices
    groups = {g["name"]: g for g in model.param_groups(cfg.stage)}
    assert groups["mllm_token_rows"]["weight_decay"] == 0.0 and groups["mllm"]["weight_decay"] == 0.1
    before = {k: w.detach().clone() for k, w in weights.items()}
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups.values()])
    loss = model.sft_loss(convs[:2])["loss"]  # convs[0] is a text-to-image request: <|bov|> is a label
    loss.backward()
    for w in weights.values():
        others = torch.ones(w.shape[0], dtype=torch.bool)
        others[bov] = False
        assert w.grad[bov].abs().sum() > 0 and not w.grad[others].any()
    opt.step()
    for k, w in weights.items():
        changed = (w.detach() != before[k]).any(dim=1).nonzero().flatten().tolist()
        assert changed == [bov]
    model, cfg = build(tiny_dir, "last_mlp", "tiny_wan", stage="sft", family=mllm_family)
    model.apply_trainable(cfg.stage)  # full: the whole matrices train, no row groups
    assert not model.token_rows and [g["name"] for g in model.param_groups(cfg.stage)] == ["mllm"]


def test_param_groups_have_per_part_learning_rates(tiny_dir):
    model, cfg = build(tiny_dir, "last_mlp", "tiny_wan", extra=["stage.lr=0.001", "+stage.lr_scale={connector: 10.0}"])
    model.apply_trainable(cfg.stage)
    groups = {g["name"]: g["lr"] for g in model.param_groups(cfg.stage)}
    assert groups == {"connector": pytest.approx(0.01), "generator": pytest.approx(0.001)}


def test_cfg_dropout_rates_match_config(tiny_dir):
    model, _ = build(tiny_dir, "last_mlp", "tiny_wan", extra=["stage.p_drop_text=0.3", "stage.p_drop_cond=0.6"])
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = torch.tensor([model.draw_dropout(g) for _ in range(n)], dtype=torch.float)
    for rate, p in zip(draws.mean(0).tolist(), (0.3, 0.6)):
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (rate, p)
    both = (draws[:, 0] * draws[:, 1]).mean().item()  # independent draws
    assert abs(both - 0.18) < 4 * math.sqrt(0.18 * 0.82 / n)


def test_duogen_negative_keeps_visual_context_and_drops_final_text(tiny_dir, convs):
    model, _ = build(tiny_dir, "last_mlp", "tiny_wan", extra=["stage.text_dropout_form=duogen"])
    s = model.prepare_align_sample(convs[1])  # user image, "Move the circle...", then the target
    ids = s.ctx_ids.tolist()
    assert ids[s.neg_len - 1] == model.mllm.token_id("<|vision_end|>")  # negative ends right after the last image
    assert ids[-1] == model.mllm.bov_token_id
    pos, mask, _ = model.context_states(s.ctx_ids, s.ctx_pixel_values, s.ctx_grids)
    neg, neg_mask = model.negative_states(s, pos, mask)
    assert neg.shape[1] == s.neg_len < pos.shape[1]
    first = model.prepare_align_sample(convs[0])  # no earlier image: the negative is null
    assert first.neg_len == 0
    zeros, _ = model.negative_states(first, pos, mask)
    assert torch.equal(zeros, torch.zeros_like(pos))


def test_include_bov_switch(tiny_dir, convs):
    with_bov, _ = build(tiny_dir, extra=["stage.include_bov=true"])
    without, _ = build(tiny_dir, extra=["stage.include_bov=false"])
    a, b = with_bov.prepare_align_sample(convs[0]), without.prepare_align_sample(convs[0])
    assert a.ctx_ids[-1] == with_bov.mllm.bov_token_id and len(b.ctx_ids) == len(a.ctx_ids) - 1


def test_align_sample_without_assistant_image_is_a_data_error(tiny_dir):
    model, _ = build(tiny_dir)
    conv = parse_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "d.jsonl", 4)
    with pytest.raises(DataError, match=r"d.jsonl:4: stage=align sample has no assistant image"):
        model.prepare_align_sample(conv)


def test_widths_that_cannot_fit_fail_before_training(tiny_dir):
    with pytest.raises(ConfigError, match="projection=identity needs text_dim"):
        build(tiny_dir, "multilayer_concat", "tiny_wan", extra=["connector.projection=identity"])
    with pytest.raises(ConfigError, match="connector.layers: layer 9 is out of range"):
        build(tiny_dir, "layer_mix", "tiny_wan", extra=["connector.layers=[1,9]"])
    with pytest.raises(ConfigError, match="encoder_heads=3 must divide"):
        build(tiny_dir, "queries", "tiny_wan", extra=["connector.encoder_heads=3"])
    # identity works when the generator's text width is the concatenation (Cosmos-Predict2.5 style)
    model, _ = build(tiny_dir, "multilayer_concat", "tiny_cosmos", extra=["connector.projection=identity", "generator.text_dim=256"])
    assert model.generator.text_dim == 4 * 64


@pytest.mark.parametrize("connector, generator, extra", [
    ("queries", "tiny_cosmos", []),
    ("multilayer_concat", "tiny_wan", ["stage.trainable.generator=lora"]),
    ("multilayer_concat", "tiny_wan", ["connector.window=3", "connector.refiner_layers=1", "connector.refiner_width=48"]),
    ("multiscale_queries", "tiny_sana", []),
    ("resampler", "tiny_wan", ["connector.layers=[1,-1]", "generator.text_length=64"]),  # padded: the length is saved
])
def test_save_load_gives_identical_outputs(tiny_dir, convs, tmp_path, connector, generator, extra, mllm_family):
    torch.manual_seed(0)
    model, cfg = build(tiny_dir, connector, generator, extra=["stage.p_drop_text=0", "stage.p_drop_cond=0", *extra], family=mllm_family)
    model.apply_trainable(cfg.stage)
    opt = torch.optim.AdamW(model.param_groups(cfg.stage), lr=1e-2)
    samples = [model.prepare_align_sample(c) for c in convs]
    model.align_loss(samples, torch.Generator().manual_seed(0))["loss"].backward()
    opt.step()  # the saved weights differ from the tiny checkpoints
    model.eval()
    out = model.save_pretrained(tmp_path / "fused", config=cfg)
    assert (out / "unifuse.json").is_file() and (out / "mllm" / "config.json").is_file()
    assert (out / "generator" / "transformer" / "config.json").is_file() and (out / "connector" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = FusedModel.from_pretrained(out)
    assert loaded.generator.text_length == model.generator.text_length  # the saved generator folder has no tokenizer/
    with torch.no_grad():
        ref = model.align_loss(samples, torch.Generator().manual_seed(5))
        got = loaded.align_loss([loaded.prepare_align_sample(c) for c in convs], torch.Generator().manual_seed(5))
    torch.testing.assert_close(got["loss"], ref["loss"], atol=1e-6, rtol=1e-6)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    if "stage.trainable.generator=lora" in extra:
        assert (out / "lora" / "generator" / "adapter_config.json").is_file()


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_dir, convs):
    """stage.gradient_checkpointing recomputes activations in backward: same loss, same gradients."""
    results = {}
    for parts in ([], ["mllm", "vision_tower"]):
        torch.manual_seed(0)
        model, cfg = build(tiny_dir, stage="sft", extra=[f"stage.gradient_checkpointing=[{','.join(parts)}]"])
        model.apply_trainable(cfg.stage)
        switched = model.apply_memory_and_speed(cfg.stage)
        assert len(switched) == len(parts)
        loss = model.sft_loss(convs[:2])["loss"]
        loss.backward()
        results[tuple(parts)] = (loss.detach(), model.mllm.model.lm_head.weight.grad.clone())
    (a, ga), (b, gb) = results.values()
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6)
    assert model.mllm.model.model.language_model.gradient_checkpointing

    # query connectors backpropagate through the frozen MLLM: it is checkpointed too, same loss and gradients
    results = []
    for parts in ([], ["mllm"]):
        torch.manual_seed(0)
        model, cfg = build(tiny_dir, connector="queries", extra=[f"stage.gradient_checkpointing=[{','.join(parts)}]",
                                                                 "stage.p_drop_text=0", "stage.p_drop_cond=0"])
        model.apply_trainable(cfg.stage)
        switched = model.apply_memory_and_speed(cfg.stage)
        lm = model.mllm.model.model.language_model
        assert (lm.training and lm.gradient_checkpointing) == bool(parts), switched
        loss = model.align_loss([model.prepare_align_sample(convs[1])], torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        results.append((loss.detach(), model.connector.queries.grad.clone()))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6) and ga.abs().sum() > 0

    model, cfg = build(tiny_dir, extra=["stage.gradient_checkpointing=[generator]"])
    model.apply_trainable(cfg.stage)
    assert model.apply_memory_and_speed(cfg.stage) == ["gradient checkpointing: generator"]
    assert model.generator.transformer.gradient_checkpointing
    model.align_loss([model.prepare_align_sample(convs[1])], torch.Generator().manual_seed(0))["loss"].backward()
