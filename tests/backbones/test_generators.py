"""Generator adapters (Wan, Cosmos, SANA) on tiny checkpoints of the real diffusers classes."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from backbones.generator.base import DiTRow, pad_text, reinitialised_keys
from fusion.errors import CheckpointError
from tests.conftest import compose_config

FAMILIES = ["tiny_wan", "tiny_cosmos", "tiny_sana", "tiny_sana_concat"]


def build(tiny_dir, name, **extra):
    overrides = [f"tiny_dir={tiny_dir}"]
    if name == "tiny_sana_concat":
        name, extra = "tiny_sana", {**extra, "condition_mode": "spatial_concat"}
    cfg = compose_config([f"generator={name}", *overrides, *[f"generator.{k}={v}" for k, v in extra.items()]])
    return instantiate(cfg.generator)


@pytest.fixture(scope="module", params=FAMILIES)
def gen(request, tiny_dir):
    torch.manual_seed(0)
    return build(tiny_dir, request.param).eval()


def inputs(gen, b=2, n_cond=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = 64 // gen.spatial_factor
    x = torch.randn(b, gen.latent_channels, h, h, generator=g)
    cond = torch.randn(b, n_cond, gen.latent_channels, h, h, generator=g)
    text = torch.randn(b, 5, gen.text_dim, generator=g)
    mask = torch.ones(b, 5, dtype=torch.long)
    mask[-1, 3:] = 0
    t = torch.tensor([0.3, 0.8])[:b]
    return x, cond, text, mask, t


def raw_forward(gen, x, cond, text, mask, t):
    """The diffusers transformer called the way its own pipeline calls it; returns the target's output."""
    tr = gen.transformer
    name = type(tr).__name__
    if name == "SanaTransformer2DModel":
        hs = x if not gen.uses_condition_frames else torch.cat([*cond.unbind(1), x], dim=-1)
        out = tr(hs, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask).sample
        return out[..., -x.shape[-1]:]
    frames = torch.cat([cond, x[:, None]], dim=1).permute(0, 2, 1, 3, 4)  # [B,C,F,h,w]
    b, _, f, h, w = frames.shape
    text = text * mask[..., None]  # Wan/Cosmos pipelines pad text with zeros, to their max_sequence_length
    if gen.text_length and text.shape[1] < gen.text_length:
        text = torch.cat([text, text.new_zeros(text.shape[0], gen.text_length - text.shape[1], text.shape[2])], dim=1)
    if name == "WanTransformer3DModel":  # pipeline_wan_i2v: first_frame_mask * t per patch token
        m = torch.ones(1, 1, f, h, w)
        m[:, :, : cond.shape[1]] = 0
        ts = torch.stack([(m[0][0][:, ::2, ::2] * ti * 1000).flatten() for ti in t])
        return tr(frames, ts, text).sample[:, :, -1]
    cmask = torch.zeros(b, 1, f, h, w)
    cmask[:, :, : cond.shape[1]] = 1
    ind = torch.zeros(1, 1, f, 1, 1)
    ind[:, :, : cond.shape[1]] = 1
    ts = ind * 1e-4 + (1 - ind) * t.view(b, 1, 1, 1, 1)  # pipeline_cosmos2_5_predict: cond_indicator timestep
    return tr(hidden_states=frames, timestep=ts, encoder_hidden_states=text, condition_mask=cmask,
              padding_mask=torch.zeros(1, 1, h, w)).sample[:, :, -1]


def test_velocity_equals_raw_diffusers_forward(gen):
    x, cond, text, mask, t = inputs(gen)
    with torch.no_grad():
        v = gen.velocity(x, t, cond, text, mask)
        ref = raw_forward(gen, x, cond if gen.uses_condition_frames else cond[:, :0], text, mask, t)
        v0 = gen.velocity(x, t, None, text, mask)
        ref0 = raw_forward(gen, x, cond[:, :0], text, mask, t)
    assert v.shape == x.shape
    torch.testing.assert_close(v, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v0, ref0, atol=1e-5, rtol=1e-5)
    if gen.uses_condition_frames:  # the condition frames really condition the target
        assert (v - v0).abs().max() > 1e-4


