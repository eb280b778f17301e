"""Toy-pretrained backbones: real folder layouts, loadable through the project's configs, cached builds."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fusion.toyworld.pretrain import (
    OPS,
    dit_batch,
    edit_prompt,
    scene_prompt,
    toy_text_encoder,
    toy_tokenizer,
    load_toy_generator,
    mllm_sample,
    pretrain_dit,
    pretrain_mllm,
    pretrain_vae,
)
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def toy_vae(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyvae") / "vae"
    pretrain_vae(out, steps=3, batch=2, progress=False)
    return out


def test_toy_tokenizer_covers_every_request_and_pads_like_a_pipeline():
    tok = toy_tokenizer(48)
    rng = random.Random(0)
    t2i, edits = dit_batch(rng, 300, 0.5)
    prompts = [scene_prompt(rng, s) for s in t2i] + [edit_prompt(rng, src, op, tgt) for src, _, op, tgt in edits]
    enc = tok(prompts, padding="max_length", max_length=48, truncation=True)
    for p, ids, m in zip(prompts, enc.input_ids, enc.attention_mask):
        assert tok.unk_token_id not in ids, p  # every word of the toy world is in the vocabulary
        n = sum(m)
        assert n < 48 and ids[n - 1] == tok.eos_token_id and set(ids[n:]) <= {tok.pad_token_id}, p
    assert tok("Draw a red circle.").input_ids != tok("Draw a blue circle.").input_ids


@pytest.mark.parametrize("family,cls", [("wan", "UMT5EncoderModel"), ("cosmos", "T5EncoderModel"), ("sana", "Gemma2Model")])
def test_toy_text_encoders_are_the_family_classes_and_load_as_a_pipeline_folder_holds_them(tmp_path, toy_vae, family, cls):
    from backbones.generator.text_encoder import TextEncoder
    from fusion.toyworld.pretrain import save_generator, toy_transformer

    tok = toy_tokenizer(24)
    enc = toy_text_encoder(family, len(tok), 64, layers=1)
    assert type(enc).__name__ == cls
    save_generator(tmp_path / family, family, toy_transformer(family, 8, 64, layers=1), toy_vae, enc, tok)
    assert json.loads((tmp_path / family / "model_index.json").read_text())["text_encoder"] == ["transformers", cls]
    te = TextEncoder.from_pretrained(tmp_path / family)
    assert type(te.encoder).__name__ == cls and te.max_length == 24 and te.dim == 64
    states, mask = te.encode(["Draw a red circle at the top left.", "Remove the blue square."])
    assert states.shape == (2, 24, 64) and mask.sum(1).tolist() == [10, 6]
    assert states[0, 10:].abs().max() == 0 and states[1, 6:].abs().max() == 0  # padding zeroed, as the pipelines do
    assert states[0, :10].abs().amax(-1).min() > 0


def test_dit_batches_hold_valid_edits():
    t2i, edits = dit_batch(random.Random(0), 200, 0.5)
    assert t2i and edits
    for src, edited, op, target in edits:
        assert op in OPS
        assert (target in edited) != (op == "remove")
        assert (target in src) == (op == "remove")


def test_frame_edits_put_the_source_where_the_request_says():
    """Edits with several condition frames: a request that refers back ("In the first picture, ...")
    has its source first, any other the source last; the edit applies to the source."""
    from fusion.toyworld.conversations import BACK
    from fusion.toyworld.pretrain import frame_edits

    items = frame_edits(random.Random(0), 200)
    backs = [BACK.index(b) for m in items for b in BACK if m[5].startswith(b.split("{")[0])]
    assert 60 < len(backs) < 140  # about half refer back
    for frames, edited, op, target, index, request in items:
        assert 2 <= len(frames) <= 3 and op in OPS
        refers_back = any(request.startswith(b.split("{")[0]) for b in BACK)
        assert index == (0 if refers_back else len(frames) - 1)
        assert (target in edited) != (op == "remove") and (target in frames[index]) == (op == "remove")


def test_toy_dit_pretrains_with_several_condition_frames(tmp_path, toy_vae):
    stats = pretrain_dit("wan", tmp_path / "wan", toy_vae, steps=2, batch=4, pool_size=16, eval_n=4, text_length=32, progress=False,
                         coord_freqs=1, p_frames=0.5)
    assert stats["p_frames"] == 0.5 and stats["t_sampling"] == "shifted"
    assert {"edit_first_of_frames", "edit_latest_of_frames"} <= set(stats["accuracy"])
    assert set(stats["fit"]) & {"edit_2f", "edit_3f"}  # the multi-frame items trained and were scored by their frame count


@pytest.mark.parametrize("family", ["wan", "cosmos", "sana"])
def test_toy_dit_pretrains_saves_and_loads_through_its_config(tmp_path, toy_vae, family):
    root = tmp_path / family
    stats = pretrain_dit(family, root, toy_vae, steps=4, batch=4, pool_size=16, eval_n=4, text_length=24, progress=False)
    assert stats["steps"] == 4 and stats["last_loss"] > 0
    assert set(stats["accuracy"]) >= {"t2i", "t2i_1obj"}
    assert set(stats["fit"]) <= {"t2i", "edit"} and "t2i" in stats["fit"]
    assert all(set(v) == {"train", "held_out"} and v["train"] > 0 and v["held_out"] > 0 for v in stats["fit"].values())
    for part in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"):
        assert (root / part / "config.json").is_file() or (root / part / "scheduler_config.json").is_file() or (root / part / "tokenizer.json").is_file()
    assert json.loads((root / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    cfg = compose_config(["mllm=toy", f"generator=toy_{family}", f"toy_dir={tmp_path}"])
    from hydra.utils import instantiate

    gen = instantiate(cfg.generator)
    direct = load_toy_generator(family, root)
    assert gen.text_dim == 64 and gen.image_size == 64
    for a, b in zip(gen.transformer.state_dict().values(), direct.transformer.state_dict().values()):
        assert torch.equal(a, b)
    # the coordinate / absolute position signal is what the families' configs say it is
    c = gen.transformer.config
    if family == "wan":
        assert gen.coord_channels == 2 and c.in_channels == c.out_channels + 2
    elif family == "cosmos":
        assert c.extra_pos_embed_type == "learnable"
    else:
        assert c.interpolation_scale is not None and gen.uses_condition_frames
    if gen.uses_condition_frames:  # an edit with one condition frame runs and leaves the frame alone
        x = torch.randn(1, gen.latent_channels, 16, 16)
        cond = torch.randn(1, 1, gen.latent_channels, 16, 16)
        from backbones.generator.text_encoder import TextEncoder

        states, mask = TextEncoder.from_pretrained(root).encode(["Add a red circle at the top left."])
        v = gen.velocity(x, torch.tensor([0.5]), cond, states, mask)
        assert v.shape == x.shape and torch.isfinite(v).all()


def test_fit_losses_are_the_flow_loss_of_each_pool_by_kind(tmp_path, toy_vae):
    """make_toy's fit figures: per kind and pool, the mean flow loss at the fixed t values and noise
    (recomputed here directly); different items give different figures, the same items the same."""
    from backbones.generator.text_encoder import TextEncoder
    from fusion.toyworld.pretrain import _latent_pool, fit_losses, save_generator, toy_tokenizer, toy_transformer

    tok = toy_tokenizer(24)
    torch.manual_seed(0)
    save_generator(tmp_path / "wan", "wan", toy_transformer("wan", 8, 64, layers=1), toy_vae, toy_text_encoder("wan", len(tok), 64, 1), tok)
    gen, text = load_toy_generator("wan", tmp_path / "wan"), TextEncoder.from_pretrained(tmp_path / "wan")
    a = _latent_pool(gen, tok, random.Random(0), 12, 0.5, False)
    b = _latent_pool(gen, tok, random.Random(1), 12, 0.5, False)
    fit = fit_losses(gen, text, {"train": a, "held_out": b, "again": a}, n=3, ts=(0.4, 0.8), seed=5)
    assert set(fit) == {"t2i", "edit"}
    for kind, (target, cond, ids, mask, _) in a.items():
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            direct = [gen.flow_loss(target[:3], None if cond is None else cond[:3], text.states(ids[:3], mask[:3]), mask[:3],
                                    torch.full((3,), t), torch.randn(target[:3].shape, generator=g)).item() for t in (0.4, 0.8)]
        assert fit[kind]["train"] == pytest.approx(sum(direct) / 2, rel=1e-4)
        assert fit[kind]["again"] == fit[kind]["train"] != fit[kind]["held_out"]


def test_wan_coordinate_channels_tell_positions_apart(tmp_path, toy_vae):
    """The same latent content at two places gets different velocities only through position signals."""
    gen = load_toy_generator("wan", _wan(tmp_path, toy_vae))
    x = torch.zeros(1, gen.latent_channels, 16, 16)
    states, mask = torch.zeros(1, 4, 64), torch.zeros(1, 4, dtype=torch.long)
    v = gen.velocity(x, torch.tensor([0.5]), None, states, mask)
    assert not torch.allclose(v[..., :8, :8], v[..., 8:, 8:], atol=1e-6)


@pytest.mark.parametrize("family", ["wan", "cosmos", "sana"])
def test_a_coarser_patch_gives_fewer_tokens_and_runs_through_the_adapter(tmp_path, toy_vae, family):
    """make_toy's dit_patch: a patch of 4 latent pixels gives 16 tokens a frame on the 16x16 latents (64 with 2), and
    the family's adapter reads the patch from the saved config (velocity of the latent's shape, position-dependent)."""
    from fusion.toyworld.pretrain import save_generator, toy_transformer

    torch.manual_seed(0)
    coord = 3 if family == "wan" else 0
    save_generator(tmp_path / family, family, toy_transformer(family, 8, 64, layers=1, coord_freqs=coord, patch=4), toy_vae)
    gen = load_toy_generator(family, tmp_path / family)
    seen = []  # the first block's hidden states: [B, tokens, width]
    hook = gen.dit_blocks()[0].register_forward_hook(lambda m, a, k, out: seen.append((a[0] if a else k["hidden_states"]).shape),
                                                     with_kwargs=True)
    x = torch.zeros(1, gen.latent_channels, 16, 16)
    x[..., :6, :6] = 1.0
    cond = torch.zeros(1, 1, 8, 16, 16) if gen.uses_condition_frames else None
    states, mask = torch.randn(1, 4, 64), torch.ones(1, 4, dtype=torch.long)
    v = gen.velocity(x, torch.tensor([0.5]), cond, states, mask)
    hook.remove()
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert seen[0][1] == 16 * (2 if cond is not None else 1)  # 4x4 tokens per frame
    assert not torch.allclose(v[..., :4, :4], v[..., 12:, 12:], atol=1e-6)


def test_make_toy_checks_the_patch_against_the_latents_of_its_image_size():
    from fusion.config import MakeToyConfig
    from fusion.errors import ConfigError

    MakeToyConfig(image_size=48, dit_patch=4)  # 12x12 latents: 3x3 tokens, one per grid cell
    with pytest.raises(ConfigError, match=r"dit_patch: 8 must divide the toy VAE's 12x12 latents of a 48-pixel scene"):
        MakeToyConfig(image_size=48, dit_patch=8)


def test_a_smaller_world_pretrains_and_samples_at_its_own_size(tmp_path):
    """MakeToyConfig.image_size reaches every pretraining: the VAE learns 48-pixel scenes, the DiT's pool and its
    sampled pictures are 48 pixels (12x12 latents), and the folder says so, which load_toy_generator reads back."""
    from backbones.generator.text_encoder import TextEncoder

    vae = tmp_path / "vae"
    stats = pretrain_vae(vae, steps=2, batch=2, progress=False, image_size=48)
    assert stats["image_size"] == 48 and json.loads((vae / "config.json").read_text())["sample_size"] == 48
    stats = pretrain_dit("wan", tmp_path / "wan", vae, steps=2, batch=4, pool_size=8, layers=1, text_length=24, eval_n=2, fit_n=4,
                         coord_freqs=3, progress=False, image_size=48)
    assert stats["image_size"] == 48
    gen = load_toy_generator("wan", tmp_path / "wan")
    assert gen.image_size == 48
    states, mask = TextEncoder.from_pretrained(tmp_path / "wan").encode(["Draw a red circle."])
    img = gen.sample(states, mask, steps=2, guidance=1.0, generator=torch.Generator().manual_seed(0))
    assert tuple(img.shape[-2:]) == (48, 48)
    assert load_toy_generator("wan", tmp_path / "wan", 64).image_size == 64  # an explicit side wins


@pytest.mark.parametrize("family", ["wan", "cosmos", "sana"])
def test_the_toy_generator_configs_draw_at_the_size_their_folder_was_pretrained_at(tmp_path, family):
    def side():
        cfg = compose_config(["experiment=toy_align", f"toy_dir={tmp_path}", f"generator=toy_{family}"])
        return cfg.generator.image_size

    assert side() == 64  # not built yet
    (tmp_path / family).mkdir()
    (tmp_path / family / "pretrain.json").write_text(json.dumps({"steps": 9000}))
    assert side() == 64  # built before the setting
    (tmp_path / family / "pretrain.json").write_text(json.dumps({"steps": 10, "image_size": 48}))
    assert side() == 48
    (tmp_path / family / "pretrain.json").write_text("[1, 2]")
    with pytest.raises(Exception, match=r"pretrain.json: not a toy generator's pretrain.json"):  # OmegaConf wraps the resolver's error
        side()


def _wan(tmp_path, toy_vae):
    from fusion.toyworld.pretrain import save_generator, toy_transformer

    torch.manual_seed(0)
    save_generator(tmp_path / "wan", "wan", toy_transformer("wan", 8, 64, layers=1), toy_vae)
    return tmp_path / "wan"


def test_wan_rejects_an_input_width_it_cannot_explain(tmp_path, toy_vae):
    from diffusers import WanTransformer3DModel

    from fusion.toyworld.pretrain import save_generator

    t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=11, out_channels=8, text_dim=64,
                              freq_dim=16, ffn_dim=16, num_layers=1)
    save_generator(tmp_path / "wan", "wan", t, toy_vae)
    gen = load_toy_generator("wan", tmp_path / "wan")
    with pytest.raises(ValueError, match="coordinate channels"):
        gen.velocity(torch.zeros(1, 8, 16, 16), torch.tensor([0.5]), None, torch.zeros(1, 4, 64), torch.zeros(1, 4, dtype=torch.long))


def test_fourier_coordinate_channels_peak_at_the_same_cell(tmp_path, toy_vae):
    """With sin/cos channels the similarity of two cells' position features (what a query/key
    projection can compute) is highest at the same cell, for every cell: an edit can copy its
    condition frame cell by cell. The first two channels stay the ramps older checkpoints use,
    and a transformer built with them runs through the adapter."""
    from backbones.generator.wan import coordinate_grid
    from fusion.toyworld.pretrain import save_generator, toy_transformer

    grid = coordinate_grid(8, 8, 14)
    assert grid.shape == (14, 8, 8)
    assert torch.equal(grid[:2], coordinate_grid(8, 8, 2))
    assert torch.allclose(grid[0, :, 0], torch.linspace(-1, 1, 8)) and torch.allclose(grid[1, 0], torch.linspace(-1, 1, 8))
    feats = grid[2:].flatten(1).T  # [64 cells, 12]
    sim = feats @ feats.T
    assert torch.equal(sim.argmax(dim=1), torch.arange(64))
    off_diagonal = sim.masked_fill(torch.eye(64, dtype=torch.bool), -1e9).amax(dim=1)
    assert (sim.diagonal() - off_diagonal).min() > 0.1  # a margin, not a tie

    torch.manual_seed(0)
    save_generator(tmp_path / "wan", "wan", toy_transformer("wan", 8, 64, layers=1, coord_freqs=3), toy_vae)
    gen = load_toy_generator("wan", tmp_path / "wan")
    assert gen.coord_channels == 14 and gen.transformer.config.in_channels == 8 + 14
    x = torch.zeros(1, 8, 16, 16)
    v = gen.velocity(x, torch.tensor([0.5]), torch.zeros(1, 1, 8, 16, 16), torch.zeros(1, 4, 64), torch.ones(1, 4, dtype=torch.long))
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert not torch.allclose(v[..., :8, :8], v[..., 8:, 8:], atol=1e-6)


def _same_cell_attention(transformer, frames: torch.Tensor) -> torch.Tensor:
    """[blocks, heads] mean attention from each last-frame token to the previous frame's token at its cell."""
    import torch.nn.functional as F

    from backbones.generator.wan import coordinate_grid

    seen, sdpa = [], F.scaled_dot_product_attention

    def capture(query, key, value, *args, **kwargs):
        if query.shape[-2] == key.shape[-2]:  # self-attention: [B, heads, tokens, head_dim]
            seen.append(torch.softmax(query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5, -1))
        return sdpa(query, key, value, *args, **kwargs)

    b, f, c, h, w = frames.shape
    cells = (h // 2) * (w // 2)
    grid = coordinate_grid(h, w, transformer.config.in_channels - c)
    x = torch.cat([frames, grid.expand(b, f, *grid.shape)], dim=2).permute(0, 2, 1, 3, 4)
    timestep = torch.cat([torch.zeros(b, cells), torch.full((b, cells), 500.0)], dim=1)  # condition frame clean
    F.scaled_dot_product_attention = capture
    try:
        with torch.no_grad():
            transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=torch.zeros(b, 4, 64), return_dict=False)
    finally:
        F.scaled_dot_product_attention = sdpa
    return torch.stack([a[..., cells:, :cells].diagonal(dim1=-2, dim2=-1).mean(dim=(0, -1)) for a in seen])


