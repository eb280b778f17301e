"""stage.frame_select: which earlier images the DiT gets (all, latest, a learned head) in training and in generation."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from fusion.data import parse_conversation
from fusion.errors import CheckpointError, ConfigError, DataError
from fusion.flow import target_velocity
from fusion.frames import FrameSelector, best_frames, image_spans
from fusion.generate import Chat, ForceTokens, GenerationSettings
from fusion.model import FusedModel
from tests.fusion.test_model import build, convs  # noqa: F401  (the fixture)

LEARNED = ["stage.frame_select=learned", "stage.p_drop_text=0", "stage.p_drop_cond=0"]


@pytest.fixture(scope="module")
def two_frames(tiny_dir):
    """A user shows two images and asks for an edit of the second: the target has two earlier images."""
    root = tiny_dir / "demo_data"
    img = lambda k: {"type": "image", "image": str(root / "images" / f"{k}.png")}  # noqa: E731
    msgs = [{"role": "user", "content": [img("red_circle"), img("blue_square"), {"type": "text", "text": "Add a green triangle to the second one."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Done."}, img("blue_square_green_tri")]}]
    return parse_conversation({"messages": msgs})


def test_image_spans_and_selector_scores_every_frame_and_none():
    ids = torch.tensor([5, 1, 9, 9, 2, 7, 1, 9, 2, 7, 7])
    assert image_spans(ids, 1, 2) == [(1, 4), (6, 8)]
    sel = FrameSelector(mllm_dim=16, dim=8)
    logits = sel(torch.randn(3, len(ids), 16), image_spans(ids, 1, 2))
    assert logits.shape == (3,)  # two images and none
    assert sel(torch.randn(3, 4, 16), []).shape == (1,)


class StubGenerator:
    """The velocity is right only when the one condition frame is ``good`` (or, with ``none_best``, when there is none)."""

    def __init__(self, good, none_best=False):
        self.good, self.none_best = good, none_best

    def batched_velocity(self, rows, batch=True):
        out = []
        for r in rows:
            right = (r.cond is None) if self.none_best else (r.cond is not None and torch.equal(r.cond[0], self.good))
            out.append(self.v if right else torch.zeros_like(self.v))
        return out, [None] * len(rows)


def test_best_frames_is_the_frame_with_the_lowest_flow_loss():
    x, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    cond = torch.randn(3, 4, 2, 2)
    states, mask = torch.zeros(2, 8), torch.ones(2, dtype=torch.long)
    for good in range(3):
        gen = StubGenerator(cond[good])
        gen.v = target_velocity(x, noise)[0]
        [(best, losses)] = best_frames(gen, [(x, noise, cond, states, mask)], 0.8)
        assert best == good and losses.shape == (4,) and float(losses[good]) == 0.0
    gen = StubGenerator(None, none_best=True)
    gen.v = target_velocity(x, noise)[0]
    two = best_frames(gen, [(x, noise, cond, states, mask), (x, noise, cond[:2], states, mask)], 0.8)  # one DiT call for both
    assert [b for b, _ in two] == [3, 2]  # none, whatever the number of frames


def dit_calls(model, samples, seed=0):
    """The rows of every DiT call (``batched_velocity``) of one stage-2 loss, and the loss."""
    calls = []
    real = model.generator.batched_velocity

    def spy(rows, **kw):
        calls.append(rows)
        return real(rows, **kw)

    model.generator.batched_velocity = spy
    try:
        out = model.align_loss(samples, torch.Generator().manual_seed(seed))
    finally:
        del model.generator.batched_velocity
    return calls, out


def dit_frames(model, samples, seed=0):
    """The number of condition frames of every DiT row of one stage-2 loss's flow pass (the frame probes run each
    sample's candidates), and the loss."""
    calls, out = dit_calls(model, samples, seed)
    return [0 if r.cond is None else r.cond.shape[0] for rows in calls if len(rows) == len(samples) for r in rows], out


def test_all_latest_and_learned_hand_the_dit_the_frames_they_say(tiny_dir, two_frames):
    torch.manual_seed(0)
    counts = {}
    for mode in ("all", "latest", "learned"):
        model, cfg = build(tiny_dir, "multilayer_concat", extra=[f"stage.frame_select={mode}", "stage.p_drop_text=0", "stage.p_drop_cond=0"])
        model.apply_trainable(cfg.stage)
        samples = [model.prepare_align_sample(two_frames)]
        assert samples[0].cond.shape[0] == 2
        counts[mode], out = dit_frames(model, samples)
        assert ("frame_select" in out) == (mode == "learned")
    assert counts["all"] == [2] and counts["latest"] == [1] and counts["learned"][0] in (0, 1)


