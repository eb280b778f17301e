"""Stage 2's instrument and recipe: the request text an image answers, the generator's own text encoder
(loaded from the pipeline folder), the conditioning gain, and distillation onto that encoder."""

from __future__ import annotations

import math

import pytest
import torch

from fusion.data import parse_conversation, read_jsonl
from fusion.errors import CheckpointError, ConfigError
from fusion.model import FusedModel
from tests.conftest import compose_config


def build(tiny_dir, connector="last_mlp", generator="tiny_wan", extra=()):
    cfg = compose_config([f"tiny_dir={tiny_dir}", "stage=align", f"generator={generator}", f"connector={connector}",
                          "stage.p_drop_text=0", "stage.p_drop_cond=0", *extra])
    return FusedModel.build(cfg), cfg


@pytest.fixture(scope="module")
def convs(tiny_dir):
    return list(read_jsonl(tiny_dir / "demo_data" / "conversations.jsonl"))


def test_text_before_image_is_the_chunk_since_the_previous_image(tmp_path):
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    img = lambda n: {"type": "image", "image": str(tmp_path / f"{n}.png")}  # noqa: E731
    txt = lambda t: {"type": "text", "text": t}  # noqa: E731
    conv = parse_conversation({"messages": [
        {"role": "system", "content": "You draw."},
        {"role": "user", "content": [txt("Draw a red circle.")]},
        {"role": "assistant", "content": [txt("Here it is."), img("a")]},
        {"role": "user", "content": [txt("What is two plus three?")]},
        {"role": "assistant", "content": "Five."},
        {"role": "user", "content": [img("b"), txt("Make the circle blue.")]},
        {"role": "assistant", "content": [txt("Done."), img("c")]},
    ]})
    assert conv.text_before_image(0) == "Draw a red circle. Here it is."
    assert conv.text_before_image(1) == "What is two plus three? Five."  # the user's image: text since the last image
    assert conv.text_before_image(2) == "Make the circle blue. Done."
    with pytest.raises(IndexError, match="3 images"):
        conv.text_before_image(3)
    cut = conv.until_image(1)  # cut just after the user's image: its own message keeps only what comes before it
    assert [r for r, _ in cut.image_items()] == ["assistant", "user"] and cut.messages[0] == conv.messages[0]
    assert cut.messages[-1]["content"] == [img("b")] and len(conv.messages[-2]["content"]) == 2  # the original is untouched
    assert conv.until_image(2).messages == conv.messages
    with pytest.raises(IndexError, match="3 images, no image 3"):
        conv.until_image(3)


def test_text_before_image_in_a_turn_of_several_images_is_each_images_own_words(tmp_path):
    from PIL import Image

    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    img = lambda n: {"type": "image", "image": str(tmp_path / f"{n}.png")}  # noqa: E731
    txt = lambda t: {"type": "text", "text": t}  # noqa: E731
    conv = parse_conversation({"messages": [
        {"role": "user", "content": [txt("Draw a red circle and a blue square, one at a time.")]},
        {"role": "assistant", "content": [txt("Now a red circle."), img("a"), txt("Now a blue square."), img("b")]},
        {"role": "user", "content": [txt("Two more pictures.")]},
        {"role": "assistant", "content": [img("c"), img("d")]},  # no words of its own: the request stands for both
    ]})
    assert conv.text_before_image(0) == "Now a red circle."  # not the request for both steps
    assert conv.text_before_image(1) == "Now a blue square."
    assert conv.text_before_image(2) == "Two more pictures."
    assert conv.text_before_image(3) == ""


@pytest.mark.parametrize("folder,cls", [("wan", "UMT5EncoderModel"), ("cosmos2", "T5EncoderModel"), ("sana", "Gemma2Model")])
def test_tiny_generators_carry_their_family_text_encoder(tiny_dir, folder, cls):
    from backbones.generator.text_encoder import TextEncoder

    te = TextEncoder.from_pretrained(tiny_dir / folder)
    assert type(te.encoder).__name__ == cls and te.max_length == 32
    states, mask = te.encode(["Draw a red circle.", "Add a green triangle at the top left."])
    assert states.shape == (2, 32, te.dim) and mask[0].sum() == 6 and mask[1].sum() == 10
    assert states[0, 6:].abs().max() == 0 and not te.encoder.training
    assert all(not p.requires_grad for p in te.encoder.parameters())


