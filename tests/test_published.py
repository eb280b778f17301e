"""Published configs at real scale, built on the meta device (nothing downloaded, no memory):
exact parameter counts against the published checkpoints, the planner against DeepSpeed's own
estimators, and every published MLLM x generator pair through tools/plan.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra.utils import instantiate

from fusion import plan as P
from fusion.errors import CheckpointError
from fusion.model import FusedModel
from tests.conftest import compose_config

MLLMS = ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_4b", "qwen3_vl_8b"]  # qwen3_vl_2b: no published exact count found offline
GENERATORS = ["wan2_1_t2v_1_3b", "wan2_2_ti2v_5b", "cosmos_predict2_2b_t2i", "cosmos_predict2_2b_v2w",
              "cosmos_predict2_5_2b", "sana_1600m", "sana1_5_1_6b"]

#: (published parameter count, where the figure comes from)
PUBLISHED_MLLM = {
    "qwen2_5_vl_3b": (3_754_622_976, "Qwen/Qwen2.5-VL-3B-Instruct model.safetensors.index.json total_size 7,509,245,952 B (bf16) / 2; model page 3.75B"),
    "qwen2_5_vl_7b": (8_292_166_656, "Qwen/Qwen2.5-VL-7B-Instruct hub listing numParameters; model page 8.29B"),
    "qwen3_vl_4b": (4_440_000_000, "Qwen3-VL-4B-Instruct: 4.44 B parameters (its model page's size, as quoted by public write-ups)"),
    "qwen3_vl_8b": (8_770_000_000, "Qwen3-VL-8B-Instruct: 8.77 B parameters (its model page's size, as issue 17 quotes it)"),
}
PUBLISHED_DIT = {
    "wan2_1_t2v_1_3b": (1_418_996_800, "Wan2.1-T2V-1.3B-Diffusers transformer safetensors 5,675,987,200 B (fp32) / 4; 'about 1.42B'"),
    "wan2_2_ti2v_5b": (4_999_787_712, "Wan2.2-TI2V-5B safetensors index total_size 19,999,150,848 B (fp32) / 4"),
    "cosmos_predict2_2b_t2i": (1_956_405_248, "Cosmos-Predict2-2B-Text2Image diffusers checkpoint metadata"),
    "cosmos_predict2_5_2b": (2_059_174_912, "Cosmos-Predict2.5-2B model card"),
    "sana_1600m": (1_604_000_000, "SANA paper (Xie et al. 2024), Sana-1.6B: 1604M"),
    "sana1_5_1_6b": (1_604_000_000, "SANA 1.5: the 1.6B model plus q/k norms; SANA paper 1604M"),
}
PUBLISHED_VAE = {"wan2_1_t2v_1_3b": (127_000_000, "Wan paper (arXiv 2503.20314): Wan-VAE 127M")}


def _meta_mllm(name):
    cfg = compose_config([f"mllm={name}"])
    return instantiate(cfg.mllm, device="meta")


def _meta_generator(name):
    cfg = compose_config([f"generator={name}"])
    return instantiate(cfg.generator, device="meta")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "qwen2_5_vl_3b" else n for n in MLLMS])
def test_published_mllm_parameter_count(name):
    published, source = PUBLISHED_MLLM[name]
    m = _meta_mllm(name)
    assert all(p.is_meta for p in m.parameters())
    n = P.unique_numel(m.parameters())  # tied embeddings (3B) counted once
    assert abs(n - published) / published < 0.01, f"{name}: {n:,} vs {published:,} ({source})"


def test_published_vision_config_is_written_out():
    # transformers' Qwen2_5_VLVisionConfig defaults: hidden_size 3584, tokens_per_second 4; the checkpoints: 1280, 2
    v = _meta_mllm("qwen2_5_vl_7b").model.config.vision_config
    assert (v.hidden_size, v.tokens_per_second, v.out_hidden_size, v.depth, v.window_size) == (1280, 2, 3584, 32, 112)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31]
    t = _meta_mllm("qwen2_5_vl_3b").model.config.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.vocab_size) == (2048, 36, 2, 151936)
    assert list(t.rope_parameters["mrope_section"]) == [16, 24, 24]


@pytest.mark.parametrize("name", GENERATORS)
def test_published_generator_parameter_count(name):
    g = _meta_generator(name)
    n = sum(p.numel() for p in g.transformer.parameters())
    if name == "cosmos_predict2_2b_v2w":  # no published figure: the T2I DiT plus the condition-mask input channel
        t2i = sum(p.numel() for p in _meta_generator("cosmos_predict2_2b_t2i").transformer.parameters())
        assert n - t2i == 1 * 2 * 2 * 2048  # one more input channel into a (1, 2, 2) patch embedding of width 2048
        return
    published, source = PUBLISHED_DIT[name]
    assert abs(n - published) / published < 0.01, f"{name}: {n:,} vs {published:,} ({source})"
    if name in PUBLISHED_VAE:
        published, source = PUBLISHED_VAE[name]
        n = sum(p.numel() for p in g.vae.parameters())
        assert abs(n - published) / published < 0.01, f"VAE {n:,} vs {published:,} ({source})"


def test_generator_widths_on_meta():
    wan, cosmos25, sana = (_meta_generator(n) for n in ("wan2_2_ti2v_5b", "cosmos_predict2_5_2b", "sana_1600m"))
    assert (wan.text_dim, wan.latent_channels, wan.spatial_factor) == (4096, 48, 16)
    assert (cosmos25.text_dim, cosmos25.latent_channels, cosmos25.spatial_factor) == (28 * 3584, 16, 8)
    assert (sana.text_dim, sana.latent_channels, sana.spatial_factor) == (2304, 32, 32)


def test_meta_build_of_a_local_folder_counts_what_loads(tiny_dir):
    # the same classes, a real-layout folder: the meta build reads its config.json and counts what from_pretrained loads
    over = [f"tiny_dir={tiny_dir}", "generator=tiny_cosmos", "connector=multilayer_concat", "stage=align"]
    cfg = compose_config(over)
    meta = FusedModel.build(cfg, device="meta")
    real = FusedModel.build(cfg, device="cpu")
    for part in ("vision_tower", "connector", "generator"):
        assert sum(p.numel() for p in meta.parts()[part].parameters()) == sum(p.numel() for p in real.parts()[part].parameters()), part
    # the MLLM differs by the <|bov|> row a real load adds to the tiny tokenizer (no padding rows in it)
    d = sum(p.numel() for p in real.parts()["mllm"].parameters()) - sum(p.numel() for p in meta.parts()["mllm"].parameters())
    assert d in (0, real.mllm.hidden_size, 2 * real.mllm.hidden_size)


def test_hub_id_without_architecture_cannot_build_on_meta():
    from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter

    with pytest.raises(CheckpointError, match="mllm.architecture"):
        Qwen25VLAdapter.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", device="meta")


def test_architecture_that_differs_from_the_checkpoint_is_reported(tiny_dir, caplog):
    from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter

    arch = json.loads((tiny_dir / "qwen2_5_vl" / "config.json").read_text())
    arch["vision_config"]["tokens_per_second"] = 4  # the class default the published files must not fall back to
    with caplog.at_level(logging.WARNING):
        Qwen25VLAdapter.from_pretrained(str(tiny_dir / "qwen2_5_vl"), architecture=arch)
    assert "vision_config.tokens_per_second: yaml 4, checkpoint 2" in caplog.text


# ---------------------------------------------------------------------------- the planner vs DeepSpeed
def test_counts_agree_with_deepspeed_on_a_live_model(tiny_dir):
    from deepspeed.runtime.zero.stage3 import model_to_params

    # mllm.add_bov=false: the tiny tokenizer has no padding rows, so a real load would add one for <|bov|>
    over = [f"tiny_dir={tiny_dir}", "generator=tiny_wan", "connector=queries", "stage=align", "mllm.add_bov=false"]
    cfg = compose_config(over)
    total, largest = model_to_params(FusedModel.build(cfg, device="cpu"))  # DeepSpeed's own count needs live tensors
    meta = FusedModel.build(cfg, device="meta")
    assert (P.unique_numel(meta.parameters()), P.largest_layer_params(meta)) == (total, largest)


@pytest.mark.parametrize("zero, oo, op", [(2, "none", "none"), (2, "cpu", "none"), (3, "none", "none"), (3, "cpu", "none"), (3, "cpu", "cpu")])
def test_model_states_equal_deepspeed_estimators(zero, oo, op):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    hw = P.Hardware(nodes=2, gpus_per_node=8)
    t, largest = 7_615_616_512, 544_997_376
    if zero == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(t, 8, 2, cpu_offload=oo == "cpu")
    else:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(t, largest, 8, 2, cpu_offload=oo == "cpu", cpu_offload_params=op == "cpu")
    everything = P.model_states(t, 0, largest, zero, oo, op, hw)  # every parameter trains: exactly DeepSpeed's figures
    assert (everything["gpu"], everything["cpu_per_node"]) == (gpu, cpu)
    frozen = 2_000_000_000
    part = P.model_states(t, frozen, largest, zero, oo, op, hw)  # frozen weights add their 16-bit copy
    expect = 0 if op == "cpu" else (2 * frozen if zero == 2 else 2 * frozen / 16)
    assert part["gpu"] == pytest.approx(gpu + expect, abs=1)


def test_zero0_and_zero1_formula():
    hw, t = P.Hardware(nodes=1, gpus_per_node=8), 1_000_000
    z0 = P.model_states(t, 0, 0, 0, "none", "none", hw)["gpu"]
    z1 = P.model_states(t, 0, 0, 1, "none", "none", hw)["gpu"]
    assert z0 == t * (2 + 6 + 12)  # weights, 16-bit + fp32 gradients, fp32 master + Adam moments: all on every GPU
    assert z1 == pytest.approx(t * (2 + 2 + (4 + 12) / 8), abs=1)  # ZeRO-1 shards the fp32 gradient and optimizer states


def test_activation_count_on_meta_equals_a_real_forward(tiny_dir):
    # the meta forward sees the same graph as a real one: same bytes kept for backward
    cfg = compose_config([f"tiny_dir={tiny_dir}", "generator=tiny_wan", "connector=last_mlp", "stage=sft"])
    stage = dict(cfg.stage)
    counts = []
    for device in ("meta", "cpu"):
        model = FusedModel.build(cfg, device=device)
        model.apply_trainable(cfg.stage)
        counter = P.SavedCounter(model)
        ids = torch.zeros(2, 64, dtype=torch.long, device=device)
        pos = torch.zeros(3, 2, 64, dtype=torch.long, device=device)
        with P.fused_attention(), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            logits = model.mllm(ids, position_ids=pos, compute_logits=True)["logits"]
            torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1))
        counts.append(counter.total)
    assert counts[0] == counts[1] > 0
    acts = P.measure_activations(FusedModel.build(cfg, device="meta"), {**stage, "trainable": dict(stage["trainable"])}, P.Workload(2, 64))
    assert 0 < acts["bytes_checkpointed"] < acts["bytes"]


def test_activations_scale_with_the_workload(tiny_dir):
    cfg = compose_config([f"tiny_dir={tiny_dir}", "generator=tiny_wan", "connector=multilayer_concat", "stage=align"])
    model = FusedModel.build(cfg, device="meta")
    model.apply_trainable(cfg.stage)
    stage = {"name": "align", "trainable": {}}
    one = P.measure_activations(model, stage, P.Workload(1, 64, 64, 1))["bytes"]
    two = P.measure_activations(model, stage, P.Workload(2, 64, 64, 1))
    assert two["bytes"] == 2 * one  # per-sample graphs
    ck_one = P.measure_activations(model, stage, P.Workload(1, 64, 64, 1))["bytes_checkpointed"]
    assert ck_one < two["bytes_checkpointed"] < 2 * ck_one  # the block recomputed in backward counts once, not per sample
    assert P.measure_activations(model, stage, P.Workload(1, 64, 128, 1))["bytes"] > one  # 4x the DiT tokens
    assert P.measure_activations(model, stage, P.Workload(1, 64, 64, 3))["bytes"] > one  # more condition frames


# ---------------------------------------------------------------------------- tools/plan.py
def _plan(overrides, tmp_path):
    from tools.plan import main

    return main([*overrides, f"output_dir={tmp_path}"])


def test_plan_duogen_experiment(tmp_path, capsys):
    result = _plan(["experiment=duogen_cosmos25_7b"], tmp_path)
    out = capsys.readouterr().out
    counts = result["parameters"]
    assert counts["mllm"]["total"] + counts["vision_tower"]["total"] == PUBLISHED_MLLM["qwen2_5_vl_7b"][0]
    assert counts["generator"]["total"] == PUBLISHED_DIT["cosmos_predict2_5_2b"][0]
    assert [s["config"] for s in result["stages"]] == ["duogen_sft", "duogen_align"]
    sft, align = result["stages"]
    assert sum(sft["trainable"].values()) == counts["mllm"]["total"]  # stage 1: the language model (vision tower frozen)
    assert sum(align["trainable"].values()) == counts["generator"]["total"]  # stage 2: the DiT (identity connector)
    for st in result["stages"]:
        chosen = [r for r in st["rows"] if r["chosen"]]
        assert len(chosen) == 1 and chosen[0]["fits"] == st["fits"]
        assert chosen[0]["zero_stage"] == 2 and chosen[0]["gradient_checkpointing"] == ("mllm" if st["name"] == "sft" else "generator")
    assert "## Stage sft (duogen_sft)" in out and "## Stage align (duogen_align)" in out and "in 80 GB per GPU" in out
    assert json.loads((tmp_path / "plan.json").read_text())["stages"][0]["name"] == "sft"
    # the same model states on twice the GPUs: ZeRO-2 shards the trainable states over 16
    two = _plan(["experiment=duogen_cosmos25_7b", "nodes=2", "stage=duogen_sft"], tmp_path)
    row = lambda r: next(x for x in r["rows"] if x["zero_stage"] == 2 and x["offload_optimizer"] == "none")  # noqa: E731
    assert row(two["stages"][0])["model_states_gb"] < row(sft)["model_states_gb"]


def test_plan_says_when_it_does_not_fit(tmp_path):
    result = _plan(["experiment=duogen_cosmos25_7b", "stage=duogen_sft", "deepspeed=zero2", "stage.gradient_checkpointing=[]",
                    "gpus_per_node=1", "gpu_memory_gb=24"], tmp_path)
    assert result["stages"][0]["fits"] is False


@pytest.mark.slow  # the fast tier plans DuoGen (Qwen2.5-VL-7B + Cosmos-Predict2.5), Ming (SANA) and Qwen3-VL-8B + Cosmos-Predict2.5
@pytest.mark.parametrize("mllm", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_8b"])
def test_plan_runs_for_every_published_pair(mllm, tmp_path):
    # stage 2 holds every part (stage 1 loads the MLLM alone: planned once per MLLM, by the first pair)
    for i, gen in enumerate(GENERATORS):
        stage = [] if i == 0 else ["stage=align"]
        result = _plan([f"mllm={mllm}", f"generator={gen}", "connector=last_mlp", "seq_len=256", "image_size=256", *stage], tmp_path)
        assert [s["name"] for s in result["stages"]] == (["sft", "align"] if i == 0 else ["align"])
        assert all(s["activations"]["bytes"] > 0 for s in result["stages"])
        assert result["parameters"]["generator"]["total"] > 1e9
        assert result["stages"][-1]["trainable"]["generator"] == result["parameters"]["generator"]["total"]


def test_plan_qwen3_vl_8b_with_cosmos_predict2_5_says_how_its_text_projection_is_read(tmp_path, capsys):
    result = _plan(["mllm=qwen3_vl_8b", "generator=cosmos_predict2_5_2b", "connector=multilayer_concat", "seq_len=256", "image_size=256"],
                   tmp_path)
    assert [s["name"] for s in result["stages"]] == ["sft", "align"]
    assert result["parameters"]["mllm"]["total"] + result["parameters"]["vision_tower"]["total"] == 8_767_123_696
    assert result["stages"][1]["trainable"]["generator"] == PUBLISHED_DIT["cosmos_predict2_5_2b"][0]  # the projection keeps its width
    out = capsys.readouterr().out
    assert "crossattn_proj_in_channels 100,352" in out and "36 x 4096 = 147,456" in out and "generator.text_dim=147456" in out
    # the re-initialised projection reads all 36 layers: only its input width changes
    wide = _plan(["mllm=qwen3_vl_8b", "generator=cosmos_predict2_5_2b", "generator.text_dim=147456", "connector=multilayer_concat",
                  "stage=align", "seq_len=256", "image_size=256"], tmp_path)
    grown = wide["parameters"]["generator"]["total"] - PUBLISHED_DIT["cosmos_predict2_5_2b"][0]
    assert grown == (147_456 - 100_352) * 1024 and not wide["config"]["notes"]


def test_plan_ming_experiment(tmp_path):
    result = _plan(["experiment=ming_sana"], tmp_path)
    (st,) = result["stages"]
    assert st["config"] == "ming_align" and st["trainable"]["mllm"] == 0 and st["trainable"]["connector"] > 0
    assert st["workload"]["image_size"] == 512
