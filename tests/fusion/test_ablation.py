"""The connector ablation's arithmetic (fusion/toyworld/ablation.py) on synthetic report dicts: no models."""

from __future__ import annotations

import pytest

from fusion.toyworld.ablation import GAIN, NONE_BEYOND, aggregate, beyond_lines, metric_keys, metrics_of, render_markdown, stage1_predates


def rep(exact, edit=0.5, f1=0.9, gain=None, **more):
    r = {"exact_scene": exact, "edit_applied": edit, "trigger_f1": f1, "n": {"exact_scene": 10}, "model": "m", **more}
    if gain is not None:
        r["conditioning_gain"] = {"gain@0.3": 0.1, GAIN: gain, "gain": 0.2}
    return r


def by(result, metric, a, b):
    return next(d for d in result["differences"] if d["metric"] == metric and {d["a"], d["b"]} == {a, b})


def test_ranking_by_the_mean_of_the_primary_metric_then_the_tie_breaks():
    runs = {
        "layer_mix": [rep(0.20), rep(0.22)],
        "last_mlp": [rep(0.40), rep(0.44)],
        "queries": [rep(0.21, edit=0.6), rep(0.21, edit=0.6)],  # same mean exact_scene as layer_mix, better edit_applied
        "concat": [rep(0.21, edit=0.6, f1=0.95), rep(0.21, edit=0.6, f1=0.95)],  # ties queries on both, better trigger_f1
    }
    result = aggregate(runs)
    assert result["ranking"] == ["last_mlp", "concat", "queries", "layer_mix"]
    assert [result["connectors"][n]["rank"] for n in result["ranking"]] == [1, 2, 3, 4]
    assert result["primary"] == "exact_scene"


def test_a_connector_without_the_primary_metric_ranks_last():
    result = aggregate({"a": [{"edit_applied": 0.9}], "b": [rep(0.1)]})
    assert result["ranking"] == ["b", "a"]


def test_mean_min_max_spread_per_metric():
    result = aggregate({"last_mlp": [rep(0.40, edit=0.5), rep(0.44, edit=0.7), rep(0.42, edit=0.6)]})
    s = result["connectors"]["last_mlp"]["aggregate"]["exact_scene"]
    assert s["mean"] == pytest.approx(0.42) and s["min"] == 0.40 and s["max"] == 0.44
    assert s["spread"] == pytest.approx(0.04) and s["n"] == 3
    assert result["connectors"]["last_mlp"]["aggregate"]["edit_applied"]["spread"] == pytest.approx(0.2)
    assert len(result["connectors"]["last_mlp"]["seeds"]) == 3  # the per-seed rows, as given


def test_a_difference_beyond_the_spread_and_one_within_it():
    runs = {
        "last_mlp": [rep(0.40, edit=0.50), rep(0.44, edit=0.70)],  # spreads: exact 0.04, edit 0.20
        "layer_mix": [rep(0.20, edit=0.55), rep(0.22, edit=0.60)],  # spreads: exact 0.02, edit 0.05
    }
    result = aggregate(runs)
    exact, edit = by(result, "exact_scene", "last_mlp", "layer_mix"), by(result, "edit_applied", "last_mlp", "layer_mix")
    assert exact["beyond"] and exact["difference"] == pytest.approx(0.21)  # 0.21 > max(0.04, 0.02)
    assert not edit["beyond"]  # |0.6 - 0.575| = 0.025 <= max(0.20, 0.05): within the noise
    f1 = by(result, "trigger_f1", "last_mlp", "layer_mix")
    assert not f1["beyond"]  # equal means, spreads 0: no difference at all
    lines = beyond_lines(result)
    assert lines == ["exact_scene: last_mlp 0.420 > layer_mix 0.210 (spreads 0.040, 0.020)"]
    md = render_markdown(result)
    assert "## Differences beyond the seed spread" in md and f"- {lines[0]}" in md and NONE_BEYOND not in md
    assert "0.420 (0.400-0.440)" in md and "0.210 (0.200-0.220)" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert "| last_mlp |" in rows[0] and "| layer_mix |" in rows[1]  # rank order


def test_the_lower_ranked_connector_can_be_the_higher_one_on_another_metric():
    runs = {"a": [rep(0.5, edit=0.1), rep(0.5, edit=0.1)], "b": [rep(0.1, edit=0.9), rep(0.1, edit=0.9)]}
    result = aggregate(runs)
    assert "edit_applied: b 0.900 > a 0.100 (spreads 0.000, 0.000)" in beyond_lines(result)