def test_a_folder_without_a_text_encoder_is_refused_by_name(tiny_dir):
    from backbones.generator.text_encoder import TextEncoder

    with pytest.raises(CheckpointError, match="cosmos.*no text_encoder/"):
        TextEncoder.from_pretrained(tiny_dir / "cosmos")  # Predict2.5 reads Cosmos-Reason: no T5 here


def _samples(model, convs):
    return [model.prepare_align_sample(c) for c in convs]


def with_teacher(tiny_dir, convs, connector, generator="tiny_wan", extra=()):
    """A trainable stage-2 model with its generator's own encoder as teacher, and its samples."""
    from backbones.generator.text_encoder import TextEncoder

    model, cfg = build(tiny_dir, connector, generator, extra)
    model.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
    model.apply_trainable(cfg.stage)
    return model, _samples(model, convs)


def seeded():
    return torch.Generator().manual_seed(3)


def distill_after_training_the_connector(model, samples, steps=6) -> float:
    """The distillation loss after a few AdamW steps on the connector alone (the warm-up's job)."""
    opt = torch.optim.AdamW(model.connector.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        model.align_loss(samples, seeded())["loss"].backward()
        opt.step()
    return model.align_loss(samples, seeded())["distill"].item()


def test_samples_carry_the_request_their_target_answers(tiny_dir, convs):
    model, _ = build(tiny_dir)
    reqs = [s.request for s in _samples(model, convs)]
    assert reqs[0] == "Draw a red circle in the middle. Here is a red circle."
    assert reqs[1] == "Move the circle to the left. I moved it."
    assert reqs[2] == "then the triangle:"  # the last image of a multi-image answer: the text since the previous one


def test_gain_reads_zero_when_the_connector_says_nothing_and_is_deterministic(tiny_dir, convs):
    from fusion.gain import conditioning_gain, summary_line

    model, _ = build(tiny_dir)
    samples = _samples(model, convs)
    g1 = conditioning_gain(model, samples, ts=(0.5, 0.7))
    g2 = conditioning_gain(model, samples, ts=(0.5, 0.7))
    assert g1 == g2  # fixed t and noise
    assert {"gain@0.5", "gain@0.7", "shuffle_gain@0.7", "loss_true@0.7", "loss_zero@0.7", "loss_shuffled@0.7"} <= set(g1)
    assert g1["loss_true@0.7"] != g1["loss_zero@0.7"]  # a random connector does change the velocity
    with torch.no_grad():  # a connector whose output is exactly zero carries no condition: gain 0
        for p in model.connector.parameters():
            p.zero_()
    g0 = conditioning_gain(model, samples, ts=(0.5, 0.7))
    assert g0["gain@0.7"] == 0.0 and g0["gain@0.5"] == 0.0
    assert "conditioning gain at t=0.5/0.7" in summary_line(g0, (0.5, 0.7))
    with pytest.raises(ValueError, match="at least 2"):
        conditioning_gain(model, samples[:1])


def test_gain_in_batched_passes_equals_one_pass_per_row(tiny_dir, convs):
    """conditioning_gain runs its (sample, t, condition) rows through the DiT a few at a time (rows_per_pass): every
    loss and gain equals the one-row-a-pass reference to float tolerance, whatever the pass size, with a reference
    encoder and the oracle in the rows too (their lengths differ from the connector's)."""
    from fusion.gain import conditioning_gain

    model, samples = with_teacher(tiny_dir, convs, "last_mlp")
    ref = conditioning_gain(model, samples, ts=(0.3, 0.7), batch=False, rows_per_pass=1)
    assert {"loss_reference@0.7", "loss_reference_real@0.7", "loss_oracle@0.7", "loss_shuffled@0.3"} <= set(ref)
    for rows in (3, 64):
        got = conditioning_gain(model, samples, ts=(0.3, 0.7), rows_per_pass=rows)
        assert set(got) == set(ref)
        assert all(got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6) for k in ref), rows


def test_gain_with_the_dits_own_encoder_as_reference(tiny_dir, convs):
    from backbones.generator.text_encoder import TextEncoder
    from fusion.gain import conditioning_gain, summary_line

    model, cfg = build(tiny_dir)
    model.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
    samples = _samples(model, convs)
    g = conditioning_gain(model, samples, ts=(0.7,))
    assert "reference_gain@0.7" in g and g["loss_reference@0.7"] != g["loss_reference_zero@0.7"]
    # its real tokens alone read as its padded states when the generator pads to the length the DiT knows
    assert model.generator.text_length == model.teacher.max_length
    assert g["reference_real_gain@0.7"] == pytest.approx(g["reference_gain@0.7"], abs=1e-6)
    model.generator.text_length = None  # no padding: the Wan DiT attends fewer zeros and reads something else
    g = conditioning_gain(model, samples, ts=(0.7,))
    assert abs(g["reference_real_gain@0.7"] - g["reference_gain@0.7"]) > 1e-4
    assert "its real tokens alone" in summary_line(g, (0.7,))


