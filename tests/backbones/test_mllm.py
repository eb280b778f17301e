"""Every MLLM adapter (tests/conftest.py ``MLLM_FAMILIES``: Qwen2.5-VL, Qwen3-VL) on a tiny checkpoint of its real architecture."""

from __future__ import annotations

import pytest
import torch

from backbones.mllm.qwen2_5_vl import BOV_TOKEN, VISION_TOKENS, cache_kwarg
from fusion.errors import CheckpointError

# Cached and full forwards run the same float32 kernels on different chunkings; they agree
# to ~1e-6 here. 1e-4 leaves room for other CPUs while staying far below the ~1e-1
# differences that wrong rope positions produce (see the negative control below).
ATOL = 1e-4


def two_turn(images):
    return [
        {"role": "user", "content": [{"type": "text", "text": "Move the red circle"}, {"type": "image", "image": str(images["square"])}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Here it is:"},
                {"type": "image", "image": str(images["wide"])},
                {"type": "text", "text": "Done."},
            ],
        },
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]},
    ]


@pytest.fixture(scope="module")
def family(tiny_dir, mllm_family):
    """(the tiny folder, the adapter class) of each family."""
    from hydra.utils import get_class

    from tests.conftest import MLLM_FAMILIES

    return tiny_dir / mllm_family, get_class(MLLM_FAMILIES[mllm_family][0])


#: what the published folders of each family load as through transformers' auto classes
STOCK = {"qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration"), "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLForConditionalGeneration")}


def test_tiny_checkpoint_loads_with_stock_auto_classes(family, mllm_family):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    tiny_mllm_path, _ = family
    cfg = AutoConfig.from_pretrained(tiny_mllm_path)
    assert cfg.model_type == mllm_family
    proc = AutoProcessor.from_pretrained(tiny_mllm_path)
    assert type(proc).__name__ == STOCK[mllm_family][0]
    model = AutoModelForImageTextToText.from_pretrained(tiny_mllm_path)
    assert type(model).__name__ == STOCK[mllm_family][1]
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"):
        assert proc.tokenizer.convert_tokens_to_ids(t) in proc.tokenizer.all_special_ids
    assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert proc.chat_template and "<|im_start|>" in proc.chat_template


def test_roundtrip_and_bov_added_once(family, tmp_path):
    tiny_mllm_path, adapter = family
    a = adapter.from_pretrained(str(tiny_mllm_path), add_bov=False)
    n_tok = len(a.tokenizer)
    assert BOV_TOKEN not in a.tokenizer.get_vocab()
    emb_before = a.model.get_input_embeddings().weight.detach().clone()
    assert a.add_bov_token() is True
    bov = a.bov_token_id
    assert len(a.tokenizer) == n_tok + 1
    emb = a.model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(emb[bov], emb_before[:n_tok].mean(0))
    torch.testing.assert_close(a.model.get_output_embeddings().weight[bov], a.model.get_output_embeddings().weight[:n_tok].mean(0))
    assert a.add_bov_token() is False  # once
    assert len(a.tokenizer) == n_tok + 1

    a.save_pretrained(tmp_path / "saved")
    b = adapter.from_pretrained(str(tmp_path / "saved"))
    assert b.bov_token_id == bov and len(b.tokenizer) == n_tok + 1
    assert b.add_bov_token() is False
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = b.tokenizer("a red circle<|bov|>", add_special_tokens=False)["input_ids"]
    assert ids[-1] == bov  # one special token, not split into characters


def test_bov_resizes_embeddings_when_there_is_no_padding(family):
    tiny_mllm_path, adapter = family
    a = adapter.from_pretrained(str(tiny_mllm_path), add_bov=False)
    n = len(a.tokenizer)
    a.model.resize_token_embeddings(n, mean_resizing=False)  # published 3B-style: rows == tokens
    old = a.model.get_input_embeddings().weight.detach().clone()
    a.add_bov_token()
    w = a.model.get_input_embeddings().weight
    assert w.shape[0] == n + 1 and a.bov_token_id == n
    torch.testing.assert_close(w[n], old.mean(0))
    assert a.model.get_output_embeddings().weight.shape[0] == n + 1


def supervised_runs(mllm, r):
    """Decoded text of each contiguous run of supervised tokens."""
    runs, cur = [], []
    for tid, lab in zip(r.input_ids[0].tolist(), r.labels[0].tolist()):
        if lab != -100:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [mllm.tokenizer.decode(x) for x in runs]


