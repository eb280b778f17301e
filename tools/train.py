"""Train either stage under DeepSpeed ZeRO.

Run as:
    python tools/train.py stage=sft                                   # stage 1 on the demo data, tiny MLLM
    python tools/train.py stage=align generator=tiny_wan connector=last_mlp init_from=outputs/sft
    python tools/train.py -m stage=align generator=tiny_sana connector=last_mlp,multilayer_concat,queries init_from=outputs/sft
    torchrun --nproc_per_node=2 tools/train.py stage=sft              # two processes (gloo on CPU, nccl on GPUs)
    python tools/train.py experiment=tiny_sft                          # replay an experiment file
    deepspeed --num_gpus 8 tools/train.py experiment=duogen_cosmos25_7b data.path=...   # the DeepSpeed launcher
    Several nodes: tools/launch/ (hostfile + deepspeed, torchrun rendezvous, Slurm); README "Scaling out".

Writes to the run folder (hydra.run.dir, default outputs/<date>/<time>): metrics.jsonl,
train.log, checkpoints/step-NNNNNNN/ (resume=auto picks the newest complete one),
samples/ (stage=align with stage.sample_every), final/ (the exported fused model) and
summary.json.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment, take_launcher_args
from fusion.config import register_configs, validate
from fusion.errors import ConfigError

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    validate(cfg)
    if cfg.stage is None:
        raise ConfigError("choose a stage: stage=sft or stage=align")
    from fusion.train import Trainer

    summary = Trainer(cfg).train()
    stop = summary.get("interrupted")
    if stop and stop.get("reason") == "stage.stop_before_generator":  # asked for: done, not interrupted
        print(f"stopped before the generator's first step, after step {stop['step']}: checkpoint {stop['checkpoint']}; the same "
              "command without stage.stop_before_generator goes on (resume_generator=folder on another copy of the generator)")
        return
    if stop:
        print(f"interrupted after step {stop['step']}: checkpoint {stop['checkpoint']}; run the same command again to resume",
              file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: not finished (a job chain must not go on to the next stage)
    ran = (f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}" if summary["first_loss"] is not None
           else "no step left to run (resumed at the last)")
    print(f"{ran} over {summary['steps']} steps; skipped {sum(summary['skipped'].values())}; model: {summary['export']}")


if __name__ == "__main__":
    take_launcher_args()  # the deepspeed launcher's --local_rank=N
    main()