def test_a_teacher_of_another_width_is_refused(tiny_dir):
    from backbones.generator.text_encoder import TextEncoder, tiny_encoder

    model, _ = build(tiny_dir)
    te = TextEncoder.from_pretrained(tiny_dir / "wan")
    wider = TextEncoder(te.tokenizer, tiny_encoder("UMT5EncoderModel", len(te.tokenizer), 48, 1, 2), te.max_length)
    with pytest.raises(ConfigError, match="48 wide but its DiT reads 32"):
        model.set_teacher(wider)


@pytest.mark.parametrize("generator,folder", [("tiny_wan", "wan"), ("tiny_cosmos", "cosmos2"), ("tiny_sana", "sana")])
def test_velocity_distillation_warm_up_then_auxiliary(tiny_dir, convs, generator, folder):
    model, samples = with_teacher(tiny_dir, convs, "last_mlp", generator,
                                  ["stage.distill_steps=2", "stage.distill_weight=0.5", f"generator.path={tiny_dir / folder}"])
    model.step = 0
    warm = model.align_loss(samples, seeded())
    assert warm["distill"] > 0 and torch.allclose(warm["loss"], warm["distill"])  # warm-up: distillation alone
    model.step = 2
    after = model.align_loss(samples, seeded())
    assert torch.allclose(after["loss"], after["flow"] + 0.5 * after["distill"])
    # the connector learns to make the DiT predict what its own encoder makes it predict
    model.step = 0
    assert distill_after_training_the_connector(model, samples) < warm["distill"].item()


@pytest.mark.parametrize("connector,frames", [("multilayer_concat", "learned"), ("multiscale_queries", "all")])
def test_text_only_samples_reach_the_distillation_and_no_other_loss(tiny_dir, convs, connector, frames):
    """stage.distill_data's samples (AlignSample.text_only: a stand-in drawing): the distillation reads them, the flow loss,
    a query connector's alignment loss and the frame head do not (before and after the warm-up)."""
    from dataclasses import replace

    extra = ["stage.distill_steps=1", "stage.distill_weight=1", "stage.distill_target=set", f"stage.frame_select={frames}"]
    model, samples = with_teacher(tiny_dir, convs, connector, extra=extra)
    drawn = [s for s in samples if s.cond is not None][:1]  # with an earlier image: the frame head has a label to learn
    stand_in = [replace(s, text_only=True) for s in samples if s.cond is not None][1:3]  # frames and all: still distillation only
    for step in (0, 1):  # the warm-up (no DiT pass for per-token connectors), then flow + distillation
        model.step = step
        alone = model.align_loss(drawn, seeded())
        mixed = model.align_loss(drawn + stand_in, seeded())  # the drawn sample draws its dropout, t and noise first: the same
        assert torch.allclose(mixed["flow"], alone["flow"]) and mixed["distill"] != alone["distill"]
        key = "frame_select" if frames == "learned" else "align"
        if step or key == "frame_select":  # (the warm-up of a query connector runs the DiT for its alignment loss too)
            assert key in alone and torch.allclose(mixed[key], alone[key]), key