def test_labels_mask_exactly_user_turns_and_vision_tokens(mllm, images):
    r = mllm.render(two_turn(images))
    assert supervised_runs(mllm, r) == ["Here it is:<|bov|>", "Done.<|im_end|>", "It is red.<|im_end|>"]
    ids, labels = r.input_ids[0], r.labels[0]
    vision = torch.tensor([mllm.token_id(t) for t in VISION_TOKENS])
    assert not (labels[torch.isin(ids, vision)] != -100).any()
    assert int((labels == mllm.bov_token_id).sum()) == 1
    # the assistant image is <|bov|><|vision_start|><|image_pad|>*N<|vision_end|>
    b = int((ids == mllm.bov_token_id).nonzero()[0])
    assert ids[b + 1] == mllm.token_id("<|vision_start|>")
    n_wide = int(r.image_grid_thw[1].prod()) // 4
    assert (ids[b + 2 : b + 2 + n_wide] == mllm.image_token_id).all()
    assert ids[b + 2 + n_wide] == mllm.token_id("<|vision_end|>")
    assert r.image_roles == ["user", "assistant"]
    # the user image carries no <|bov|>
    assert int((ids == mllm.bov_token_id).sum()) == 1
    # wide image keeps its aspect: more columns than rows
    assert r.image_grid_thw[1, 2] > r.image_grid_thw[1, 1]


def test_selected_hidden_states_shapes_and_identity(mllm, images):
    r = mllm.render(two_turn(images))
    with torch.no_grad():
        out = mllm(**r.model_inputs())
        ref = mllm.model(**r.model_inputs(), output_hidden_states=True)
    L = r.length
    assert out["hidden"].shape == (1, 3, L, mllm.hidden_size)
    assert mllm.hidden_layers == [0, 2, mllm.num_layers]
    torch.testing.assert_close(out["hidden"][:, 0], ref.hidden_states[0])
    torch.testing.assert_close(out["hidden"][:, 1], ref.hidden_states[2])
    torch.testing.assert_close(out["hidden"][:, 2], ref.hidden_states[-1])
    # layer 0 is the embedding output: equal to the token embeddings on text positions
    text = r.input_ids[0] != mllm.image_token_id
    emb = mllm.model.get_input_embeddings()(r.input_ids)[0]
    torch.testing.assert_close(out["hidden"][0, 0][text], emb[text])
    assert out["logits"].shape == (1, L, mllm.model.config.text_config.vocab_size)
    no_logits = mllm(**r.model_inputs(), compute_logits=False)
    assert "logits" not in no_logits
    torch.testing.assert_close(no_logits["hidden"], out["hidden"])


def test_hidden_layer_out_of_range_names_the_key(mllm):
    with pytest.raises(ValueError, match="mllm.hidden_layers"):
        type(mllm)(mllm.model, mllm.processor, hidden_layers=[mllm.num_layers + 1])


def cached_run(mllm, r, images, position_ids=True):
    """Prefix up to <|bov|> (with the user image), append the assistant image, then the rest."""
    ids = r.input_ids[0]
    bov = int((ids == mllm.bov_token_id).nonzero()[0])
    n_user = int(r.image_grid_thw[0].prod())
    s = mllm.new_state()
    if position_ids:
        mllm.extend(s, ids[: bov + 1], r.pixel_values[:n_user], r.image_grid_thw[:1])
        mllm.append_image(s, images["wide"])
        mllm.extend(s, ids[s.length :])
        return s, None
    # negative control: the same cache, but let the model guess positions
    kw = cache_kwarg()
    logits = []
    with torch.no_grad():
        o = mllm.model(input_ids=ids[None, : bov + 1], pixel_values=r.pixel_values[:n_user], image_grid_thw=r.image_grid_thw[:1],
                       mm_token_type_ids=(ids[None, : bov + 1] == mllm.image_token_id).int(), use_cache=True, **{kw: s.cache})
        v_ids, pv, grid = mllm.image_inputs(images["wide"])
        o = mllm.model(input_ids=v_ids[None], pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(v_ids[None] == mllm.image_token_id).int(),
                       use_cache=True, **{kw: getattr(o, kw)})
        rest = ids[None, bov + 1 + len(v_ids) :]
        mllm.model.model.rope_deltas = None
        o = mllm.model(input_ids=rest, use_cache=True, output_hidden_states=True, **{kw: getattr(o, kw)})
        logits.append(o.hidden_states[-1])
    return s, logits[0]