def test_copy_heads_start_reading_the_condition_frame_at_the_same_cell():
    """init_copy_heads: head 0 of every block puts most of each target token's attention on the
    condition frame's token at the same cell (not on its own frame's), where a freshly built DiT
    spreads it evenly; the other heads keep their initialisation. Refused without Fourier channels."""
    from fusion.toyworld.pretrain import init_copy_heads, toy_transformer

    torch.manual_seed(0)
    frames = torch.randn(2, 2, 8, 16, 16)
    plain = toy_transformer("wan", 8, 64, layers=2, coord_freqs=3)
    before = _same_cell_attention(plain, frames)
    assert before.max() < 0.1  # uniform would be 1/128
    copy = toy_transformer("wan", 8, 64, layers=2, coord_freqs=3)
    copy.load_state_dict(plain.state_dict())
    init_copy_heads(copy, 8)
    after = _same_cell_attention(copy, frames)
    assert after[:, 0].min() > 0.8, after
    assert torch.allclose(after[:, 1:], before[:, 1:], atol=0.05)
    with pytest.raises(ValueError, match="coord_freqs"):
        init_copy_heads(toy_transformer("wan", 8, 64, layers=1), 8)


@pytest.mark.parametrize("field,value,key", [("dit_coord_freqs", -1, "dit_coord_freqs"), ("dit_families", ["wan", "flux"], "dit_families"),
                                             ("dit_t_sampling", "cosine", "dit_t_sampling"), ("dit_t_shift", 0.0, "dit_t_shift"),
                                             ("dit_copy_heads", -1.0, "dit_copy_heads"), ("dit_p_frames", 1.0, "dit_p_frames"),
                                             ("dit_p_context", 1.5, "dit_p_context"), ("mllm_p_text", -0.1, "mllm_p_text"),
                                             ("dit_p_edit", 1.2, "dit_p_edit"), ("dit_ema", 1.0, "dit_ema"), ("dit_optimizer", "sgd", "dit_optimizer"), ("mllm_optimizer", "lion", "mllm_optimizer"),
                                             ("dit_patch", 3, "dit_patch"),
                                             ("image_size", 50, "image_size"), ("image_size", 16, "image_size"),
                                             ("mllm_rope_theta", 1.0, "mllm_rope_theta"), ("mllm_vision_out_scale", 0.0, "mllm_vision_out_scale")])