def test_state_distillation_needs_the_teachers_length(tiny_dir, convs):
    from backbones.generator.text_encoder import TextEncoder

    model, cfg = build(tiny_dir, "last_mlp", extra=["stage.distill_steps=1", "stage.distill_target=states"])
    model.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
    with pytest.raises(ConfigError, match="num_queries=32"):
        model.align_loss(_samples(model, convs[:1]), torch.Generator().manual_seed(0))
    model, cfg = build(tiny_dir, "resampler", extra=["stage.distill_steps=1", "stage.distill_target=states", "connector.num_queries=32"])
    model.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
    out = model.align_loss(_samples(model, convs[:2]), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert out["distill"] > 0 and model.connector.proj.weight.grad.abs().sum() > 0


def test_the_distillation_target_switches_at_its_step(tiny_dir, convs):
    """stage.distill_target_late: set (no DiT pass) before distill_target_switch, velocity (the DiT judges) from it on."""
    extra = ["stage.distill_steps=4", "stage.distill_target=set", "stage.distill_target_late=velocity", "stage.distill_target_switch=2",
             "connector.num_queries=8"]
    model, samples = with_teacher(tiny_dir, convs, "resampler", extra=extra)
    got = {}
    for step in (1, 2):
        model.step = step
        got[step] = model.align_loss(samples, seeded())["distill"]
        assert model.distill_target() == ("set" if step == 1 else "velocity")
    model.settings["distill_target_late"] = None  # the same model with one target throughout gives the same figures
    for step, target in ((1, "set"), (2, "velocity")):
        model.step = step
        model.settings["distill_target"] = target
        torch.testing.assert_close(model.align_loss(samples, seeded())["distill"], got[step])
    assert not torch.allclose(got[1], got[2])


def test_the_early_target_can_be_kept_beside_the_late_one(tiny_dir, convs):
    """stage.distill_keep_weight: from the switch on, the loss is the late target's plus the early one's at that weight."""
    extra = ["stage.distill_steps=4", "stage.distill_target=set", "stage.distill_target_late=velocity", "stage.distill_target_switch=2",
             "connector.num_queries=8", "stage.distill_keep_weight=0.5"]
    model, samples = with_teacher(tiny_dir, convs, "resampler", extra=extra)
    model.step = 1  # before the switch: the early target alone, nothing kept
    assert "distill_kept" not in model.align_loss(samples, seeded())
    model.step = 2
    both = model.align_loss(samples, seeded())
    model.settings["distill_target_late"] = None  # the set target alone at the same step gives the kept term
    model.settings["distill_target"] = "set"
    torch.testing.assert_close(both["distill_kept"], model.align_loss(samples, seeded())["distill"])
    model.settings.update(distill_target="set", distill_target_late="velocity", distill_keep_weight=0.0)
    alone = model.align_loss(samples, seeded())
    assert "distill_kept" not in alone
    torch.testing.assert_close(both["distill"], alone["distill"])
    torch.testing.assert_close(both["loss"], alone["loss"] + 0.5 * both["distill_kept"])
    both["loss"].backward()
    assert model.connector.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides,msg", [(["stage.distill_target_late=logits", "stage.distill_target_switch=5"], "distill_target_late must be"),
                                           (["stage.distill_target_late=velocity"], "distill_target_switch > 0"),
                                           (["stage.distill_keep_weight=1"], "distill_keep_weight keeps the early"),
                                           (["stage.distill_target=set", "stage.distill_target_late=velocity", "stage.distill_target_switch=5",
                                             "stage.distill_keep_weight=-1"], "distill_keep_weight must be >= 0"),
                                           (["stage.lr_late_scale=0.5"], "lr_late_scale scales the learning rate"),
                                           (["stage.distill_target=set", "stage.distill_target_late=velocity", "stage.distill_target_switch=5",
                                             "stage.lr_late_scale=0"], "lr_late_scale must be > 0")])
def test_a_late_distillation_target_is_validated(overrides, msg):
    from omegaconf import OmegaConf

    cfg = compose_config(["stage=align", *overrides])
    with pytest.raises(ConfigError, match=msg):
        OmegaConf.to_object(cfg.stage)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_late_target_trains_at_its_own_rate(schedule):
    """stage.lr_late_scale: every group's multiplier (the one the trainer's LambdaLR uses) scaled from the switch on,
    warm-up and the generator's frozen steps kept; without it the schedule is the plain one."""
    from omegaconf import OmegaConf

    from fusion.train import lr_multipliers

    base = ["stage=align", "stage.warmup_steps=10", "stage.max_steps=100", "stage.generator_frozen_steps=50", f"stage.lr_schedule={schedule}",
            "stage.distill_target=set", "stage.distill_target_late=velocity", "stage.distill_target_switch=40"]
    scaled, plain = compose_config([*base, "stage.lr_late_scale=0.25"]), compose_config(base)
    OmegaConf.to_object(scaled.stage)  # a valid setting
    conn, gen = lr_multipliers(scaled.stage, ["connector", "generator"])
    conn1, gen1 = lr_multipliers(plain.stage, ["connector", "generator"])
    assert conn(4) == conn1(4) == pytest.approx(0.5)  # warm-up: (step + 1) / warmup_steps, untouched before the switch
    assert conn(39) == conn1(39) > 0.5
    for step in (40, 60, 99):
        assert conn(step) == pytest.approx(0.25 * conn1(step)) and conn1(step) > 0
    assert gen(45) == gen1(45) == 0.0  # still frozen after the switch
    assert gen(50) == pytest.approx(0.25 * gen1(50)) and gen1(50) > 0
    assert conn1(40) == (1.0 if schedule == "constant" else pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90))))