def test_cached_continuation_after_image_equals_full_forward(mllm, images):
    r = mllm.render(two_turn(images))
    with torch.no_grad():
        full = mllm(**r.model_inputs())
    s, _ = cached_run(mllm, r, images)
    assert s.ids == r.input_ids[0].tolist()
    assert s.tokens_forwarded == r.length  # every token ran exactly once
    torch.testing.assert_close(s.hidden_states(), full["hidden"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(s.last_logits, full["logits"][0, -1], atol=ATOL, rtol=0)


def test_cached_forward_without_position_ids_is_wrong(mllm, images):
    """Negative control: the failure mode the adapter avoids is real and large."""
    r = mllm.render(two_turn(images))
    with torch.no_grad():
        full = mllm(**r.model_inputs())
    _, hidden = cached_run(mllm, r, images, position_ids=False)
    n = hidden.shape[1]
    ref = full["hidden"][0, -1, -n:]
    rel = ((hidden[0] - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    s, _ = cached_run(mllm, r, images)
    rel_ok = ((s.hidden_states()[-1, -n:] - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    # random-init attention is nearly uniform, so rope matters little in absolute terms (~0.5%),
    # yet the wrong positions are still >1000x further off than the recomputed ones (~2e-7)
    assert rel > 1e-3 and rel > 1000 * rel_ok, (rel, rel_ok)


def test_greedy_decode_matches_uncached_argmax(mllm, images):
    conv = [{"role": "user", "content": [{"type": "image", "image": str(images["square"])}, {"type": "text", "text": "Describe it."}]}]
    r = mllm.render(conv, add_generation_prompt=True)
    s = mllm.new_state()
    mllm.prefill(s, r)
    new, reason = mllm.decode(s, max_new_tokens=6, stop_ids=[])
    assert reason == "length" and len(new) == 6
    ids = r.input_ids
    expected = []
    with torch.no_grad():
        for _ in range(6):
            logits = mllm.model(input_ids=ids, pixel_values=r.pixel_values, image_grid_thw=r.image_grid_thw,
                                mm_token_type_ids=(ids == mllm.image_token_id).int()).logits
            nxt = int(logits[0, -1].argmax())
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert new == expected
    assert s.tokens_forwarded == s.length == r.length + 6


def test_decode_stops_at_bov_and_end_of_turn(mllm, images):
    r = mllm.render([{"role": "user", "content": "Draw a circle."}], add_generation_prompt=True)
    for forced, reason_expected in ((mllm.bov_token_id, "bov"), (mllm.end_of_turn_id, "end_of_turn")):
        calls = {"n": 0}

        def force(module, args, output, forced=forced):
            calls["n"] += 1
            if calls["n"] == 3:  # prefill, then 2 decoded tokens; the logits of call 3 pick token 3
                output = output.clone()
                output[..., forced] = 1e4
            return output

        h = mllm.model.lm_head.register_forward_hook(force)
        try:
            s = mllm.new_state()
            mllm.prefill(s, r)
            new, reason = mllm.decode(s, max_new_tokens=20)
        finally:
            h.remove()
        assert reason == reason_expected
        assert len(new) == 3 and new[-1] == forced
        assert s.ids[-1] == forced  # the stop token itself is in the cache


def test_sampling_is_seeded(mllm):
    r = mllm.render([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    outs = []
    for _ in range(2):
        s = mllm.new_state()
        mllm.prefill(s, r)
        g = torch.Generator().manual_seed(3)
        outs.append(mllm.decode(s, max_new_tokens=8, temperature=1.0, top_p=0.9, generator=g, stop_ids=[])[0])
    assert outs[0] == outs[1]


def test_missing_checkpoint_folder_is_a_clear_error(family, tmp_path):
    _, adapter = family
    with pytest.raises(CheckpointError, match="checkpoint folder not found: .*nope"):
        adapter.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        adapter.from_pretrained(str(tmp_path / "empty"))


def test_hub_id_offline_is_a_clear_error(family, monkeypatch, tmp_path):
    _, adapter = family
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        adapter.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct" if adapter.family == "Qwen2.5-VL" else "Qwen/Qwen3-VL-2B-Instruct")