def test_a_difference_equal_to_the_spread_is_within_it_despite_float_noise():
    result = aggregate({"a": [rep(0.2), rep(0.4)], "b": [rep(0.5), rep(0.5)]})  # |0.3 - 0.5| == spread 0.2 (in floats: almost)
    assert not by(result, "exact_scene", "a", "b")["beyond"]


def test_none_beyond_the_spread_says_so():
    runs = {"last_mlp": [rep(0.30), rep(0.50)], "layer_mix": [rep(0.35), rep(0.41)]}
    result = aggregate(runs)
    assert beyond_lines(result) == []
    md = render_markdown(result)
    assert NONE_BEYOND in md
    assert "none: every difference is within the spread between seeds" in md


def test_gain_is_flattened_from_the_conditioning_gain():
    assert metrics_of(rep(0.3, gain=0.25))[GAIN] == 0.25
    assert GAIN not in metrics_of(rep(0.3))
    assert GAIN not in metrics_of({**rep(0.3), "conditioning_gain": None})  # evaluate.py: too few conversations to measure
    assert metrics_of({GAIN: 0.4})[GAIN] == 0.4  # a row already flattened (tools/ablate.py's per-seed rows)
    assert set(metrics_of(rep(0.3))) == {"exact_scene", "edit_applied", "trigger_f1"}  # n, model: not metrics
    runs = {"a": [rep(0.3, gain=0.2), rep(0.3, gain=0.3)], "b": [rep(0.3, gain=0.6), rep(0.3, gain=0.61)]}
    result = aggregate(runs)
    assert result["keys"] == ["trigger_f1", "edit_applied", GAIN, "exact_scene"]  # GOALS order (the gain is one of them)
    assert result["connectors"]["a"]["aggregate"][GAIN]["spread"] == pytest.approx(0.1)
    assert by(result, GAIN, "a", "b")["beyond"]  # 0.355 > max(0.1, 0.01)
    assert metric_keys({"a": [rep(0.3)]}) == ["trigger_f1", "edit_applied", "exact_scene"]


def test_a_single_seed_has_spread_zero_and_any_nonzero_difference_counts():
    result = aggregate({"a": [rep(0.301)], "b": [rep(0.300)]})
    assert result["connectors"]["a"]["aggregate"]["exact_scene"]["spread"] == 0
    assert by(result, "exact_scene", "a", "b")["beyond"]
    assert not by(result, "edit_applied", "a", "b")["beyond"]  # equal: no difference


def test_extra_keys_are_summarised_not_judged():
    runs = {"a": [{**rep(0.3), "final_loss": 0.2}, {**rep(0.3), "final_loss": 0.4}], "b": [{**rep(0.3), "final_loss": 0.9}]}
    result = aggregate(runs, extra=("final_loss",))
    assert result["connectors"]["a"]["aggregate"]["final_loss"]["mean"] == pytest.approx(0.3)
    assert "final_loss" not in result["keys"] and not any(d["metric"] == "final_loss" for d in result["differences"])
    header = next(line for line in render_markdown(result, extra=("final_loss",)).splitlines() if line.startswith("| rank |"))
    assert header.endswith("| exact_scene | final_loss |")


def test_a_stage1_model_older_than_its_toy_mllm_is_not_reused(tmp_path):
    import os

    stage1, mllm = tmp_path / "sft" / "final", tmp_path / "toy" / "qwen2_5_vl"
    (stage1 / "mllm").mkdir(parents=True)
    mllm.mkdir(parents=True)
    (stage1 / "mllm" / "model.safetensors").write_text("x")
    (mllm / "pretrain.json").write_text("{}")
    os.utime(mllm / "pretrain.json", (1000, 1000))
    os.utime(stage1 / "mllm" / "model.safetensors", (2000, 2000))
    assert not stage1_predates(stage1, mllm)  # stage 1 trained after the MLLM was built: reused
    os.utime(mllm / "pretrain.json", (3000, 3000))  # make_toy rebuilt the MLLM since
    assert stage1_predates(stage1, mllm)
    assert not stage1_predates(tmp_path / "absent", mllm) and not stage1_predates(stage1, tmp_path / "no_mllm")