@pytest.mark.parametrize("key,value,msg", [("distill_target", "logits", "velocity, states, set or aligned"), ("distill_steps", "-1", "distill_steps"),
                                           ("gain_samples", "1", "gain_samples")])
def test_bad_recipe_settings_fail_naming_the_key(key, value, msg):
    from omegaconf import OmegaConf

    cfg = compose_config(["stage=align", f"stage.{key}={value}"])
    with pytest.raises(Exception, match=msg):
        OmegaConf.to_object(cfg.stage)


def test_set_distillation_is_blind_to_order_and_sends_the_rest_to_zero():
    from fusion.model import set_distill_loss

    g = torch.Generator().manual_seed(0)
    teacher = torch.zeros(1, 8, 4)
    teacher[0, :3] = torch.randn(3, 4, generator=g)
    t_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])
    states = torch.zeros(1, 6, 4)
    states[0, [4, 0, 2]] = teacher[0, [0, 1, 2]]  # the teacher's tokens in another order, zeros around them
    ones = torch.ones(1, 6)
    assert set_distill_loss(states, ones, teacher, t_mask).item() == 0.0
    noisy = states.clone()
    noisy[0, 1] = 0.5  # a token that should be padding says something
    assert set_distill_loss(noisy, ones, teacher, t_mask).item() == pytest.approx(0.25 * 4 / 24)
    masked = torch.tensor([[1, 0, 1, 1, 1, 1]])  # an invalid connector token is not counted
    assert set_distill_loss(noisy, masked, teacher, t_mask).item() == 0.0
    wrong = states.clone().requires_grad_(True)
    loss = set_distill_loss(wrong * 0.5, ones, teacher, t_mask)  # right layout, wrong scale: a gradient toward the teacher
    loss.backward()
    assert loss > 0 and wrong.grad[0, 4].abs().sum() > 0 and wrong.grad[0, 1].abs().sum() == 0


def test_set_distillation_trains_a_per_token_connector(tiny_dir, convs):
    model, samples = with_teacher(tiny_dir, convs, "multilayer_concat",
                                  extra=["stage.distill_steps=5", "stage.distill_target=set", "connector.out_norm=rms_gated"])
    model.step = 0
    first = model.align_loss(samples, seeded())
    assert first["distill"] > 0 and torch.allclose(first["loss"], first["distill"])
    assert distill_after_training_the_connector(model, samples) < first["distill"].item()


# ---- distill_target=aligned: the teacher's states on the context tokens that say the same words
def _tokenizers():
    from backbones.generator.text_encoder import TINY_WORDS, word_tokenizer
    from backbones.mllm.tiny_qwen2_5_vl import build_tokenizer

    return build_tokenizer(), word_tokenizer(list(TINY_WORDS), 32)


CTX = ("<|im_start|>system\nYou draw.<|im_end|>\n<|im_start|>user\nDraw a red circle at the top left.<|im_end|>\n"
       "<|im_start|>assistant\nHere it is.")


def test_alignment_finds_each_teacher_word_on_the_context_token_that_ends_it():
    from fusion.distill import align_request, context_pieces

    mllm_tok, teacher_tok = _tokenizers()
    pieces = context_pieces(mllm_tok, mllm_tok(CTX)["input_ids"])  # Qwen-style byte-level BPE pieces
    request = "Draw a red circle at the top left. Here it is."
    al = align_request(pieces, request, teacher_tok)
    words = teacher_tok.convert_ids_to_tokens(teacher_tok(request)["input_ids"])
    assert words[-1] == "</s>" and al.positions[-1] == len(pieces) - 1 and al.missed == 0  # </s>: the last token
    for word, p in zip(words[:-1], al.positions[:-1]):
        assert "".join(pieces[: p + 1]).lower().endswith(word), (word, pieces[p])  # "Here" is 'H' 'e' 're': lands on 're'
    user = [p for w, p in zip(words, al.positions) if w in ("draw", "red", "left")]
    assert user == sorted(user) and pieces[user[0]] == "Draw"  # in order, in the user turn, not the system prompt
    # the same words earlier in the conversation are never taken when the request starts after them
    twice = CTX + "<|im_end|>\n<|im_start|>user\nDraw a red circle at the top left.<|im_end|>\n<|im_start|>assistant\nHere it is."
    pieces2 = context_pieces(mllm_tok, mllm_tok(twice)["input_ids"])
    start = len(pieces) + 1
    al2 = align_request(pieces2, request, teacher_tok, start=start)
    assert min(al2.positions) >= start and al2.missed == 0
    missing = align_request(pieces, "Draw a blue square.", teacher_tok)  # words the context does not hold
    assert missing.missed == 2 and missing.positions.count(-1) == 2


