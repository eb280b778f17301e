"""Packed stage-1 batches: no attention across samples, each sample's own positions, the same loss as padded and per-sample."""

from __future__ import annotations

import pytest
import torch

from fusion.data import read_jsonl
from fusion.model import FusedModel
from fusion.packing import collate, per_sample_loss, plan_rows, shifted_targets


@pytest.fixture(scope="module")
def rendered(mllm, tiny_dir):
    convs = list(read_jsonl(tiny_dir / "demo_data" / "conversations.jsonl"))
    return [mllm.render(c) for c in convs]


def logits_of(mllm, batch):
    with torch.no_grad():
        return mllm(**batch.inputs)["logits"]


def test_plan_rows_first_fit_decreasing():
    rows = plan_rows([5, 9, 3, 7, 2], capacity=10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 2][i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3  # 26 tokens need at least 3 rows of 10
    with pytest.raises(ValueError, match="pack_length"):
        plan_rows([11], capacity=10)


def test_shifted_targets():
    assert shifted_targets(torch.tensor([-100, 5, 6, -100])).tolist() == [5, 6, -100, -100]


def test_packed_padded_and_per_sample_losses_are_equal(mllm, rendered):
    model = FusedModel(mllm)
    with torch.no_grad():
        ref = model.sft_loss(rendered, batching="none")["loss"]
        padded = model.sft_loss(rendered, batching="padded")
        packed = model.sft_loss(rendered, batching="packed")  # rows as long as the longest sample
        model.settings["pack_length"] = 1 << 20  # everything in one row
        one_row = model.sft_loss(rendered, batching="packed")
    assert torch.allclose(padded["loss"], ref, atol=1e-5) and torch.allclose(packed["loss"], ref, atol=1e-5), (ref, padded, packed)
    assert torch.allclose(one_row["loss"], ref, atol=1e-5)
    assert one_row["pad_frac"] == 0.0 < padded["pad_frac"] and packed["pad_frac"] <= padded["pad_frac"]


def test_each_packed_sample_sees_only_itself(mllm, rendered):
    """A sample's logits in a packed row equal its logits alone, and changing a neighbour changes nothing."""
    a, b = rendered[0], rendered[1]
    packed = collate([a, b], mllm.rope_positions, mllm.tokenizer.pad_token_id, "packed")
    assert packed.inputs["position_ids"].shape[0] == 4 and packed.inputs["attention_mask"] is None
    both = logits_of(mllm, packed)
    (ra, sa, na), (rb, sb, nb) = packed.spans
    alone_b = logits_of(mllm, collate([b], mllm.rope_positions, mllm.tokenizer.pad_token_id, "packed"))
    assert torch.allclose(both[rb, sb : sb + nb], alone_b[0, :nb], atol=1e-4)

    # replace every text token of sample a: b's logits must not move, a's must
    changed = collate([a, b], mllm.rope_positions, mllm.tokenizer.pad_token_id, "packed")
    ids = changed.inputs["input_ids"]
    text = (changed.segments == 0) & (changed.inputs["mm_token_type_ids"] == 0) & (ids != mllm.token_id("<|vision_start|>")) \
        & (ids != mllm.token_id("<|vision_end|>"))
    ids[text] = mllm.tokenizer.convert_tokens_to_ids("a")
    other = logits_of(mllm, changed)
    assert torch.equal(other[rb, sb : sb + nb], both[rb, sb : sb + nb]) or torch.allclose(other[rb, sb : sb + nb], both[rb, sb : sb + nb], atol=1e-6)
    assert not torch.allclose(other[ra, sa : sa + na], both[ra, sa : sa + na], atol=1e-3)


def test_packed_positions_are_each_samples_own_rope(mllm, rendered):
    with_images = [r for r in rendered if r.image_grid_thw is not None][:2]
    batch = collate(with_images, mllm.rope_positions, mllm.tokenizer.pad_token_id, "packed")
    for (row, start, n), r in zip(batch.spans, with_images):
        own = mllm.rope_positions(r.input_ids, r.image_grid_thw)[:, 0]
        assert torch.equal(batch.inputs["position_ids"][1:, row, start : start + n], own)
        assert batch.inputs["position_ids"][0, row, start : start + n].tolist() == list(range(n))


def test_per_sample_loss_ignores_padding(mllm, rendered):
    batch = collate(rendered[:3], mllm.rope_positions, mllm.tokenizer.pad_token_id, "padded")
    logits = logits_of(mllm, batch)
    losses = per_sample_loss(logits, batch)
    for i, r in enumerate(rendered[:3]):
        with torch.no_grad():
            own = mllm(**r.model_inputs(), labels=r.labels)["loss"]
        assert torch.allclose(losses[i], own, atol=1e-5)


def test_packed_gradients_match_per_sample(tiny_dir, mllm, mllm_family, rendered):
    grads = {}
    for batching in ("none", "packed"):
        m = FusedModel(type(mllm).from_pretrained(str(tiny_dir / mllm_family)))
        m.sft_loss(rendered[:3], batching=batching)["loss"].backward()
        grads[batching] = m.mllm.model.lm_head.weight.grad.clone()
    assert torch.allclose(grads["none"], grads["packed"], atol=1e-5)