def test_make_toy_refuses_impossible_settings_naming_the_key(field, value, key):
    from fusion.config import MakeToyConfig
    from fusion.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        MakeToyConfig(**{field: value})
    assert MakeToyConfig().dit_coord_freqs == 3  # the default recipe: ramps + 3 frequency pairs
    assert (MakeToyConfig().dit_t_sampling, MakeToyConfig().dit_t_shift) == ("shifted", 3.0)
    with pytest.raises(ConfigError, match="dit_copy_heads"):  # the copy heads read the Fourier channels
        MakeToyConfig(dit_copy_heads=4.0, dit_coord_freqs=0)


def test_vision_out_scale_shrinks_only_the_merger_output_layer_at_init(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from backbones.mllm.tiny_qwen2_5_vl import make_tiny

    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(make_tiny(tmp_path, 3, "plain", 64, 2, 32, initializer_range=0.1)).state_dict()
    small = Qwen2_5_VLForConditionalGeneration.from_pretrained(make_tiny(tmp_path, 3, "small", 64, 2, 32, initializer_range=0.1,
                                                                         vision_out_scale=0.1)).state_dict()
    out_layer = [k for k in plain if "merger.mlp.2." in k]
    assert len(out_layer) == 2  # weight and bias
    for k in plain:
        assert torch.allclose(small[k], plain[k] * (0.1 if k in out_layer else 1.0)), k
    from fusion.config import MakeToyConfig

    assert MakeToyConfig().mllm_vision_out_scale < 1  # the toy recipe's image tokens start near the text embeddings' scale


def test_toy_mllm_pretrains_into_a_qwen_folder_with_one_vision_token_per_cell(tmp_path, monkeypatch):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter

    out = tmp_path / "qwen2_5_vl"
    stats = pretrain_mllm(out, steps=3, batch=2, hidden_size=64, vision_hidden_size=32, rope_theta=10.0, p_text=0.5, vision_out_scale=0.1,
                          progress=False)
    assert json.loads((out / "config.json").read_text())["text_config"]["rope_parameters"]["rope_theta"] == 10.0
    from safetensors.torch import load_file

    out_layer = next(v for k, v in load_file(out / "model.safetensors").items() if k.endswith("merger.mlp.2.weight"))
    assert out_layer.std() < 0.03  # initialised at 0.1 x 0.1 (initializer_range 0.1 alone: ~0.1), three small steps since
    assert stats["last_loss"] < stats["first_loss"] + 1.0 and 0.0 <= stats["answer_accuracy"] <= 1.0
    assert stats["p_text"] == 0.5 and 0.0 <= stats["text_accuracy"] <= 1.0  # text-only exercises decode without pixels
    Qwen2_5_VLForConditionalGeneration.from_pretrained(out)  # the published layout
    AutoProcessor.from_pretrained(out)
    adapter = Qwen25VLAdapter.from_pretrained(str(out))
    r = adapter.render(mllm_sample(random.Random(0)))
    assert (r.input_ids == adapter.image_token_id).sum() == 9  # 84x84 -> 6x6 patches -> 3x3 merged
    assert r.labels.ne(-100).sum() > 0
    cfg = compose_config(["mllm=toy", f"toy_dir={tmp_path}"])
    assert cfg.mllm.path == str(out)
    from fusion.toyworld import pretrain as P

    def no_text(rng):
        raise AssertionError("the picture questions' accuracy asked a text exercise")

    monkeypatch.setattr(P, "text_exercise", no_text)  # every held-out question of the default score is about a picture
    assert 0.0 <= P.mllm_accuracy(adapter, n=3) <= 1.0


def test_interleaved_mrope_gives_the_columns_of_an_image_a_visible_rotation():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from backbones.mllm.tiny_qwen2_5_vl import build_tokenizer, tiny_config

    def column_turn(interleaved: bool) -> float:
        """The largest angle any rotary frequency turns by when the column position moves by one cell."""
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(build_tokenizer(), 128, 1, 32, 0.1, mrope_interleaved=interleaved))
        pos = torch.zeros(3, 1, 2, dtype=torch.long)
        pos[2, 0, 1] = 1  # the same time and row, the next column
        cos, sin = model.model.language_model.rotary_emb(torch.zeros(1, 2, 128), pos)
        return torch.atan2(sin[0, 1], cos[0, 1]).abs().max().item()

    assert column_turn(False) < 0.005  # Qwen2.5-VL's blocks: the columns get the lowest frequencies
    assert column_turn(True) > 0.3