def test_aligned_target_and_loss():
    from fusion.distill import aligned_distill_loss, aligned_target

    t = torch.arange(12.0).reshape(3, 4)
    target, real = aligned_target(t, [2, 2, 5, -1], 7)  # two teacher tokens on one context token are averaged
    assert real.tolist() == [False, False, True, False, False, True, False]
    assert torch.equal(target[2], (t[0] + t[1]) / 2) and torch.equal(target[5], t[2]) and target[~real].abs().sum() == 0
    assert aligned_distill_loss(target.clone(), target, real).item() == 0.0
    states = target.clone()
    states[0] = 2.0  # a template token that says something: pulled to zero, weighted against its own kind only
    assert aligned_distill_loss(states, target, real).item() == pytest.approx(0.5 * 4 * 4 / (5 * 4))
    states = target.clone().requires_grad_(True)
    loss = aligned_distill_loss(states * 0.5, target, real)
    loss.backward()
    assert loss > 0 and states.grad[2].abs().sum() > 0 and states.grad[0].abs().sum() == 0


def test_the_refiner_starts_near_the_identity_and_reads_both_ways():
    from connectors.common import Refiner

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 16, generator=g)
    mask = torch.ones(1, 6)
    assert torch.equal(Refiner(16, 0)(x, mask), x)
    torch.manual_seed(0)
    r = Refiner(16, 1, 4)
    y = r(x, mask)
    assert (y - x).abs().max() < 0.05  # the residual branches start small
    with torch.no_grad():
        for blk in r.encoder.layers:
            torch.nn.init.normal_(blk.self_attn.out_proj.weight, std=0.3)
    later = x.clone()
    later[0, 5] += torch.randn(16, generator=g)  # (a constant shift would vanish in the pre-norm)
    assert (r(later, mask)[0, 0] - r(x, mask)[0, 0]).abs().max() > 1e-3  # the first token reads the last one
    masked = torch.tensor([[1, 1, 1, 1, 1, 0]])
    assert torch.allclose(r(later, masked)[0, :5], r(x, masked)[0, :5], atol=1e-6)  # a masked token is not read
    with pytest.raises(ValueError, match="refiner_heads=5"):
        Refiner(16, 1, 5)


def test_a_windowed_projection_reads_its_neighbours_and_never_the_padding():
    from connectors.multilayer_concat import MultilayerConcat

    torch.manual_seed(0)
    c = MultilayerConcat(32, 16, 2, window=5, out_norm="none")  # no refiner: what each token reads is the window alone
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 2, 9, 32, generator=g)
    mask = torch.ones(2, 9)
    mask[1, 7:] = 0
    out = c(h, mask).states
    poked = h.clone()
    poked[0, :, 4] = torch.randn(2, 32, generator=g)  # (a constant shift would vanish in the per-token norm)
    moved = (c(poked, mask).states[0] - out[0]).abs().amax(-1)
    assert (moved[2:7] > 1e-4).all() and (moved[[0, 1, 7, 8]] == 0).all()  # tokens 2..6 read token 4, the others do not
    padded = h.clone()
    padded[1, :, 7:] = torch.randn(2, 2, 32, generator=g)
    assert torch.equal(c(padded, mask).states[1, :7], out[1, :7])  # padding is never read
    with pytest.raises(ValueError, match="window must be odd"):
        MultilayerConcat(32, 16, 2, window=4)
    with pytest.raises(ValueError, match="needs projection=linear"):
        MultilayerConcat(32, 16, 2, window=3, projection="mlp")


def test_the_window_is_validated_by_its_config_key():
    from fusion.config import validate
    from fusion.errors import ConfigError
    from tests.conftest import compose_config

    validate(compose_config(["connector=multilayer_concat", "connector.window=9"]))
    with pytest.raises(ConfigError, match="connector.window must be a positive odd number, got 4"):
        validate(compose_config(["connector=multilayer_concat", "connector.window=4"]))
    with pytest.raises(ConfigError, match="connector.window=3 needs connector.projection=linear, got 'mlp'"):
        validate(compose_config(["connector=multilayer_concat", "connector.window=3", "connector.projection=mlp"]))


