"""Every yaml in conf/ composes; typos and impossible combinations fail early, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fusion.config import register_configs, validate
from fusion.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, y.stem) for g in GROUPS for y in sorted((CONF / g).glob("*.yaml"))]
#: groups that belong to another primary config than config.yaml (the toy-world pipelines)
PRIMARY_OF = {"profile": "demo"}
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))

register_configs()


def _compose(name="config", overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_all_groups_exist():
    for g in ("mllm", "generator", "connector", "stage", "data", "deepspeed", "logger", "experiment"):
        assert (CONF / g).is_dir(), g


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_configs_compose(name):
    cfg = _compose(name, ["data.path=x.jsonl"] if name == "validate_data" else [])  # it checks a file the user names
    validate(cfg)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    if group == "experiment_connector":  # <experiment>_<connector>: picked by those two choices, not by name
        experiment = max((e.stem for e in (CONF / "experiment").glob("*.yaml") if option.startswith(e.stem + "_")), key=len)
        connector = option[len(experiment) + 1:]
        cfg = _compose("config", [f"experiment={experiment}", f"connector={connector}", "data.path=x.jsonl"])
        validate(cfg)
        for k, v in OmegaConf.load(CONF / group / f"{option}.yaml").items():
            assert cfg.connector[k] == v, (option, k)
        return
    overrides = [f"{group}={option}"]
    if group in ("data", "experiment"):
        overrides.append("data.path=x.jsonl")  # data/jsonl.yaml (and experiments at real scale) leave the path to the user
    cfg = _compose(PRIMARY_OF.get(group, "config"), overrides)
    validate(cfg)
    if group == "profile":  # a profile is a set of global values, named by its own file
        assert cfg.profile == option
        return
    node = cfg[group] if group != "experiment" else cfg
    assert node is not None
    if group == "mllm":
        assert cfg.mllm._target_.endswith("from_pretrained") and cfg.mllm.path


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as ei:
        _compose("config", ["mllm.pathh=/x"])
    assert "pathh" in str(ei.value.__cause__ or ei.value)


def test_unknown_top_level_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as ei:
        _compose("config", ["max_new_tokenz=3"])
    assert "max_new_tokenz" in str(ei.value.__cause__ or ei.value)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigCompositionException) as ei:
        _compose("config", ["mllm.max_length=lots"])
    msg = str(ei.value.__cause__ or ei.value)
    assert "max_length" in msg and "lots" in msg


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["stage=align", "stage.trainable.mllm=full"], "stage.trainable.mllm"),
        (["stage=sft", "stage.trainable.mllm=half"], "stage.trainable.mllm"),
        (["deepspeed=zero2", "deepspeed.offload_param=cpu"], "deepspeed.offload_param"),
        (["deepspeed.gradient_clipping=0"], "deepspeed.gradient_clipping"),
        (["data.on_error=ignore"], "data.on_error"),
        (["mllm.dtype=float8"], "mllm.dtype"),
        (["stage=align", "stage.dit_batching=padded"], "stage.dit_batching"),
        (["data.render_cache_mb=-1"], "data.render_cache_mb"),
        (["stage=align", "generator=tiny_wan", "generator.text_length=0"], "generator.text_length"),
        (["stage=align", "stage.frame_select=first"], "stage.frame_select"),
        (["stage=align", "stage.frame_select_t=0"], "stage.frame_select_t"),
        (["stage=align", "stage.frame_label_draws=0"], "stage.frame_label_draws"),
        (["stage=align", "stage.gain_rows=0"], "stage.gain_rows"),
        (["stage=sft", "stage.stop_before_generator=true"], "stage.stop_before_generator"),
        (["stage=align", "stage.distill_data=/x.jsonl"], "stage.distill_steps"),
        (["stage=align", "stage.distill_data=/x.jsonl", "stage.distill_steps=5"], "stage.distill_target"),
        (["stage=align", "stage.distill_data=/x.jsonl", "stage.distill_steps=5", "stage.distill_target=aligned",
          "stage.distill_data_batch=0"], "stage.distill_data_batch"),
    ],
)
def test_impossible_combinations_fail_validation(overrides, key):
    cfg = _compose("config", overrides)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_evaluate_refuses_no_rows_a_gain_pass():
    cfg = _compose("evaluate", ["model=x", "gain_rows=0", "output_dir=x"])  # tools/evaluate.py checks its schema with OmegaConf.to_object
    with pytest.raises(ConfigError, match="gain_rows"):
        OmegaConf.to_object(cfg)


@pytest.mark.parametrize("overrides, key", [(["dit_text_freeze=1.0"], "dit_text_freeze"), (["dit_ema=0.5"], "dit_text_freeze=0")])
def test_make_toy_refuses_a_freeze_share_out_of_range_and_the_freeze_with_an_average(overrides, key):
    cfg = _compose("make_toy", overrides)  # tools/make_toy.py checks its schema with OmegaConf.to_object
    with pytest.raises(ConfigError, match=key):
        OmegaConf.to_object(cfg)
    assert OmegaConf.to_object(_compose("make_toy", ["dit_ema=0.5", "dit_text_freeze=0"])).dit_ema == 0.5


def test_resume_generator_must_be_checkpoint_or_folder():
    from fusion.train import Trainer

    with pytest.raises(ConfigError, match="resume_generator must be checkpoint or folder"):
        Trainer(_compose("config", ["stage=align", "resume_generator=weights", "output_dir=x"]))


@pytest.mark.parametrize("seeds", ["[]", "[0,0]"])
def test_ablation_seeds_must_be_some_and_unique(seeds):
    cfg = _compose("ablate", [f"seeds={seeds}"])  # tools/ablate.py checks its top-level schema with OmegaConf.to_object
    with pytest.raises(ConfigError, match="seeds"):
        OmegaConf.to_object(cfg)
    assert OmegaConf.to_object(_compose("ablate")).seeds == [0, 1]


def test_published_mllm_configs_point_at_hub_ids():
    for name, hub in (("qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-3B-Instruct"), ("qwen2_5_vl_7b", "Qwen/Qwen2.5-VL-7B-Instruct")):
        cfg = _compose("config", [f"mllm={name}"])
        assert cfg.mllm.path == hub and cfg.mllm.dtype == "bfloat16"


def test_tiny_dir_interpolates_into_group_paths():
    cfg = _compose("config", ["tiny_dir=/somewhere"])
    assert cfg.mllm.path == "/somewhere/qwen2_5_vl"
    assert cfg.data.path == "/somewhere/demo_data/conversations.jsonl"
    assert OmegaConf.select(cfg, "stage") is None


def test_deepspeed_bf16_false_from_the_command_line():
    from fusion.train import deepspeed_config

    cfg = _compose("config", ["deepspeed.bf16=false", "stage=sft"])  # YAML reads false as a bool: the str field holds 'False'
    validate(cfg)
    assert deepspeed_config(cfg.deepspeed, cfg.stage, "cpu")["bf16"]["enabled"] is False


@pytest.mark.parametrize("connector", OmegaConf.to_object(_compose("ablate")).connectors)
def test_toy_align_with_each_ablated_connector_composes_and_its_distillation_fits(connector):
    """What tools/demo.py and tools/ablate.py run: experiment=toy_align, the connector, its connector_overrides."""
    from hydra.utils import instantiate

    from fusion.distill import per_token

    extra = OmegaConf.to_object(_compose("ablate")).connector_overrides.get(connector, [])
    cfg = _compose("config", ["experiment=toy_align", f"connector={connector}", *extra])
    validate(cfg)
    assert cfg.connector.refiner_layers == 4
    # conf/experiment_connector/toy_align_multilayer_concat.yaml: the connector the demo trains reads 3 neighbours
    assert cfg.connector.get("window", 1) == (3 if connector == "multilayer_concat" else 1), connector
    conn = instantiate(cfg.connector, mllm_dim=32, text_dim=32, num_mllm_layers=2, dit_dim=32)
    assert (cfg.stage.distill_target == "aligned") == per_token(conn), (connector, cfg.stage.distill_target)
    # the window after the last image for every connector that reads the context's states (FusedModel.build refuses it
    # to query connectors)
    assert (cfg.stage.connector_span == "since_image") == (not getattr(conn, "uses_queries", False)), connector
    # the DiT frozen throughout stage 2 for every connector (toy_align; docs/toyworld_log.md, "Stage 2 with the DiT frozen
    # throughout"): no part of the recipe moves it
    assert cfg.stage.trainable.generator == "frozen" and cfg.stage.generator_frozen_steps == 0, connector


def test_the_toy_recipe_keeps_foreach_adamw_in_stage_1_and_fuses_it_elsewhere():
    """stage.adam_fused (default true) picks the AdamW kernel the trainer builds; the toy recipe's stage 1 keeps torch's
    foreach one, with which its figures were measured (conf/experiment/toy_sft.yaml), and stage 2 takes the default."""
    from fusion.train import GuardedAdamW

    assert _compose("config", ["experiment=toy_sft"]).stage.adam_fused is False
    assert _compose("config", ["experiment=toy_align"]).stage.adam_fused is True
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    for fused in (True, False):  # the trainer's call (Trainer._setup_engine)
        opt = GuardedAdamW(p, **({"fused": True} if fused else {"foreach": True}))
        assert bool(opt.param_groups[0]["fused"]) is fused and bool(opt.param_groups[0]["foreach"]) is not fused