def test_mllm_samples_answer_from_the_scene():
    rng = random.Random(5)
    seen = set()
    for _ in range(200):
        user, assistant = mllm_sample(rng)
        q = user["content"][1]["text"]
        a = assistant["content"][0]["text"]
        assert a and a[0].isupper() and a.endswith(".")
        seen.add(q.split()[0])
    assert {"How", "What", "Where"} <= seen


def test_text_exercises_answer_from_the_description_they_read():
    """The toy MLLM's text-only exercises: each answer is read off the words of the question (the copy, the n-th
    object, an object's colour or place), so an MLLM that learns them has learned to copy and look up."""
    from fusion.toyworld.pretrain import ORDINALS, text_exercise
    from fusion.toyworld.scenes import CELL_NAMES

    rng, kinds = random.Random(3), set()
    for _ in range(300):
        user, assistant = text_exercise(rng)
        assert [x["type"] for x in user["content"]] == ["text"]  # no picture
        q, a = user["content"][0]["text"], assistant["content"][0]["text"]
        assert a[0].isupper() and a.endswith(".")
        if q.startswith(("Repeat: ", "Say: ", "Copy this: ")):
            kinds.add("repeat")
            assert a.lower() == q.split(": ", 1)[1].lower()
        elif q.startswith("Which is the "):
            kinds.add("nth")
            word, said = q.removeprefix("Which is the ").split(" object in: ")
            objs = [p.strip() for p in said.rstrip("?").replace(" and ", ", ").split(", ")]
            assert a[:-1].lower() == objs[-1 if word == "last" else ORDINALS.index(word)]
        else:
            kinds.add(q.split(". ")[1].split()[0])
            assert q.startswith("There is ") and a[:-1].lower() in q.lower()
            if "What colour" in q:
                shape, where = q.split("What colour is the ")[1].rstrip("?").split(" at the ")
                assert f"{a[:-1].lower()} {shape} at the {where}" in q
            else:
                assert a[:-1].lower() in CELL_NAMES.values()
    assert kinds == {"repeat", "nth", "What", "Where"}


