"""Plan a run: exact parameter counts (the fused model built on the meta device, nothing
downloaded) and per-GPU memory of each stage for every ZeRO option, without gradient checkpointing,
with every part checkpointed and with the stage's own list; says whether the configured one fits (``fusion/plan.py`` explains the estimate).

Run as:
    python tools/plan.py experiment=duogen_cosmos25_7b                       # both DuoGen stages on 8 x 80 GB
    python tools/plan.py mllm=qwen2_5_vl_7b generator=wan2_2_ti2v_5b connector=multilayer_concat \\
        stage=align deepspeed=zero3 nodes=4 gpus_per_node=8 gpu_memory_gb=80 micro_batch=2 seq_len=4096 image_size=704
    python tools/plan.py mllm=tiny generator=tiny_wan                         # local folders work too (their config.json)

Writes <output_dir>/plan.json and plan.md (default outputs/plan); exit status 0 whether or not
it fits (the table says), 2 on a bad config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from fusion.atomic import write_text_atomic
from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs, validate
from fusion.errors import ConfigError

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _stage_names(cfg, overrides: list[str]) -> list[str | None]:
    if any(o.split("=", 1)[0].lstrip("+~") == "stage" for o in overrides):
        return [None]  # the stage given on the command line
    return list(cfg.stages)


def _compose(overrides: list[str]):
    cfg = compose("plan", overrides=overrides)
    cfg.data = None  # a plan reads no data (an experiment may leave data.path to the command line)
    validate(cfg)
    return cfg


@friendly_errors
def main(argv: list[str] | None = None) -> dict:
    setup_environment()
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the estimators only; nothing runs on a device
    from omegaconf import OmegaConf

    from fusion import plan as P
    from fusion.model import FusedModel

    overrides = list(sys.argv[1:] if argv is None else argv)
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = _compose(overrides)
        if cfg.generator is None or cfg.connector is None:
            raise ConfigError("plan: choose a generator and a connector (generator=..., connector=...) or an experiment")
        hw = P.Hardware(cfg.nodes, cfg.gpus_per_node, cfg.gpu_memory_gb, cfg.cpu_memory_gb, cfg.reserve_gb)
        counts, stages = None, []
        for name in _stage_names(cfg, overrides):
            scfg = cfg if name is None else _compose(overrides + [f"stage={name}"])
            if scfg.stage is None:
                raise ConfigError("plan: no stage to plan (stage=sft|align, or an experiment naming its stages)")
            stage = OmegaConf.to_container(scfg.stage, resolve=True)
            image = cfg.image_size or stage.get("image_size") or scfg.generator.image_size
            seq_len = cfg.seq_len or stage.get("pack_length") or 2048
            work = P.Workload(cfg.micro_batch or stage["micro_batch_size"], seq_len, image, cfg.cond_frames)
            model = FusedModel.build(scfg, device="meta")
            if counts is None:
                counts = P.count_parts(model)
                notes = model.generator.text_width_notes(model.mllm.num_layers, model.mllm.hidden_size)
            stages.append(P.plan_stage(model, stage, OmegaConf.to_container(scfg.deepspeed), hw, work, name or stage["name"]))
        label = " + ".join(str(cfg[k]._target_).rsplit(".", 2)[-2] if k == "connector" else Path(str(cfg[k].path)).name
                           for k in ("mllm", "generator", "connector"))
        result = P.to_json(counts, stages, hw, {"name": label, "overrides": overrides, "notes": notes,
                                                        "deepspeed": OmegaConf.to_container(cfg.deepspeed)})
    out = Path(cfg.output_dir)
    text = P.render(result)
    write_text_atomic(out / "plan.json", json.dumps(result, indent=2))
    write_text_atomic(out / "plan.md", text)
    print(text)
    print(f"wrote {out / 'plan.json'} and {out / 'plan.md'}")
    return result


if __name__ == "__main__":
    main()
