"""The interleaved generation loop on tiny fused models, with <|bov|> forced at chosen decode steps."""

from __future__ import annotations

import json

import pytest
import torch

from fusion.errors import CheckpointError, DataError
from fusion.generate import Chat, ForceTokens, GenerationSettings
from fusion.model import FusedModel
from fusion.transcript import write_transcript
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory, mllm_family):
    """Untrained tiny fused models saved to disk, one per connector kind, for each MLLM family."""
    from tests.conftest import MLLM_FAMILIES

    out = {}
    for connector, generator in (("last_mlp", "tiny_wan"), ("queries", "tiny_cosmos"), ("layer_mix", "tiny_sana")):
        cfg = compose_config([f"tiny_dir={tiny_dir}", f"mllm={MLLM_FAMILIES[mllm_family][1]}", "stage=align", f"generator={generator}",
                              f"connector={connector}"])
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(connector) / "model"
        FusedModel.build(cfg).save_pretrained(path)
        out[connector] = path
    return out


def forced(chat: Chat, bov_at: list[int], end_at: int) -> ForceTokens:
    schedule = {k: chat.mllm.bov_token_id for k in bov_at}
    schedule[end_at] = chat.mllm.end_of_turn_id
    return ForceTokens(schedule)


def make_chat(path, recompute="never", **settings):
    s = GenerationSettings(steps=2, guidance=2.0, max_new_tokens=40, **settings)
    chat = Chat.load(path, settings=s, recompute=recompute)
    return chat


@pytest.mark.parametrize("connector", ["last_mlp", "queries", "layer_mix"])
def test_forced_bov_draws_exactly_that_many_images_and_runs_each_token_once(saved, images, connector):
    chat = make_chat(saved[connector])
    chat.logits_processor = forced(chat, [2, 5, 8, 11], 14)  # a 4-image answer
    new = chat.send("Draw four steps.", images=[str(images["square"])])
    drawn = [s for s in new if s.kind == "image" and s.role == "assistant"]
    assert len(drawn) == 4 and all(s.image.size == (64, 64) for s in drawn)
    assert len(chat.images) == 5  # the user's image + 4 drawn
    assert chat.state.tokens_forwarded == chat.state.length  # every MLLM token ran exactly once
    assert chat.state.ids[-1] == chat.mllm.end_of_turn_id
    # each drawn image is in the cache as <|bov|><|vision_start|><|image_pad|>*N<|vision_end|>
    ids = torch.tensor(chat.state.ids)
    assert int((ids == chat.mllm.bov_token_id).sum()) == 4
    assert int((ids == chat.mllm.token_id("<|vision_start|>")).sum()) == 5


def test_condition_frames_are_exactly_the_earlier_images_in_order(saved, images, monkeypatch):
    chat = make_chat(saved["last_mlp"], negative="duogen")  # explicit: this model trained with null (auto: zeros)
    seen = []
    real = chat.model.generator.sample

    def spy(states, mask, cond, **kw):
        seen.append(None if cond is None else cond.clone())
        return real(states, mask, cond, **kw)

    monkeypatch.setattr(chat.model.generator, "sample", spy)
    chat.logits_processor = forced(chat, [1, 3], 5)
    chat.send("Two images please.", images=[str(images["wide"])])
    chat.logits_processor = forced(chat, [1], 3)
    chat.send("Now edit the first one.")
    assert [d.condition_images for d in chat.draws] == [[0], [0, 1], [0, 1, 2]]
    user_latent = chat.model.generator.encode(chat.images[0], size=(64, 64))[0]  # the wide image, resized
    for k, cond in enumerate(seen):
        assert cond.shape[1] == k + 1
        torch.testing.assert_close(cond[0, 0], user_latent)
        for j in range(1, k + 1):  # generated images enter as the latents the DiT produced
            torch.testing.assert_close(cond[0, j], chat._latents[j])
    # DuoGen negative: the prefix up to the last image; the positive context ends with <|bov|>
    for d in chat.draws:
        assert chat.state.ids[d.context_tokens - 1] == chat.mllm.bov_token_id
        assert chat.state.ids[d.negative_tokens - 1] == chat.mllm.token_id("<|vision_end|>")


def test_sana_mllm_only_passes_no_condition_frames(saved, images):
    chat = make_chat(saved["layer_mix"])
    chat.logits_processor = forced(chat, [1], 3)
    chat.send("Draw.", images=[str(images["square"])])
    assert chat.draws[0].condition_images == []


@pytest.mark.parametrize("connector", ["last_mlp", "queries"])
def test_cached_decoding_equals_uncached_decoding(saved, images, connector):
    runs = {}
    for mode in ("never", "images", "always"):
        chat = make_chat(saved[connector], recompute=mode)
        chat.logits_processor = forced(chat, [2, 6], 9)
        chat.send("Draw two.", images=[str(images["square"])])
        chat.logits_processor = forced(chat, [1], 4)
        chat.send("One more, like the first.")
        runs[mode] = chat
    ref = runs["never"]
    for mode in ("images", "always"):
        other = runs[mode]
        assert other.state.ids == ref.state.ids
        assert [s.text for s in other.segments] == [s.text for s in ref.segments]
        for a, b in zip(ref._latents, other._latents):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert other.state.tokens_forwarded > ref.state.tokens_forwarded == ref.state.length