def test_mllm_pretraining_mixes_in_text_exercises_only_when_asked():
    picture = lambda m: any(x["type"] == "image" for x in m[0]["content"])  # noqa: E731
    assert all(picture(mllm_sample(random.Random(i))) for i in range(50))  # p_text=0: every sample is about a picture
    rng = random.Random(0)
    mixed = [picture(mllm_sample(rng, p_text=0.25)) for _ in range(400)]
    assert 60 < mixed.count(False) < 140


def test_requests_in_context_keep_the_request_and_name_no_extra_shape():
    """in_context: an edit may refer back and/or follow an unrelated exchange; the request itself is kept whole
    and no shape word is added (the object probe reads the k-th shape word as the k-th object)."""
    from fusion.toyworld.conversations import BACK, DISTRACT
    from fusion.toyworld.pretrain import in_context
    from fusion.toyworld.scenes import SHAPES

    rng = random.Random(0)
    backs = chats = 0
    tok = toy_tokenizer(48)
    for _ in range(200):
        src, _, op, tgt = dit_batch(rng, 1, 1.0)[1][0]
        request = edit_prompt(rng, src, op, tgt)
        phrased = in_context(rng, request, edit=True)
        assert phrased != request and phrased.endswith(request[1:])
        back = any(b.split("{")[0] in phrased for b in BACK)
        chat = any(phrased.startswith(f"{q} {a} ") for q, a in DISTRACT)
        assert back or chat
        backs, chats = backs + back, chats + chat
        words = phrased.lower().replace(".", " ").replace(",", " ").split()
        assert sum(w in SHAPES for w in words) == sum(w in SHAPES for w in request.lower().replace(".", " ").split())
        ids = tok(phrased, padding="max_length", max_length=48, truncation=True)
        assert tok.unk_token_id not in ids.input_ids and sum(ids.attention_mask) < 48
    assert 60 < backs < 140 and 100 < chats < 200
    assert not any(any(b.split("{")[0] in in_context(rng, "Draw a red circle.", edit=False) for b in BACK) for _ in range(50))


