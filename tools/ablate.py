"""The connector ablation on the toy world: every connector design, same stage-1 model, same
stage-2 budget, each run with every seed of ``seeds`` (stage.seed and data.seed), same test split;
one table of the evaluator's metrics per connector (mean and range over the seeds), ranked, and
the differences between connectors that exceed the spread between seeds.

Run as:
    python tools/ablate.py                          # make ablation (the full demo's budget per connector)
    python tools/ablate.py profile=quick            # make ablation QUICK=1
    python tools/ablate.py connectors=[last_mlp,queries] align_steps=300 seeds=[0,1,2]

Reuses the demo's toy world and its stage-1 run (<out_dir>/sft, trained here if absent), then
for each connector and seed k runs stage 2 into <out_dir>/ablation/<connector>/seed<k>/align and
evaluates it into .../seed<k>/eval (the feature cache is shared by every seed). Writes
<out_dir>/ablation/ablation.json (per connector: the rows of every seed, the aggregate, the rank;
the pairwise verdicts) and ablation.md (fusion/toyworld/ablation.py does the arithmetic).
A run that finished with the same stage-1 model and arguments (its run.json) is reused
(``reuse=false``: rerun), so connectors can be added to a table, or a stopped ablation resumed:
    python tools/ablate.py connectors=[queries,multiscale_queries]   # then the full list: only the new ones run
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
from fusion.toyworld.ablation import aggregate, beyond_lines, metrics_of, newest_mtime, render_markdown, stage1_predates
from fusion.toyworld.report import run_phase

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
    run_phase("world", "make_toy.py", [f"out_dir={toy}", f"n_train={cfg.n_train}", f"n_test={cfg.n_test}", f"image_size={cfg.image_size}", f"vae_steps={cfg.vae_steps}",
                                        f"mllm_steps={cfg.mllm_steps}", f"dit_steps={cfg.dit_steps}",
                                        f"dit_families=[{cfg.generator.removeprefix('toy_')}]", f"hydra.run.dir={root / 'world'}",
                                        *cfg.make_toy_overrides], timings)
    if stage1_predates(out / "sft" / "final", toy / "qwen2_5_vl"):
        console.print(f"stage 1: {out / 'sft'} predates the toy MLLM in {toy / 'qwen2_5_vl'}: training it again")
        shutil.rmtree(out / "sft")
    if not (out / "sft" / "final").is_dir():
        shutil.rmtree(root / "feature_cache", ignore_errors=True)  # caches of an older stage-1 model would never match again
        run_phase("sft", "train.py", ["experiment=toy_sft", f"toy_dir={toy}", f"stage.max_steps={cfg.sft_steps}", "resume=never",
                                      f"hydra.run.dir={out / 'sft'}", *cfg.sft_overrides], timings)
    else:
        console.print(f"stage 1: reusing {out / 'sft'}")
    stage1 = out / "sft" / "final"
    stage1_id = {"path": str(stage1), "mtime": newest_mtime(stage1)}
    # the yaml tree shapes every run beyond its overrides (e.g. conf/experiment_connector/): a change there reruns
    from fusion.feature_cache import folder_fingerprint

    conf_digest = folder_fingerprint(Path(__file__).resolve().parents[1] / "conf")
    runs: dict[str, list[dict]] = {}
    for name in cfg.connectors:
        runs[name] = []
        for seed in cfg.seeds:
            run = root / name / f"seed{seed}"
            tag = f"{name} seed{seed}"
            align = ["experiment=toy_align", f"toy_dir={toy}", f"generator={cfg.generator}", f"connector={name}",
                     f"stage.max_steps={cfg.align_steps}", f"init_from={out / 'sft'}", "resume=never",
                     "cache=auto", f"cache.dir={root / 'feature_cache'}",  # shared by every seed and connector it fits
                     f"hydra.run.dir={run / 'align'}", *cfg.align_overrides, *cfg.connector_overrides.get(name, []),
                     f"stage.seed={seed}", f"data.seed={seed}"]
            ev = [f"model={run / 'align' / 'final'}", f"data_dir={toy / 'toyworld'}", "split=test", f"steps={cfg.sample_steps}",
                  f"guidance={cfg.guidance}", "transcripts=2", f"workers={cfg.eval_workers}", f"hydra.run.dir={run / 'eval'}"]
            if cfg.eval_n is not None:
                ev.append(f"n={cfg.eval_n}")
            want = {"stage1": stage1_id, "align": align, "evaluate": ev, "conf": conf_digest}
            stamp = run / "run.json"
            if cfg.reuse and stamp.is_file() and (run / "eval" / "report.json").is_file() and json.loads(stamp.read_text()).get("want") == want:
                console.print(f"{tag}: reusing the finished run in {run} (reuse=false reruns it)")
                runs[name].append(json.loads(stamp.read_text())["row"])
                continue
            if run.exists():
                shutil.rmtree(run)
            t0 = time.time()
            run_phase(f"align {tag}", "train.py", align, timings)
            run_phase(f"evaluate {tag}", "evaluate.py", ev, timings)
            report = json.loads((run / "eval" / "report.json").read_text())
            losses = [json.loads(line)["loss"] for line in (run / "align" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
            row = {"seed": seed, **metrics_of(report), "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                   "seconds": round(time.time() - t0, 1), "n": report.get("n", {})}
            runs[name].append(row)
            (run / "run.json.tmp").write_text(json.dumps({"want": want, "row": row}, indent=2))
            (run / "run.json.tmp").replace(stamp)  # written last: a run stopped halfway is never reused
    extra = ("final_loss", "seconds")
    agg = aggregate(runs, extra=extra)
    result = {"profile": cfg.profile, "generator": cfg.generator, "align_steps": cfg.align_steps, "seeds": list(cfg.seeds),
              "stage1": str(out / "sft"), "test": str(toy / "toyworld" / "test.jsonl"), **agg}
    tmp = root / "ablation.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(root / "ablation.json")
    seeds = ", ".join(str(s) for s in cfg.seeds)
    # the connectors' own overrides can change the schedule (e.g. stage.max_steps): say so under the title
    own = [f"- {name}: {' '.join(cfg.connector_overrides[name])}" for name in cfg.connectors if cfg.connector_overrides.get(name)]
    own_md = ("Stage-2 overrides of these connectors, after the common ones (they win):\n\n" + "\n".join(own) + "\n\n") if own else ""
    (root / "ablation.md").write_text(f"# Connector ablation ({cfg.profile}: {cfg.generator}, {cfg.align_steps} stage-2 steps each "
                                      f"unless overridden below, same stage-1 model, stage-2 seeds {seeds})\n\n" + own_md
                                      + render_markdown(agg, extra=("final_loss",)))
    table = Table(title=f"connector ablation ({cfg.generator}, {cfg.align_steps} stage-2 steps each, mean over seeds {seeds})")
    table.add_column("metric")
    for name in agg["ranking"]:
        table.add_column(f"{agg['connectors'][name]['rank']}. {name}", justify="right")
    for k in [*agg["keys"], "final_loss"]:
        cells = [agg["connectors"][name]["aggregate"].get(k) for name in agg["ranking"]]
        table.add_row(k, *(f"{c['mean']:.3f}" if c is not None else "" for c in cells))
    console.print(table)
    beyond = beyond_lines(agg)
    console.print(f"differences beyond the seed spread: {len(beyond)} of {len(agg['differences'])}")
    for line in [b for b in beyond if b.startswith(f"{agg['primary']}:")]:
        console.print(f"  {line}")
    console.print(f"wrote {root / 'ablation.json'} and {root / 'ablation.md'}")


if __name__ == "__main__":
    main()