def test_a_short_condition_is_zero_padded_to_the_length_the_dit_was_trained_with(tiny_dir):
    """Wan and Cosmos attend their text padding: a condition shorter than generator.text_length reads as the
    pipeline hands it (its tokens, then zeros up to the length), also inside a batch of ragged rows; SANA masks
    its padding, so the length changes nothing there."""
    for name in ("tiny_wan", "tiny_cosmos", "tiny_sana"):
        g = build(tiny_dir, name).eval()
        x, cond, text, mask, t = inputs(g)
        cond = cond if g.uses_condition_frames else cond[:, :0]
        with torch.no_grad():
            g.text_length = None
            unpadded = g.velocity(x, t, cond, text, mask)
            g.text_length = 12
            v = g.velocity(x, t, cond, text, mask)
            if not g.attends_text_padding:
                torch.testing.assert_close(v, unpadded, atol=1e-6, rtol=1e-6)
                continue
            padded_text = torch.cat([text * mask[..., None], torch.zeros(2, 7, g.text_dim)], dim=1)
            ref = raw_forward(g, x, cond, padded_text, torch.ones(2, 12, dtype=torch.long), t)
            torch.testing.assert_close(v, ref, atol=1e-5, rtol=1e-5)
            assert (v - unpadded).abs().max() > 1e-4, f"{name}: the padding count should change what the DiT reads"
            rows = ragged_rows(g)  # texts of 5, 3, 7, ... tokens: every row padded to 12 alone and in the batch
            g.text_length = 6
            alone = [g.velocity(r.x[None], r.t[None], None if r.cond is None else r.cond[None], r.states[None], r.mask[None])[0] for r in rows]
            batched, _ = g.batched_velocity(rows)
            for a, b in zip(alone, batched):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_text_length_comes_from_the_pipeline_folder(tmp_path, tiny_dir):
    import json
    import shutil

    from backbones.generator.text_encoder import make_tiny_text_encoder, pipeline_text_length

    folder = tmp_path / "wan"
    shutil.copytree(tiny_dir / "wan", folder)
    shutil.rmtree(folder / "tokenizer", ignore_errors=True)
    assert pipeline_text_length(folder) is None  # no tokenizer/: no padding
    make_tiny_text_encoder(folder, "UMT5EncoderModel", dim=16, max_length=20)
    (folder / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "WanTransformer3DModel"],
                                                         "text_encoder": ["transformers", "UMT5EncoderModel"]}))
    assert pipeline_text_length(folder) == 20  # the pipeline's 512, capped by the tokenizer's model_max_length
    cfg = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 100000
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert pipeline_text_length(folder) == 512
    assert build(tiny_dir, "tiny_wan").text_length == pipeline_text_length(tiny_dir / "wan") > 0  # the yaml leaves it to the folder
    from backbones.generator.wan import WanGenerator

    g = WanGenerator.from_pretrained(str(folder), scheduler={"_target_": "diffusers.FlowMatchEulerDiscreteScheduler"})
    assert g.text_length == 512
    assert WanGenerator.from_pretrained(str(folder), scheduler={"_target_": "diffusers.FlowMatchEulerDiscreteScheduler"},
                                        text_length=48).text_length == 48


def test_mllm_only_sana_ignores_condition_frames(tiny_dir):
    g = build(tiny_dir, "tiny_sana").eval()
    x, cond, text, mask, t = inputs(g)
    with torch.no_grad():
        assert torch.equal(g.velocity(x, t, cond, text, mask), g.velocity(x, t, None, text, mask))