def test_toy_dit_pretrains_on_requests_in_context_and_scores_edits_in_context(tmp_path, toy_vae):
    stats = pretrain_dit("wan", tmp_path / "wan", toy_vae, steps=2, batch=4, pool_size=16, eval_n=4, text_length=48, progress=False,
                         coord_freqs=1, p_context=0.5, p_edit=0.75)
    assert stats["p_context"] == 0.5 and 0.0 <= stats["accuracy"]["edit_in_context"] <= 1.0
    assert stats["p_edit"] == 0.75


def test_toy_dit_with_ema_trains_alike_saves_the_average_and_scores_the_last_weights(tmp_path, toy_vae):
    """dit_ema changes what is saved, not how it trains: the same losses as a run without it, its
    ``accuracy_last`` is what that run scored on the same items, and its saved DiT and encoder are the average."""
    kw = dict(steps=3, batch=4, pool_size=16, eval_n=4, text_length=24, progress=False, coord_freqs=1)
    plain = pretrain_dit("wan", tmp_path / "plain", toy_vae, **kw)
    ema = pretrain_dit("wan", tmp_path / "ema", toy_vae, ema_decay=0.5, **kw)
    assert "accuracy_last" not in plain and ema["ema_decay"] == 0.5
    assert (ema["first_loss"], ema["last_loss"]) == (plain["first_loss"], plain["last_loss"])
    assert json.dumps(ema["accuracy_last"], sort_keys=True) == json.dumps(plain["accuracy"], sort_keys=True)  # NaN: no item of a kind
    from backbones.generator.text_encoder import TextEncoder

    for part, load in (("transformer", lambda r: load_toy_generator("wan", r).transformer),
                       ("text_encoder", lambda r: TextEncoder.from_pretrained(r).encoder)):
        a, b = load(tmp_path / "plain").state_dict(), load(tmp_path / "ema").state_dict()
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[k], b[k]) for k in a), part  # the average, not the last weights


