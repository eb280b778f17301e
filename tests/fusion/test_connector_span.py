"""``stage.connector_span=since_image``: the connector reads (and hands the DiT) only the context tokens after the
last image, in training (cached or not), in the distillation target, the conditioning gain and generation."""

from __future__ import annotations

import pytest
import torch

from fusion.data import read_jsonl
from fusion.errors import ConfigError
from fusion.generate import Chat, ForceTokens, GenerationSettings
from fusion.model import FusedModel
from tests.conftest import compose_config

SPAN = "stage.connector_span=since_image"


def build(tiny_dir, *extra, connector="last_mlp"):
    cfg = compose_config([f"tiny_dir={tiny_dir}", "stage=align", "generator=tiny_wan", f"connector={connector}",
                          "stage.p_drop_text=0", "stage.p_drop_cond=0", *extra])
    torch.manual_seed(0)
    return FusedModel.build(cfg), cfg


@pytest.fixture(scope="module")
def convs(tiny_dir):
    return list(read_jsonl(tiny_dir / "demo_data" / "conversations.jsonl"))


def test_the_window_starts_after_the_last_image_and_the_per_token_states_are_the_tail(tiny_dir, convs):
    whole, _ = build(tiny_dir)
    span, _ = build(tiny_dir, SPAN)
    span.connector.load_state_dict(whole.connector.state_dict())
    samples = [span.prepare_align_sample(c) for c in convs]
    assert any(s.neg_len > 0 for s in samples) and any(s.neg_len == 0 for s in samples)
    with torch.no_grad():
        for s in samples:
            start = span.connector_start(s.ctx_ids)
            assert start == s.neg_len  # the token after the last image (0: a first drawing reads its whole context)
            assert whole.connector_start(s.ctx_ids) == 0
            states, mask, _ = span.sample_states(s)
            full, _, _ = whole.sample_states(s)
            assert states.shape[1] == len(s.ctx_ids) - start and mask.shape == states.shape[:2]
            # last_mlp is per token (no refiner): the window's states are exactly the tail of the whole context's
            assert torch.allclose(states, full[:, start:], atol=1e-6)
            packed = span.packed_context_states([s])[0]  # the cached / packed path cuts the same window
            assert torch.allclose(span.sample_states(packed)[0], states, atol=1e-5)


def test_the_refiner_reads_only_the_window(tiny_dir, convs):
    span, _ = build(tiny_dir, SPAN, "connector.refiner_layers=1", connector="multilayer_concat")
    s = next(s for s in (span.prepare_align_sample(c) for c in convs) if s.neg_len > 0)
    seen = []
    span.connector.refiner.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        span.sample_states(s)
    assert seen == [len(s.ctx_ids) - s.neg_len]


def test_the_aligned_target_is_the_whole_contexts_cut_to_the_window(tiny_dir, convs):
    from backbones.generator.text_encoder import TextEncoder

    whole, cfg = build(tiny_dir)
    span, _ = build(tiny_dir, SPAN)
    teacher = TextEncoder.from_pretrained(cfg.generator.path)
    whole.set_teacher(teacher)
    span.set_teacher(teacher)
    for s in (span.prepare_align_sample(c) for c in convs):
        t_states, t_mask = span._teacher_states(s.request)
        full, full_real = whole.aligned_teacher(s, t_states, t_mask, len(s.ctx_ids))
        cut, cut_real = span.aligned_teacher(s, t_states, t_mask, len(s.ctx_ids) - s.neg_len)
        assert torch.equal(cut, full[s.neg_len:]) and torch.equal(cut_real, full_real[s.neg_len:])
        assert cut_real.sum() == full_real.sum() > 0  # every teacher token lands in the window: nothing is lost
        with pytest.raises(ConfigError, match="context's token ids"):  # a length that is not the window's
            span.aligned_teacher(s, t_states, t_mask, len(s.ctx_ids) + 1)


def test_distillation_and_gain_train_and_measure_through_the_window(tiny_dir, convs):
    from backbones.generator.text_encoder import TextEncoder
    from fusion.gain import conditioning_gain

    span, cfg = build(tiny_dir, SPAN, "stage.distill_steps=5", "stage.distill_target=aligned", "connector.out_norm=rms_gated",
                      "connector.refiner_layers=1", connector="multilayer_concat")
    span.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
    span.apply_trainable(cfg.stage)
    samples = [span.prepare_align_sample(c) for c in convs]
    span.step = 0
    first = span.align_loss(samples, torch.Generator().manual_seed(3))["distill"].item()
    opt = torch.optim.AdamW(span.connector.parameters(), lr=3e-3)
    for _ in range(6):
        opt.zero_grad()
        span.align_loss(samples, torch.Generator().manual_seed(3))["loss"].backward()
        opt.step()
    assert span.align_loss(samples, torch.Generator().manual_seed(3))["distill"].item() < first
    g = conditioning_gain(span, samples, ts=(0.7,))
    assert "oracle_gain@0.7" in g  # the oracle (teacher states laid on the window) has the window's length


@pytest.mark.parametrize("extra,match", [
    (["stage.connector_span=everything"], "connector_span must be all or since_image"),
    ([SPAN, "stage.text_dropout_form=duogen"], "connector_span=since_image cannot take text_dropout_form=duogen"),
])
def test_bad_span_settings_fail_naming_the_key(extra, match):
    from omegaconf import OmegaConf

    cfg = compose_config(["stage=align", *extra])
    with pytest.raises(ConfigError, match=match):
        OmegaConf.to_object(cfg.stage)  # the stage schema's validation, as tools/train.py runs it


def test_query_connectors_are_refused_a_window(tiny_dir):
    with pytest.raises(ConfigError, match="connector_span=since_image.*connector=Queries reads query states only"):
        build(tiny_dir, SPAN, connector="queries")


def test_generation_hands_the_connector_the_window_and_refuses_a_duogen_negative(tiny_dir, images, tmp_path):
    model, _ = build(tiny_dir, SPAN)
    model.save_pretrained(tmp_path / "model")
    chat = Chat.load(tmp_path / "model", settings=GenerationSettings(steps=2, guidance=2.0, max_new_tokens=12))
    assert chat.model.settings["connector_span"] == "since_image"
    lengths = []
    chat.model.connector.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[2]))
    chat.logits_processor = ForceTokens({2: chat.mllm.bov_token_id, 5: chat.mllm.end_of_turn_id})
    chat.send("Make it blue.", images=[str(images["square"])])
    ids = torch.as_tensor(chat.state.ids)
    bov = int((ids == chat.mllm.bov_token_id).nonzero()[0])
    user_image_end = int((ids[:bov] == chat.mllm.vision_end_id).nonzero()[-1])
    assert lengths == [bov + 1 - (user_image_end + 1)]  # the context up to <|bov|>, after the user's image
    chat.negative = "duogen"
    chat.logits_processor = ForceTokens({1: chat.mllm.bov_token_id, 3: chat.mllm.end_of_turn_id})
    with pytest.raises(ConfigError, match="negative=duogen.*since_image"):
        chat.send("Again.")
