"""connector=resampler (learnable queries cross-attending to the context) and out_norm=rms_gated."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException

from connectors.common import OutputNorm
from connectors.resampler import Resampler
from fusion.config import validate
from fusion.data import read_jsonl
from fusion.errors import ConfigError
from fusion.model import FusedModel
from tests.conftest import compose_config

D, TEXT = 32, 24


def make(layers=None, **kw):
    torch.manual_seed(0)
    return Resampler(D, TEXT, num_mllm_layers=4, layers=layers, num_queries=8, heads=4, **kw).eval()


@pytest.mark.parametrize("layers", [None, [1, 2, -1]])
def test_output_shapes_for_one_and_three_layers(layers):
    r = make(layers)
    n = len(layers) if layers else 1
    assert r.layers == (layers or [-1]) and r.num_queries == 8 and not r.uses_queries
    for length in (5, 13):  # always num_queries tokens, whatever the context length
        out = r(torch.randn(2, n, length, D), torch.ones(2, length, dtype=torch.long))
        assert out.states.shape == (2, 8, TEXT)
        assert out.mask.shape == (2, 8) and out.mask.dtype == torch.long and bool(out.mask.all())
    with pytest.raises(ValueError, match="expects 3 MLLM layers"):
        make([1, 2, -1])(torch.randn(1, 1, 5, D), torch.ones(1, 5, dtype=torch.long))


def test_working_width_and_heads():
    r = make([1, -1], width=16, depth=1)
    assert r.queries.shape == (8, 16) and r.ctx_proj.in_features == 2 * D
    assert isinstance(make().ctx_proj, torch.nn.Identity)  # one layer at the MLLM width: no projection
    with pytest.raises(ValueError, match=r"connector.heads=3 must divide the working width 32"):
        Resampler(D, TEXT, 4, heads=3)


@pytest.mark.parametrize("layers", [None, [1, 2, -1]])
def test_the_context_mask_is_respected(layers):
    r = make(layers)
    n = len(layers) if layers else 1
    hidden = torch.randn(2, n, 10, D)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 6:] = 0  # sample 0: the last 4 tokens are padding
    mask[1, :3] = 0  # sample 1: the first 3
    with torch.no_grad():
        ref = r(hidden, mask).states
        changed = hidden.clone()
        changed[0, :, 6:] = 100 * torch.randn_like(changed[0, :, 6:])
        changed[1, :, :3] = 100 * torch.randn_like(changed[1, :, :3])
        torch.testing.assert_close(r(changed, mask).states, ref, atol=1e-6, rtol=1e-6)
        kept = hidden.clone()
        kept[0, :, 2] += 3 * torch.randn_like(kept[0, :, 2])  # a kept position of sample 0
        out = r(kept, mask).states
    assert (out[0] - ref[0]).abs().max() > 1e-3
    torch.testing.assert_close(out[1], ref[1])  # samples do not mix
    with torch.no_grad():  # padding is not attended to: same as the unpadded context
        alone = r(hidden[:1, :, :6], torch.ones(1, 6, dtype=torch.long)).states
    torch.testing.assert_close(alone, ref[:1], atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # a context with no kept token: finite, and its content does not matter
        none = torch.zeros(1, 10, dtype=torch.long)
        a, b = r(hidden[:1], none).states, r(changed[:1], none).states
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_gradients_reach_the_queries_and_every_parameter():
    r = make([1, -1]).train()
    out = r(torch.randn(2, 2, 7, D), torch.ones(2, 7, dtype=torch.long))
    out.states.square().mean().backward()
    assert r.queries.grad is not None and r.queries.grad.abs().sum() > 0
    missing = [name for name, p in r.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_rms_gated_can_say_nothing_or_give_unit_rms_tokens():
    norm = OutputNorm(TEXT, "rms_gated")
    assert torch.equal(norm.gate.bias, torch.full((1,), 2.0)) and not norm.gate.weight.any()  # starts open-ish
    x = 5 * torch.randn(3, 4, TEXT)
    with torch.no_grad():
        norm.gate.bias.fill_(-30.0)
        assert norm(x).abs().max() < 1e-9  # ~ the zero padding published DiTs saw
        norm.gate.bias.fill_(30.0)
        rms = norm(x).square().mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)
    # the gate is per token, from the token before the norm
    with torch.no_grad():
        norm.gate.bias.zero_()
        norm.gate.weight.zero_()
        norm.gate.weight[0, 0] = 100.0
        x = torch.randn(2, TEXT)
        x[0, 0], x[1, 0] = 1.0, -1.0
        y = norm(x)
    assert y[0].square().mean().sqrt() > 0.99 and y[1].abs().max() < 1e-9
    with pytest.raises(ValueError, match="rms, rms_gated, none"):
        OutputNorm(TEXT, "gated")


def test_every_connector_accepts_rms_gated():
    cfg = compose_config(["connector=last_mlp", "connector.out_norm=rms_gated"])
    validate(cfg)
    with pytest.raises(ConfigError, match=r"connector.out_norm must be rms, rms_gated or none, got 'gate'"):
        validate(compose_config(["connector=resampler", "connector.out_norm=gate"]))
    validate(compose_config(["connector=multilayer_concat", "connector.refiner_layers=2", "connector.refiner_width=128"]))
    with pytest.raises(ConfigError, match=r"connector.refiner_width must be a positive multiple of connector.refiner_heads=4, got 130"):
        validate(compose_config(["connector=multilayer_concat", "connector.refiner_layers=2", "connector.refiner_width=130"]))


def test_the_yaml_composes_and_typos_name_the_key():
    cfg = compose_config(["connector=resampler"])
    validate(cfg)
    c = cfg.connector
    assert c._target_ == "connectors.resampler.Resampler" and c.num_queries == 32 and c.depth == 2
    assert c.out_norm == "rms_gated" and c.layers is None and c.width is None
    with pytest.raises(ConfigCompositionException) as ei:
        compose_config(["connector=resampler", "connector.num_querys=8"])
    assert "num_querys" in str(ei.value.__cause__ or ei.value)


@pytest.mark.parametrize("overrides, message", [
    (["connector.num_queries=0"], "connector.num_queries must be positive"),
    (["connector.depth=0"], "connector.depth must be positive"),
    (["connector.width=30", "connector.heads=4"], r"connector.heads=4 must divide connector.width=30"),
    (["connector.layers=[]"], "connector.layers must name at least one"),
])
def test_impossible_values_fail_validation_naming_the_key(overrides, message):
    cfg = compose_config(["connector=resampler", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def build(tiny_dir, extra=()):
    cfg = compose_config([f"tiny_dir={tiny_dir}", "stage=align", "generator=tiny_wan", "connector=resampler",
                          "stage.p_drop_text=0", "stage.p_drop_cond=0", *extra])
    return FusedModel.build(cfg), cfg


def test_fused_model_builds_and_stage2_trains_the_connector(tiny_dir):
    convs = list(read_jsonl(tiny_dir / "demo_data" / "conversations.jsonl"))
    torch.manual_seed(0)
    model, cfg = build(tiny_dir, ["connector.layers=[1,-1]", "connector.num_queries=8"])
    assert type(model.connector) is Resampler and model.connector.num_queries == 8
    assert model.mllm.hidden_layers == [1, model.mllm.num_layers]  # the layers it reads, resolved
    model.apply_trainable(cfg.stage)
    samples = [model.prepare_align_sample(c) for c in convs[:2]]
    states, mask, query_hidden = model.context_states(samples[1].ctx_ids, samples[1].ctx_pixel_values, samples[1].ctx_grids)
    assert query_hidden is None and states.shape == (1, 8, model.generator.text_dim) and bool(mask.all())
    out = model.align_loss(samples, torch.Generator().manual_seed(0))
    out["loss"].backward()
    conn = model.connector
    assert conn.queries.grad is not None and conn.queries.grad.abs().sum() > 0
    assert conn.norm.gate.weight.grad is not None and conn.norm.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.mllm.parameters())  # the MLLM runs frozen, without a graph


def test_a_width_that_heads_cannot_split_fails_at_build(tiny_dir):
    with pytest.raises(ConfigError, match=r"connector=Resampler: connector.heads=3 must divide the working width 64"):
        build(tiny_dir, ["connector.heads=3"])


def test_window_positions_count_from_both_ends_of_the_kept_tokens():
    from connectors.resampler import POSITION_FREQS, window_positions

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    f = window_positions(mask)
    assert f.shape == (2, 5, 4 * POSITION_FREQS)
    # sample 0's window (tokens 2-4) counts 0, 1, 2 from its start and 2, 1, 0 from its end, like tokens 0-2 of a
    # three-token context: the features depend on the place in the window, not in the padded row
    three = window_positions(torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(f[0, 2:], three[0])
    assert not torch.allclose(f[1, 2:], three[0])  # the same tokens in a longer window sit elsewhere in it
    assert torch.equal(f[0, 2, :POSITION_FREQS], torch.zeros(POSITION_FREQS))  # sin(0): the first kept token


def test_positions_let_the_queries_tell_the_order_of_the_context():
    hidden = torch.randn(1, 1, 9, D)
    mask = torch.ones(1, 9, dtype=torch.long)
    perm = torch.randperm(9)
    blind = make(positions="none")
    with torch.no_grad():  # content alone: cross-attention reads the context as a set
        torch.testing.assert_close(blind(hidden[:, :, perm], mask).states, blind(hidden, mask).states, atol=1e-5, rtol=1e-5)
    seeing = make(positions="window")
    with torch.no_grad():
        torch.testing.assert_close(seeing(hidden, mask).states, blind(hidden, mask).states)  # zero-initialised: starts blind
        seeing.pos_proj.weight.normal_(0, 0.5)
        a, b = seeing(hidden, mask).states, seeing(hidden[:, :, perm], mask).states
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="connector.positions must be none or window"):
        make(positions="rope")
    with pytest.raises(ConfigError, match=r"connector.positions must be none or window, got 'abs'"):
        validate(compose_config(["connector=resampler", "connector.positions=abs"]))