def test_a_wider_refiner_starts_near_the_identity_reads_both_ways_and_learns():
    from connectors.common import Refiner

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 16, generator=g)
    mask = torch.ones(2, 6)
    torch.manual_seed(0)
    r = Refiner(16, 2, 4, width=48)
    assert r.encoder.layers[0].self_attn.embed_dim == 48
    assert (r(x, mask) - x).abs().max() < 0.05  # lifted, refined, added back through a near-zero projection
    target = x.flip(1)  # each token must become another one: only attention across the sequence can do it
    opt = torch.optim.Adam(r.parameters(), lr=3e-3)
    start = torch.nn.functional.mse_loss(r(x, mask), target).item()
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(r(x, mask), target)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * start
    masked = torch.tensor([[1, 1, 1, 1, 1, 0]] * 2)
    later = x.clone()
    later[:, 5] += 1.0
    assert torch.allclose(r(later, masked)[:, :5], r(x, masked)[:, :5], atol=1e-5)  # a masked token is not read
    with pytest.raises(ValueError, match="refiner_heads=5 must divide the refiner's width 48"):
        Refiner(16, 1, 5, width=48)


@pytest.mark.parametrize("connector,width", [("last_mlp", None), ("multilayer_concat", None), ("layer_mix", None), ("multilayer_concat", 48)])
def test_aligned_distillation_trains_a_per_token_connector_with_its_refiner(tiny_dir, convs, connector, width):
    model, samples = with_teacher(tiny_dir, convs, connector, extra=["stage.distill_steps=5", "stage.distill_target=aligned",
                                                                      "connector.out_norm=rms_gated", "connector.refiner_layers=1",
                                                                      *([f"connector.refiner_width={width}"] if width else [])])
    assert model.connector.refiner.layers == 1
    assert model.connector.refiner.encoder.layers[0].self_attn.embed_dim == (width or model.generator.text_dim)
    model.step = 0
    velocity = model.generator.velocity
    model.generator.velocity = None  # the warm-up on the states alone never runs the DiT
    first = model.align_loss(samples, seeded())
    model.generator.velocity = velocity
    assert first["distill"] > 0 and torch.allclose(first["loss"], first["distill"]) and first["flow"] == 0
    first["loss"].backward()  # ... yet every trainable DiT weight gets a (zero) gradient, as ZeRO expects
    dit = [p for p in model.generator.parameters() if p.requires_grad]
    assert dit and all(p.grad is not None and p.grad.abs().sum() == 0 for p in dit)
    model.zero_grad()
    assert distill_after_training_the_connector(model, samples) < first["distill"].item()


def test_aligned_distillation_needs_a_per_token_connector(tiny_dir, convs):
    model, samples = with_teacher(tiny_dir, convs, "resampler", extra=["stage.distill_steps=1", "stage.distill_target=aligned"])
    model.step = 0
    with pytest.raises(ConfigError, match="per-token connector.*Resampler"):
        model.align_loss(samples[:1], seeded())


def test_gain_reports_the_aligned_oracle_for_a_per_token_connector(tiny_dir, convs):
    from fusion.gain import conditioning_gain, summary_line

    model, samples = with_teacher(tiny_dir, convs, "last_mlp")
    g = conditioning_gain(model, samples, ts=(0.7,))
    assert "oracle_gain@0.7" in g and g["loss_oracle@0.7"] != g["loss_zero@0.7"]
    assert "laid on the context" in summary_line(g, (0.7,))
    # the oracle is the teacher's own states: a connector that emits them exactly scores the oracle's gain
    targets = [model.aligned_teacher(s, *model._teacher_states(s.request), len(s.ctx_ids))[0] for s in samples]
    index = {id(s): i for i, s in enumerate(samples)}
    model.sample_states = lambda s, length=None: (targets[index[id(s)]][None], torch.ones(1, len(s.ctx_ids)), None)
    g2 = conditioning_gain(model, samples, ts=(0.7,))
    assert g2["gain@0.7"] == pytest.approx(g2["oracle_gain@0.7"], abs=1e-6)


def test_gain_ratio_is_undefined_where_the_dit_reads_no_text_itself():
    """The headline ratio (fused gain / the DiT's own-encoder gain) at t=0.7 and 0.9: a reference gain under
    RATIO_FLOOR gives None (a DiT that needs no text at that t would otherwise give 0.003 / 0.0004 = 7.5, "met")."""
    from fusion.gain import RATIO_FLOOR, gain_ratios

    g = {"gain@0.7": 0.003, "reference_gain@0.7": 0.0004, "gain@0.9": 0.55, "reference_gain@0.9": 0.675, "gain@0.5": 0.1}
    r = gain_ratios(g)
    assert r["gain_ratio@0.7"] is None and r["gain@0.7"] == 0.003 and r["reference_gain@0.7"] == 0.0004
    assert r["gain_ratio@0.9"] == pytest.approx(0.55 / 0.675)
    assert "gain_ratio@0.5" not in r
    assert gain_ratios({"gain@0.7": 0.2, "reference_gain@0.7": RATIO_FLOOR})["gain_ratio@0.7"] == pytest.approx(0.2 / RATIO_FLOOR)
    assert gain_ratios({"gain@0.7": 0.2}) == {"gain@0.7": 0.2}  # no reference: no ratio