def test_learned_head_fits_the_frame_its_dit_prefers_and_survives_save_load(tiny_dir, two_frames, convs, tmp_path):
    torch.manual_seed(0)
    model, cfg = build(tiny_dir, "multilayer_concat", extra=LEARNED)
    model.apply_trainable(cfg.stage)
    assert model.frame_selector is not None and all(p.requires_grad for p in model.frame_selector.parameters())
    assert "frame_selector" in [g["name"] for g in model.param_groups(cfg.stage)]
    samples = [model.prepare_align_sample(c) for c in [two_frames, *convs]]
    opt = torch.optim.AdamW(model.frame_selector.parameters(), lr=1e-2)
    model.connector.requires_grad_(False)
    model.generator.transformer.requires_grad_(False)
    first = model.align_loss(samples, torch.Generator().manual_seed(1))
    assert first["frame_select"] > 0
    for _ in range(30):
        opt.zero_grad()
        out = model.align_loss(samples, torch.Generator().manual_seed(1))  # same t and noise: the same preferred frames
        out["frame_select"].backward()
        opt.step()
    assert float(out["frame_select"].detach()) < 0.1 * float(first["frame_select"].detach()) and float(out["frame_acc"]) == 1.0
    model.eval()
    saved = model.save_pretrained(tmp_path / "fused", config=cfg)
    assert (saved / "frame_selector" / "model.safetensors").is_file()
    loaded = FusedModel.from_pretrained(saved)
    for k, v in model.frame_selector.state_dict().items():
        assert torch.equal(v, loaded.frame_selector.state_dict()[k]), k
    s = loaded.packed_context_states([loaded.prepare_align_sample(two_frames)])[0]
    frames = loaded.condition_frames(s)
    k = loaded.pick_frame(s.ctx_hidden, s.ctx_ids)
    assert (frames is None) == (k is None) and (k is None or torch.equal(frames[0], s.cond[k]))


def probe_rows(model, samples, seed=0):
    """The number of rows of each frame-probe DiT call of one stage-2 loss (every call but the flow pass), and the loss."""
    calls, out = dit_calls(model, samples, seed)
    return [len(rows) for rows in calls if len(rows) != len(samples)], out


@pytest.mark.parametrize("memo", [True, False])
def test_a_frozen_dits_frame_labels_are_probed_once_per_sample(tiny_dir, two_frames, memo):
    """stage.frame_label_memo: while the DiT is frozen (stage.generator_frozen_steps) a sample's preferred frame is
    probed once (three candidates x two fixed noises) and reused, the same label in a new model (as after a resume);
    once the DiT trains, and with the memo off, every step probes afresh with the step's noise (three candidates)."""
    from backbones.generator.text_encoder import TextEncoder

    def fresh():
        torch.manual_seed(0)
        model, cfg = build(tiny_dir, "multilayer_concat", extra=[*LEARNED, "stage.generator_frozen_steps=3",
                                                                 f"stage.frame_label_memo={str(memo).lower()}"])
        model.set_teacher(TextEncoder.from_pretrained(cfg.generator.path))
        model.apply_trainable(cfg.stage)
        return model

    model = fresh()
    samples = [replace(model.prepare_align_sample(two_frames), where="train.jsonl:7")]
    assert samples[0].cond.shape[0] == 2
    first, out0 = probe_rows(model, samples, seed=0)
    again, out1 = probe_rows(model, samples, seed=1)  # another step: other noise
    assert first == ([6] if memo else [3]) and again == ([] if memo else [3])
    if memo:  # the label is the sample's own: the head's cross-entropy (same head, same logits) is the same
        assert torch.equal(out0["frame_select"], out1["frame_select"])
        other = fresh()
        _, out2 = probe_rows(other, [replace(other.prepare_align_sample(two_frames), where="train.jsonl:7")], seed=5)
        assert torch.equal(out0["frame_select"], out2["frame_select"])
    model.step = 3  # the DiT trains from here: its preferences move, so every step asks it
    for seed in (2, 3):
        assert probe_rows(model, samples, seed=seed)[0] == [3]
    model.step = 0  # (a model that never trains its DiT again would start a new memo)
    assert probe_rows(model, samples)[0] == ([6] if memo else [3])


def test_chat_draws_with_the_frame_the_head_picks(tiny_dir, two_frames):
    torch.manual_seed(0)
    model, cfg = build(tiny_dir, "multilayer_concat", extra=LEARNED)
    model.eval()
    with torch.no_grad():  # make the head certain: the first image always wins
        model.frame_selector.from_start.weight.zero_()
        model.frame_selector.none.zero_()
        model.frame_selector.query[-1].weight.zero_()  # the query MLP's output: a constant
        model.frame_selector.query[-1].bias.fill_(1.0)
        model.frame_selector.key.weight.zero_()
        model.frame_selector.key.bias.zero_()
        model.frame_selector.from_end.weight.zero_()
        model.frame_selector.from_end.weight[1] = 5.0  # one from the end of two: the first of two images
    bov = model.mllm.bov_token_id
    chat = Chat(model, GenerationSettings(steps=1, max_new_tokens=3, max_images_per_turn=1), logits_processor=ForceTokens({0: bov}))
    paths = [two_frames.messages[0]["content"][i]["image"] for i in (0, 1)]
    chat.send("Edit the first one.", paths)
    assert chat.draws and chat.draws[0].condition_images == [0]