def test_toy_dit_text_encoder_frozen_part_way_writes_an_early_snapshot_with_the_final_encoder(tmp_path, toy_vae):
    """text_freeze_step: the generator folder written at that step (early_dir) holds, byte for byte, the text encoder and
    tokenizer finally saved (stage 2's distillation teacher, fusion.train.teacher_fingerprint), a DiT that trained on
    after it, and an encoder that trained before it (not the one a run without the freeze saves)."""
    from backbones.generator.text_encoder import TextEncoder
    from fusion.train import teacher_fingerprint

    kw = dict(steps=4, batch=4, pool_size=16, eval_n=2, fit_n=4, text_length=24, progress=False, coord_freqs=1, optimizer="muon")
    stats = pretrain_dit("wan", tmp_path / "wan", toy_vae, text_freeze_step=2, early_dir=tmp_path / "wan_early", **kw)
    plain = pretrain_dit("wan", tmp_path / "plain", toy_vae, **kw)
    early, final = tmp_path / "wan_early", tmp_path / "wan"
    assert stats["text_freeze_step"] == 2 and json.loads((early / "early.json").read_text())["step"] == 2
    assert stats["first_loss"] == plain["first_loss"]  # the same run up to the freeze
    assert teacher_fingerprint(early) == teacher_fingerprint(final) != teacher_fingerprint(tmp_path / "plain")
    a, b = (load_toy_generator("wan", r).transformer.state_dict() for r in (early, final))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the DiT trained on after the snapshot
    assert TextEncoder.from_pretrained(early).max_length == 24 and (early / "vae").is_dir() and (early / "scheduler").is_dir()
    with pytest.raises(ValueError, match="text_freeze_step with ema_decay"):
        pretrain_dit("wan", tmp_path / "both", toy_vae, text_freeze_step=2, ema_decay=0.5, **kw)


def test_object_probe_labels_an_edit_with_the_object_its_words_name():
    """Recolour names the object as it is ("Recolour the yellow triangle to blue." -> a yellow triangle, no
    place); add and move name the target at its new place; remove the removed object, no place."""
    from fusion.toyworld.pretrain import edit_described, object_labels
    from fusion.toyworld.scenes import COLOURS, SHAPES

    tok = toy_tokenizer(48)
    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        src, _, op, tgt = dit_batch(rng, 1, 1.0)[1][0]
        request = edit_prompt(rng, src, op, tgt)
        ids = tok([request], padding="max_length", max_length=48, truncation=True, return_tensors="pt").input_ids
        labels = object_labels(ids, [edit_described(src, op, tgt)], tok)[0]
        at = labels[(labels[:, 0] >= 0)]
        assert len(at) == 1, request  # one shape word per edit request, labelled once
        shape, colour, row, col = at[0].tolist()
        named = next(o for o in src if o.cell == tgt.cell) if op == "recolour" else tgt
        assert (SHAPES[shape], COLOURS[colour]) == (named.shape, named.colour), request
        assert f"{COLOURS[colour]} {SHAPES[shape]}" in request.lower()  # the words the label stands for
        assert ((row, col) == (tgt.row, tgt.col)) if op in ("add", "move") else ((row, col) == (-100, -100)), request
        seen.add(op)
    assert seen == set(OPS)


