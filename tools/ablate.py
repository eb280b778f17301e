"""The connector ablation on the toy world: every connector design, same stage-1 model, same
stage-2 budget and seeds, same test split; one table of the evaluator's metrics per connector.

Run as:
    python tools/ablate.py                          # make ablation (the full demo's budget per connector)
    python tools/ablate.py profile=quick            # make ablation QUICK=1
    python tools/ablate.py connectors=[last_mlp,queries] align_steps=300

Reuses the demo's toy world and its stage-1 run (<out_dir>/sft, trained here if absent), then
for each connector runs stage 2 into <out_dir>/ablation/<connector>/align and evaluates it.
Writes <out_dir>/ablation/ablation.json and ablation.md.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs
from fusion.toyworld.report import GOALS, run_phase

register_configs()
console = Console()


@hydra.main(config_path="../conf", config_name="ablate", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    OmegaConf.to_object(cfg)
    out = Path(cfg.out_dir).resolve()
    toy = Path(cfg.toy_dir).resolve()
    root = out / "ablation"
    timings: dict[str, float] = {}
    run_phase("world", "make_toy.py", [f"out_dir={toy}", f"n_train={cfg.n_train}", f"n_test={cfg.n_test}", f"vae_steps={cfg.vae_steps}",
                                        f"mllm_steps={cfg.mllm_steps}", f"dit_steps={cfg.dit_steps}",
                                        f"dit_families=[{cfg.generator.removeprefix('toy_')}]", f"hydra.run.dir={root / 'world'}",
                                        *cfg.make_toy_overrides], timings)
    if not (out / "sft" / "final").is_dir():
        shutil.rmtree(root / "feature_cache", ignore_errors=True)  # caches of an older stage-1 model would never match again
        run_phase("sft", "train.py", ["experiment=toy_sft", f"toy_dir={toy}", f"stage.max_steps={cfg.sft_steps}", "resume=never",
                                      f"hydra.run.dir={out / 'sft'}", *cfg.sft_overrides], timings)
    else:
        console.print(f"stage 1: reusing {out / 'sft'}")
    rows = {}
    for name in cfg.connectors:
        run = root / name
        if run.exists():
            shutil.rmtree(run)
        t0 = time.time()
        run_phase(f"align {name}", "train.py", ["experiment=toy_align", f"toy_dir={toy}", f"generator={cfg.generator}", f"connector={name}",
                                                f"stage.max_steps={cfg.align_steps}", f"init_from={out / 'sft'}", "resume=never",
                                                "cache=auto", f"cache.dir={root / 'feature_cache'}",  # query connectors run without
                                                f"hydra.run.dir={run / 'align'}", *cfg.align_overrides], timings)
        ev = [f"model={run / 'align' / 'final'}", f"data_dir={toy / 'toyworld'}", "split=test", f"steps={cfg.sample_steps}",
              f"guidance={cfg.guidance}", "transcripts=2", f"hydra.run.dir={run / 'eval'}"]
        if cfg.eval_n is not None:
            ev.append(f"n={cfg.eval_n}")
        run_phase(f"evaluate {name}", "evaluate.py", ev, timings)
        report = json.loads((run / "eval" / "report.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run / "align" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        rows[name] = {**{k: report[k] for k, _ in GOALS if k in report}, "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                      "seconds": round(time.time() - t0, 1), "n": report.get("n", {})}
    keys = [k for k, _ in GOALS if any(k in r for r in rows.values())]
    result = {"profile": cfg.profile, "generator": cfg.generator, "align_steps": cfg.align_steps, "stage1": str(out / "sft"),
              "test": str(toy / "toyworld" / "test.jsonl"), "connectors": rows}
    tmp = root / "ablation.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(root / "ablation.json")
    head = "| connector | " + " | ".join(keys) + " | loss (last 20 steps) | seconds |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "" for k in keys) + f" | {r['final_loss']:.4f} | {r['seconds']:.0f} |")
    (root / "ablation.md").write_text(f"# Connector ablation ({cfg.profile}: {cfg.generator}, {cfg.align_steps} stage-2 steps each, "
                                      f"same stage-1 model and seeds)\n\n" + "\n".join(lines) + "\n")
    table = Table(title=f"connector ablation ({cfg.generator}, {cfg.align_steps} stage-2 steps each)")
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    for k in [*keys, "final_loss"]:
        table.add_row(k, *(f"{r[k]:.3f}" if r.get(k) is not None else "" for r in rows.values()))
    console.print(table)
    console.print(f"wrote {root / 'ablation.json'} and {root / 'ablation.md'}")


if __name__ == "__main__":
    main()