def test_report_tables_say_undefined_for_a_missing_ratio():
    from rich.console import Console

    from fusion.toyworld.report import markdown, metrics_table
    from fusion.toyworld.run import format_table

    report = {"trigger_f1": 0.98, "gain@0.7": 0.003, "reference_gain@0.7": 0.0, "gain_ratio@0.7": None, "gain_ratio@0.9": 0.8}
    assert "| gain_ratio@0.7 | n/a (its DiT's own gain < 0.05) |" in markdown(report)
    assert "| gain_ratio@0.9 | 0.800 |" in format_table(report)
    console = Console(width=200, record=True)
    console.print(metrics_table(report, "t"))
    text = console.export_text()
    assert "undefined" in text and "met" in text


def test_gain_warning_watches_the_t_where_the_dits_own_encoder_reads_text():
    from fusion.gain import gain_warning

    # a DiT that needs no text at 0.7 (its own encoder gains 0.000 there): a connector at 0.55 of 0.9 is read, no warning
    reading = {"gain@0.7": 0.003, "reference_gain@0.7": 0.0, "gain@0.9": 0.55, "reference_gain@0.9": 0.675}
    assert gain_warning(reading, 0.05) is None
    blind = dict(reading, **{"gain@0.9": 0.01})
    assert "t=0.9 is 0.010" in gain_warning(blind, 0.05) and "own text encoder: 0.675" in gain_warning(blind, 0.05)
    # no reference: t=0.7, as before
    assert "t=0.7 is 0.003" in gain_warning({"gain@0.7": 0.003, "gain@0.9": 0.5}, 0.05)
    assert gain_warning({"gain@0.7": 0.2}, 0.05) is None


def test_erosion_warning_when_the_dits_own_gain_wears_away():
    from fusion.gain import erosion_warning

    def own(step, *g):
        return {"step": step, **{f"reference_gain@{t:g}": v for t, v in zip((0.3, 0.5, 0.7, 0.9), g)}}

    # measured: the toy demo's stage 2 (frame head untrained at step 0, the DiT at 0.1x in its last 1000 steps) ...
    demo = [own(0, 0.136, 0.229, 0.365, 0.465), own(500, 0.203, 0.357, 0.736, 0.966), own(3000, 0.203, 0.357, 0.736, 0.966),
            own(3500, 0.183, 0.352, 0.727, 0.970), own(4000, 0.187, 0.352, 0.727, 0.970)]
    assert all(erosion_warning(demo[:i], demo[i], 0.25) is None for i in range(len(demo)))  # rising, then -10% at most
    # ... and the resampler's run with the DiT trained at 2.5e-4 from step 2000: warned, at the t that fell most
    worn = own(2500, -0.013, -0.048, 0.327, 0.811)
    msg = erosion_warning(demo[:3], worn, 0.25)
    assert msg is not None and "t=0.5 fell from 0.357 (step 500) to -0.048 (-113%)" in msg and "stage.erosion_warn=0.25" in msg
    assert erosion_warning(demo[:3], worn, 0.0) is None  # off
    # the threshold: a fall of 10% at t=0.3 warns only under a threshold below 0.10
    slight = own(3500, 0.183, 0.357, 0.736, 0.966)
    assert erosion_warning(demo[:3], slight, 0.25) is None and "t=0.3 fell from 0.203" in erosion_warning(demo[:3], slight, 0.05)
    # no reference (a generator without its text encoder), no earlier measurement, or nothing read to fall from
    assert erosion_warning([{"step": 0, "gain@0.7": 0.5}], {"gain@0.7": 0.1}, 0.25) is None
    assert erosion_warning([], worn, 0.25) is None
    assert erosion_warning([own(0, 0.01, 0.02, 0.03, 0.04)], own(500, 0.0, 0.0, 0.0, 0.0), 0.25) is None


def test_erosion_warn_is_validated():
    from fusion.config import StageConfig

    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="stage.erosion_warn"):
            StageConfig(name="align", erosion_warn=bad)
    assert StageConfig(name="align", erosion_warn=0.0).erosion_warn == 0.0