def test_loss_ignores_condition_frame_noise(gen):
    x, cond, text, mask, t = inputs(gen)
    noise = torch.randn(2, cond.shape[1] + 1, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = gen.flow_loss(x, cond, text, mask, t, noise)
        other = noise.clone()
        other[:, :-1] = torch.randn_like(other[:, :-1])
        same = gen.flow_loss(x, cond, text, mask, t, other)
        other[:, -1] = torch.randn_like(other[:, -1])
        changed = gen.flow_loss(x, cond, text, mask, t, other)
    assert torch.equal(base, same)
    assert not torch.isclose(base, changed)


def test_clean_condition_frames_unchanged_by_a_sampler_step(gen):
    x, cond, text, mask, t = inputs(gen)
    frames, n_cond = gen._frames(x, cond)
    if n_cond == 0:
        pytest.skip("this condition mode passes no condition frames to the DiT")
    sched = gen.make_scheduler()
    sched.set_timesteps(4)
    tt = sched.sigmas[0].expand(2)
    with torch.no_grad():
        v = gen._frames_velocity(frames, tt, n_cond, text, mask)
    nxt = sched.step(v, sched.timesteps[0], frames, return_dict=False)[0]
    # exact for Euler; UniPC rescales x and x0 by coefficients that sum to 1, so equal to rounding
    torch.testing.assert_close(nxt[:, :n_cond], frames[:, :n_cond], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(nxt[:, -1], frames[:, -1])


def test_vae_round_trip_shapes_and_pil(gen):
    from PIL import Image

    imgs = torch.rand(2, 3, 64, 64) * 2 - 1
    z = gen.encode(imgs)
    f = gen.spatial_factor
    assert z.shape == (2, gen.latent_channels, 64 // f, 64 // f)
    out = gen.decode(z)
    assert out.shape == (2, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    pil = Image.new("RGB", (80, 48), (255, 0, 0))
    z2 = gen.encode(pil, size=(64, 64))  # earlier images of other sizes are resized to the target size
    assert z2.shape == z.shape[1:] or z2.shape == (1, *z.shape[1:])


@pytest.mark.parametrize("hw", [(64, 64), (64, 128)])
def test_sample_returns_requested_size(gen, hw):
    x, cond, text, mask, _ = inputs(gen, b=1, n_cond=1)
    cond = torch.randn(1, 1, gen.latent_channels, hw[0] // gen.spatial_factor, hw[1] // gen.spatial_factor)
    seen = []
    out = gen.sample(text, mask, cond, steps=2, guidance=3.0, negative=(torch.zeros_like(text), mask),
                     generator=torch.Generator().manual_seed(0), height=hw[0], width=hw[1], callback=lambda i, t, x: seen.append(i))
    assert out.shape == (1, 3, *hw) and torch.isfinite(out).all()
    assert seen == [0, 1]
    again = gen.sample(text, mask, cond, steps=2, guidance=3.0, negative=(torch.zeros_like(text), mask),
                       generator=torch.Generator().manual_seed(0), height=hw[0], width=hw[1])
    assert torch.equal(out, again)  # seeded


def ragged_rows(gen, seed=0):
    """Rows of every kind one micro-batch can mix: texts of 3, 5 and 7 tokens (one with masked tokens of its own),
    two condition frames or none, two target sizes."""
    g = torch.Generator().manual_seed(seed)
    f, c = gen.spatial_factor, gen.latent_channels
    rows = []
    for i, (n_text, n_cond, w) in enumerate([(5, 2, 64), (3, 2, 64), (7, 0, 64), (3, 0, 64), (5, 2, 128), (7, 2, 64)]):
        mask = torch.ones(n_text, dtype=torch.long)
        if i == 5:
            mask[4:] = 0  # masked tokens inside the row's own text stay as they are (Wan and Cosmos read them as zeros)
        rows.append(DiTRow(torch.randn(c, 64 // f, w // f, generator=g), torch.rand((), generator=g),
                           torch.randn(n_cond, c, 64 // f, w // f, generator=g) if n_cond else None,
                           torch.randn(n_text, gen.text_dim, generator=g), mask))
    return rows


class Forwards:
    """Counts DiT forwards and the batch size of each."""

    def __init__(self, gen):
        self.sizes = []
        self.handle = gen.transformer.register_forward_hook(lambda m, a, kw, out: self.sizes.append(kw.get("hidden_states", a[0] if a else None).shape[0]),
                                                           with_kwargs=True)


def test_padding_and_batching_never_change_a_rows_velocity(gen):
    rows = ragged_rows(gen)
    counter = Forwards(gen)
    with torch.no_grad():
        alone = [gen.velocity(r.x[None], r.t[None], None if r.cond is None else r.cond[None], r.states[None], r.mask[None])[0] for r in rows]
        n_alone = len(counter.sizes)
        batched, _ = gen.batched_velocity(rows)
    counter.handle.remove()
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    groups = {(tuple(r.x.shape), gen._n_cond(r.cond)) for r in rows}
    assert n_alone == len(rows) and counter.sizes[n_alone:] == sorted(counter.sizes[n_alone:], reverse=True)
    assert len(counter.sizes) - n_alone == len(groups) < len(rows)  # one forward per shape, whatever the text lengths
    states, mask, lengths = pad_text([r.states for r in rows[:3]], [r.mask for r in rows[:3]])
    assert states.shape == (3, 7, gen.text_dim) and lengths.tolist() == [5, 3, 7] and mask.sum(1).tolist() == [5, 3, 7]
    assert pad_text([r.states for r in rows[:1]] * 2, [None, None])[2] is None  # equal lengths: no padding at all


def test_batched_gradients_equal_per_row_gradients_with_and_without_checkpointing(tiny_dir):
    for name in ("tiny_wan", "tiny_cosmos", "tiny_sana"):
        g = build(tiny_dir, name).train()
        rows = ragged_rows(g, seed=1)
        for checkpointing in (False, True):
            if checkpointing:
                g.transformer.enable_gradient_checkpointing()
            grads = []
            for batch in (False, True):
                g.zero_grad(set_to_none=True)
                vs, _ = g.batched_velocity(rows, batch=batch)
                torch.stack([v.square().mean() for v in vs]).mean().backward()
                grads.append({k: p.grad.clone() for k, p in g.transformer.named_parameters() if p.grad is not None})
            scale = max(v.abs().max() for v in grads[0].values())
            assert grads[0].keys() == grads[1].keys()
            for k in grads[0]:
                torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-5 * scale, rtol=1e-4, msg=f"{name} {k} checkpointing={checkpointing}")


def test_batched_guidance_gives_the_same_latents(gen):
    x, cond, text, mask, _ = inputs(gen, b=2, n_cond=1)
    negative = (torch.randn(2, 3, gen.text_dim, generator=torch.Generator().manual_seed(5)), None)  # shorter, as DuoGen's
    for image_guidance in (1.0, 1.5):
        latents, forwards = [], []
        for batch in (False, True):
            counter = Forwards(gen)
            latents.append(gen.sample(text, mask, cond, steps=3, guidance=3.0, negative=negative, image_guidance=image_guidance,
                                      generator=torch.Generator().manual_seed(0), decode=False, batch_guidance=batch))
            counter.handle.remove()
            forwards.append(len(counter.sizes))
        torch.testing.assert_close(latents[1], latents[0], atol=1e-5, rtol=1e-5)
        passes = 3 if image_guidance != 1.0 else 2
        batched = 1 if passes == 2 or not gen.uses_condition_frames else 2  # the no-image pass has its own frame layout
        assert forwards == [3 * passes, 3 * batched]


def test_one_training_step_updates_only_the_dit(tiny_dir):
    for name in ("tiny_wan", "tiny_cosmos", "tiny_sana"):
        g = build(tiny_dir, name).train()
        x, cond, text, mask, t = inputs(g)
        before = {k: v.clone() for k, v in g.transformer.state_dict().items()}
        vae_before = {k: v.clone() for k, v in g.vae.state_dict().items()}
        opt = torch.optim.AdamW([p for p in g.parameters() if p.requires_grad], lr=1e-3)
        loss = g.flow_loss(x, cond, text, mask, t, torch.randn(2, *x.shape[1:]))
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        assert reinitialised_keys(before, g.transformer.state_dict()), name
        assert not reinitialised_keys(vae_before, g.vae.state_dict()), name


@pytest.mark.parametrize(
    "name, path, expected",
    [
        ("tiny_wan", "wan", ["condition_embedder.text_embedder.linear_1.weight"]),
        ("tiny_cosmos", "cosmos", ["crossattn_proj.0.weight"]),
        ("cosmos2", "cosmos2", [f"transformer_blocks.{i}.attn2.{p}.weight" for i in range(2) for p in ("to_k", "to_v")]),
        ("tiny_sana", "sana", ["caption_projection.linear_1.weight"]),
    ],
)
def test_new_text_width_reinitialises_only_the_text_projection(tiny_dir, name, path, expected):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_dir / path / "transformer" / "diffusion_pytorch_model.safetensors"))
    cfg_name = "tiny_cosmos" if name == "cosmos2" else name
    g = build(tiny_dir, cfg_name, path=str(tiny_dir / path), text_dim=40)
    assert g.text_dim == 40
    after = g.transformer.state_dict()
    assert reinitialised_keys(saved, after) == sorted(expected)
    for k in expected:
        assert not after[k].is_meta and torch.isfinite(after[k]).all() and after[k].abs().sum() > 0
    x, cond, text, mask, t = inputs(g)
    with torch.no_grad():
        assert torch.isfinite(g.velocity(x, t, cond, torch.randn(2, 5, 40), mask)).all()


def test_missing_generator_folder_is_a_clear_error(tiny_dir, tmp_path):
    with pytest.raises(Exception) as ei:  # Hydra's instantiate wraps it; the tools unwrap it (fusion.cli)
        build(tiny_dir, "tiny_wan", path=str(tmp_path / "nothing"))
    cause = ei.value.__cause__
    assert isinstance(cause, CheckpointError) and "generator.path: checkpoint folder not found" in str(cause)


def test_wan2_2_ti2v_layout_runs_through_the_same_adapter(tiny_dir):
    g = build(tiny_dir, "tiny_wan", path=str(tiny_dir / "wan2_2")).eval()
    assert g.spatial_factor == 16 and g.latent_channels == 48
    z = g.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert z.shape == (1, 48, 4, 4)
    x, cond, text, mask, t = inputs(g, b=1, n_cond=1)
    with torch.no_grad():
        torch.testing.assert_close(g.velocity(x, t, cond, text, mask), raw_forward(g, x, cond, text, mask, t), atol=1e-5, rtol=1e-5)
    assert g.sample(text, mask, cond, steps=2, height=64, width=64).shape == (1, 3, 64, 64)


def test_a_plain_autoencoderkl_fills_the_vae_slot(tmp_path):
    """Toy generators put a 2-D AutoencoderKL where Wan has its 3-D VAE: no code change."""
    from backbones.generator import wan
    from backbones.generator.wan import WanGenerator

    path = wan.make_tiny(tmp_path, name="wan_kl", variant="kl")
    sched = {"_target_": "diffusers.FlowMatchEulerDiscreteScheduler", "shift": 1.0}
    g = WanGenerator.from_pretrained(str(path), scheduler=sched, image_size=64).eval()
    assert type(g.vae).__name__ == "AutoencoderKL" and g.spatial_factor == 4 and g.latent_channels == 8
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = g.encode(x)
    assert z.shape == (2, 8, 16, 16)
    c = g.vae.config
    torch.testing.assert_close(z, (g.vae.encode(x).latent_dist.mode() - (c.shift_factor or 0.0)) * c.scaling_factor)
    assert g.decode(z).shape == (2, 3, 64, 64)
    text = torch.randn(1, 4, g.text_dim)
    assert g.sample(text, None, z[:1, None], steps=2).shape == (1, 3, 64, 64)


def test_vae_and_dit_channel_mismatch_is_a_clear_error(tmp_path):
    import shutil

    from backbones.generator import wan
    from backbones.generator.wan import WanGenerator

    a = wan.make_tiny(tmp_path, name="a", variant="kl")
    b = wan.make_tiny(tmp_path, name="b", variant="2.1")
    shutil.rmtree(b / "vae")
    shutil.copytree(a / "vae", b / "vae")  # an 8-channel VAE under a 16-channel DiT
    with pytest.raises(CheckpointError, match="8 latent channels but the DiT expects 16"):
        WanGenerator.from_pretrained(str(b), scheduler={"_target_": "diffusers.FlowMatchEulerDiscreteScheduler"})