def test_muon_takes_the_hidden_linear_weights_of_the_toy_dit_and_adamw_the_rest(tmp_path, toy_vae):
    """dit_optimizer=muon: Muon (GroupedMuon) over the DiT's and its encoder's hidden nn.Linear weights only (never
    the output projection, embeddings, convolutions, norms, biases, the probe), AdamW over every other parameter;
    each parameter in exactly one; and a pretraining with it runs, records it and saves a loadable DiT."""
    from torch import nn

    from fusion.toyworld.pretrain import ObjectProbe, toy_optimizers, toy_transformer

    dit, enc, probe = toy_transformer("wan", 4, 64, 2, coord_freqs=1), toy_text_encoder("wan", 40, 64, 1), ObjectProbe(64)
    muon, adamw = toy_optimizers("muon", [dit, enc], 1e-3, plain=(probe,))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    m = {id(p) for g in muon.param_groups for p in g["params"]}
    a = {id(p) for g in adamw.param_groups for p in g["params"]}
    every = {id(p) for mod in (dit, enc, probe) for p in mod.parameters()}
    assert m | a == every and not m & a
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert id(dit.blocks[0].attn1.to_q.weight) in m and id(dit.blocks[0].ffn.net[2].weight) in m
    assert id(dit.proj_out.weight) in a and id(dit.patch_embedding.weight) in a and id(dit.blocks[0].attn1.to_q.bias) in a
    assert all(id(p) in a for p in probe.parameters())
    assert all(id(mod.weight) in a for mod in enc.modules() if isinstance(mod, nn.Embedding))
    assert [type(o) for o in toy_optimizers("adamw", [dit, enc], 1e-3, plain=(probe,))] == [torch.optim.AdamW]
    with pytest.raises(ValueError, match="adamw"):
        toy_optimizers("sgd", [dit, enc], 1e-3)

    stats = pretrain_dit("wan", tmp_path / "wan", toy_vae, steps=6, batch=4, pool_size=16, eval_n=2, text_length=24, progress=False,
                         coord_freqs=1, optimizer="muon")
    assert stats["optimizer"] == "muon" and 0 < stats["last_loss"] < float("inf")
    assert load_toy_generator("wan", tmp_path / "wan").transformer.config.num_layers == 4


@pytest.mark.parametrize("nesterov, weight_decay", [(True, 0.0), (False, 0.1)])
def test_grouped_muon_updates_every_matrix_exactly_as_torch_muon_does(nesterov, weight_decay):
    """GroupedMuon orthogonalises the matrices of one shape together (tall ones transposed, as torch does): after
    three steps on the toy Wan's and its encoder's hidden weights (five shapes, wide and tall) every weight and
    momentum buffer equals torch.optim.Muon's bit for bit, and the step moved them."""
    import copy

    from fusion.toyworld.pretrain import GroupedMuon, toy_optimizers, toy_transformer

    dit, enc = toy_transformer("wan", 4, 64, 2, coord_freqs=1), toy_text_encoder("wan", 40, 64, 1)
    hidden = toy_optimizers("muon", [dit, enc], 1e-3)[0].param_groups[0]["params"]
    assert len({tuple(p.shape) for p in hidden}) >= 4 and any(p.shape[0] > p.shape[1] for p in hidden)
    ours, theirs = [p.detach().clone() for p in hidden], [p.detach().clone() for p in hidden]
    start = copy.deepcopy(ours)
    kw = dict(lr=4e-3, weight_decay=weight_decay, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    grouped, plain = GroupedMuon(ours, **kw), torch.optim.Muon(theirs, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        grouped.step()
        plain.step()
    for a, b, s in zip(ours, theirs, start):
        assert torch.equal(a, b) and not torch.equal(a, s)
        assert torch.equal(grouped.state[a]["momentum_buffer"], plain.state[b]["momentum_buffer"])


def test_the_toy_mllm_pretrains_with_muon_on_its_hidden_layers_only(tmp_path):
    """mllm_optimizer=muon: the language model's and vision tower's hidden linear weights to Muon; the token
    embeddings, the LM head (tied or not), the patch convolution and the norms to AdamW."""
    from torch import nn
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fusion.toyworld.pretrain import toy_optimizers

    stats = pretrain_mllm(tmp_path / "qwen2_5_vl", steps=2, batch=2, hidden_size=64, vision_hidden_size=32, progress=False, optimizer="muon")
    assert stats["optimizer"] == "muon" and 0.0 <= stats["answer_accuracy"] <= 1.0
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "qwen2_5_vl")
    muon, adamw = toy_optimizers("muon", [model], 1e-3)
    m = {id(p) for g in muon.param_groups for p in g["params"]}
    a = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert m | a == {id(p) for p in model.parameters()} and not m & a
    assert id(model.lm_head.weight) in a and id(model.get_input_embeddings().weight) in a
    assert all(id(mod.weight) in a for mod in model.modules() if isinstance(mod, (nn.Embedding, nn.Conv3d)))
    layer = model.model.language_model.layers[0]
    assert id(layer.self_attn.q_proj.weight) in m and id(layer.mlp.down_proj.weight) in m