def test_image_limit_suppresses_bov(saved):
    chat = make_chat(saved["last_mlp"], max_images_per_turn=1)
    chat.logits_processor = forced(chat, [1, 3], 5)  # the second <|bov|> is suppressed
    chat.send("Draw.")
    assert len([s for s in chat.segments if s.kind == "image"]) == 1


def test_text_limit_closes_the_turn(saved):
    chat = make_chat(saved["last_mlp"])
    chat.settings.max_new_tokens = 5
    chat.logits_processor = ForceTokens({})
    chat.send("Talk.")
    assert chat.state.ids[-1] == chat.mllm.end_of_turn_id
    assert chat.state.tokens_forwarded == chat.state.length


def test_multi_turn_history_is_rendered_like_the_chat_template(saved, images):
    """The cache after two turns holds exactly what the template renders for the same messages."""
    chat = make_chat(saved["last_mlp"])
    chat.logits_processor = forced(chat, [], 3)
    chat.send("Hello there.", images=[str(images["square"])])
    starts = [i for i, t in enumerate(chat.state.ids) if t == chat.mllm.token_id("<|im_start|>")]
    answer1 = chat.mllm.tokenizer.decode(chat.state.ids[starts[-1]:])  # the assistant's turn
    chat.logits_processor = forced(chat, [], 2)
    chat.send("Again.")
    text = chat.mllm.tokenizer.decode(chat.state.ids)
    assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 2
    assert "<|im_end|>\n<|im_start|>user\nAgain.<|im_end|>\n<|im_start|>assistant\n" in text
    default_system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if "2_5" in type(chat.mllm).__module__ else ""
    assert text.startswith(default_system + "<|im_start|>user\n<|vision_start|>")  # Qwen3-VL's template has no default system prompt
    assert answer1


def test_transcript_lists_every_segment(saved, images, tmp_path):
    chat = make_chat(saved["last_mlp"])
    chat.logits_processor = forced(chat, [2], 5)
    chat.send("Draw one.", images=[str(images["square"])])
    chat.logits_processor = forced(chat, [1, 3], 6)
    chat.send("Two more.")
    page = write_transcript(chat.segments, tmp_path / "t")
    data = json.loads((tmp_path / "t" / "transcript.json").read_text())["segments"]
    assert [(s["turn"], s["role"], s["kind"]) for s in data] == [(s.turn, s.role, s.kind) for s in chat.segments]
    pngs = sorted(p.name for p in (tmp_path / "t").glob("*.png"))
    assert pngs == sorted(s["path"] for s in data if s["kind"] == "image") and len(pngs) == 4
    md = (tmp_path / "t" / "transcript.md").read_text()
    for name in pngs:
        assert f"({name})" in md
    assert page.read_text().count("data:image/png;base64,") == 4
    assert not [p for p in (tmp_path / "t").iterdir() if p.name.startswith(".")]


def test_queries_do_not_stay_in_the_cache(saved):
    chat = make_chat(saved["queries"])
    chat.logits_processor = ForceTokens({})
    chat.mllm.extend(chat.state, chat.mllm.tokenizer("Hello", add_special_tokens=False)["input_ids"])
    before = chat.state.last_logits.clone()
    n = chat.state.cache.get_seq_length()
    chat.mllm.run_queries(chat.state, chat.model.connector.query_embeds())
    assert chat.state.cache.get_seq_length() == n
    chat.mllm.extend(chat.state, [chat.mllm.bov_token_id])
    ref = make_chat(saved["queries"])
    ref.mllm.extend(ref.state, chat.state.ids)
    torch.testing.assert_close(chat.state.last_logits, ref.state.last_logits, atol=1e-5, rtol=1e-5)
    assert before.shape == ref.state.last_logits.shape


def test_bad_input(saved, tmp_path, images):
    chat = make_chat(saved["last_mlp"])
    with pytest.raises(DataError, match="prompt is empty"):
        chat.send("   ")
    with pytest.raises(DataError, match="image file not found"):
        chat.send("Look.", images=[str(tmp_path / "nope.png")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="does not decode"):
        chat.send("Look.", images=[str(bad)])
    with pytest.raises(CheckpointError, match="no unifuse.json"):
        Chat.load(tmp_path)
    mllm_only = tmp_path / "mllm_only"
    m = FusedModel.from_pretrained(saved["last_mlp"])
    FusedModel(m.mllm).save_pretrained(mllm_only)
    with pytest.raises(CheckpointError, match="cannot draw images"):
        Chat.load(mllm_only)
    newer = tmp_path / "newer"
    import shutil

    shutil.copytree(saved["last_mlp"], newer)
    mf = json.loads((newer / "unifuse.json").read_text())
    mf["version"] = 99
    (newer / "unifuse.json").write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match="newer than this unifuse"):
        Chat.load(newer)
    shutil.rmtree(newer / "connector")
    mf["version"] = 1
    (newer / "unifuse.json").write_text(json.dumps(mf))
    with pytest.raises(CheckpointError, match="connector"):
        Chat.load(newer)