@pytest.mark.parametrize("mode, expected", [("all", [0, 1]), ("latest", [1])])
def test_chat_draws_with_the_frames_its_stage_2_used(tiny_dir, two_frames, mode, expected):
    model, _ = build(tiny_dir, "multilayer_concat", extra=[f"stage.frame_select={mode}"])
    chat = Chat(model.eval(), GenerationSettings(steps=1, max_new_tokens=3, max_images_per_turn=1),
                logits_processor=ForceTokens({0: model.mllm.bov_token_id}))
    chat.send("Edit the second one.", [two_frames.messages[0]["content"][i]["image"] for i in (0, 1)])
    assert chat.draws[0].condition_images == expected


def test_learned_frames_need_per_token_states_and_a_dit_with_frames(tiny_dir):
    """(stage.frame_select values are validated with the other stage keys: tests/test_configs.py.)"""
    with pytest.raises(ConfigError, match="frame_select=learned"):
        build(tiny_dir, "queries", "tiny_cosmos", extra=["stage.frame_select=learned"])
    with pytest.raises(ConfigError, match="frame_select=learned"):
        build(tiny_dir, "multilayer_concat", "tiny_sana", extra=["stage.frame_select=learned"])


def test_a_context_that_disagrees_with_its_frames_and_a_half_written_head_are_refused(tiny_dir, two_frames, tmp_path):
    model, cfg = build(tiny_dir, "multilayer_concat", extra=LEARNED)
    sample = model.prepare_align_sample(two_frames)
    bad = replace(sample, cond=torch.cat([sample.cond, sample.cond[:1]]), where="data.jsonl:7")  # 3 frames, 2 images shown
    with pytest.raises(DataError, match=r"data\.jsonl:7.*2 images but the sample has 3 condition frames"):
        model.align_loss([bad], torch.Generator().manual_seed(0))
    saved = model.save_pretrained(tmp_path / "fused", config=cfg)
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "frame_selector" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="frame_selector"):
        FusedModel.from_pretrained(broken)
    assert (saved / "frame_selector" / "model.safetensors").is_file()  # the good export is untouched


def test_pooled_request_head_finds_the_word_that_decides_the_frame():
    """The head reads its request by attention: one cue token among many filler tokens (at any place, any
    length) says whether the drawing starts from the earlier image (an edit) or from nothing (a new drawing)."""
    torch.manual_seed(0)
    d = 16
    cue = {0: torch.randn(d) * 3, 1: torch.randn(d) * 3}  # 0: "add" (the earlier image), 1: "draw" (none)

    def example(g):
        label = int(torch.randint(2, (1,), generator=g))
        n = int(torch.randint(6, 20, (1,), generator=g))
        request = torch.randn(n, d, generator=g)
        request[int(torch.randint(n, (1,), generator=g))] = cue[label]
        ids = torch.tensor([7, 1, 9, 9, 2] + [7] * n)  # one image (tokens 1..4), then the request
        return torch.cat([torch.randn(5, d, generator=g), request])[None], image_spans(ids, 1, 2), label

    sel = FrameSelector(mllm_dim=d, dim=16, request_heads=4)
    opt = torch.optim.Adam(sel.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        batch = [example(g) for _ in range(8)]
        loss = sum(nn.functional.cross_entropy(sel(h, sp)[None], torch.tensor([y])) for h, sp, y in batch) / 8
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = [example(torch.Generator().manual_seed(100 + i)) for i in range(64)]
    with torch.no_grad():
        acc = sum(int(sel(h, sp).argmax()) == y for h, sp, y in test) / len(test)
    assert acc >= 0.95, acc
    with pytest.raises(ValueError, match="request_heads"):
        FrameSelector(mllm_dim=d, request_heads=-1)


def test_a_head_saved_before_request_pooling_loads_as_it_was(tiny_dir, two_frames, tmp_path):
    """Models saved with the first head (the request's mean, a linear query; no request_heads in its spec) load
    into that head and pick what they picked."""
    import json

    model, cfg = build(tiny_dir, "multilayer_concat", extra=LEARNED)
    model.frame_selector = FrameSelector(model.mllm.hidden_size, request_heads=0)
    saved = model.save_pretrained(tmp_path / "fused", config=cfg)
    manifest = json.loads((saved / "unifuse.json").read_text())
    assert manifest["parts"]["frame_selector"]["spec"]["request_heads"] == 0
    del manifest["parts"]["frame_selector"]["spec"]["request_heads"]  # as written before the option existed
    (saved / "unifuse.json").write_text(json.dumps(manifest))
    loaded = FusedModel.from_pretrained(saved)
    assert loaded.frame_selector.request_heads == 0
    s = model.packed_context_states([model.prepare_align_sample(two_frames)])[0]
    with torch.no_grad():
        assert torch.equal(model.frame_selector(s.ctx_hidden, model.image_spans(s.ctx_ids)),
                           loaded.frame_selector(s.ctx_hidden, loaded.image_spans(s.ctx_ids)))
    assert FrameSelector(8).request_heads == 4  # new heads pool
