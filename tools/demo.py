"""``make demo``: the toy world end to end, on a CPU, in one command.

Phases (each prints its own progress bar; each is its own process, as on a cluster):
    1. world      tools/make_toy.py   toy world + toy-pretrained VAE, MLLM and DiT (cached)
    2. sft        tools/train.py experiment=toy_sft     stage 1: the MLLM learns the conversations
    3. align      tools/train.py experiment=toy_align   stage 2: the connector through the frozen DiT, MLLM frozen (feature cache: cache=auto);
                  its connector-only warm-up beside the toy DiT's last steps (align_beside_world), the rest after
    4. evaluate   tools/evaluate.py                     the test split, scored against its ground truth
By default (``parallel=true``) the world's data and the toy VAE come first, then the toy MLLM and stage 1 run beside the
toy DiT (side_by_side below), and stage 2's distillation warm-up after stage 1 in that branch, on the toy DiT's early
snapshot (its text encoder frozen part-way: stage 2 reads only that encoder then); ``parallel=false``: one phase after another. The evaluation plays the test split in
``eval_workers`` processes. Writes <out_dir>/report.json (every metric, by conversation kind, phase timings, settings),
report.md (the table) and transcripts/ (HTML of a few test conversations).

Run as:
    python tools/demo.py                   # the full demo (make demo)
    python tools/demo.py profile=quick     # a few minutes, lower scores (make demo QUICK=1)
    python tools/demo.py connector=last_mlp generator=toy_cosmos 'make_toy_overrides=["dit_families=[cosmos]"]'
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs
from fusion.toyworld.report import GOALS, PhaseStopped, markdown, metrics_table, run_phase

register_configs()
console = Console()


def wait_for_generator(early: Path, final: Path, world_running: Path, stop: threading.Event) -> Path:
    """The toy DiT folder stage 2's warm-up reads: its early snapshot once make_toy has written it (this run removed any
    older one first), or the finished folder once the world phase is over (a cached DiT writes no snapshot)."""
    while True:
        if stop.is_set():
            raise PhaseStopped("demo phase 'align_warmup' not started: the phase beside it failed")
        if early.is_dir():
            return early
        if not world_running.exists():
            return final
        time.sleep(2.0)


def side_by_side(out: Path, world: list[str], steps: dict[str, int], sft: list[str], timings: dict[str, float],
                 warmup: list[str] | None = None, generator_dirs: tuple[Path, Path] | None = None) -> bool:
    """The toy world's data, then the toy VAE alone on every thread, then two branches at once: the toy DiT (on the
    console), and the toy MLLM then stage 1 (into <out>/world/mllm_sft.log). Neither branch needs the other's parts; each
    runs torch on one thread while the other works and on all once it is done (fusion/cpushare.py): on 2 cores two
    one-thread processes do about 1.35x the work of one two-thread process (docs/toyworld_log.md). The VAE trains alone
    so that it is the one a build one phase after another makes (trained on one thread it reconstructed a third worse,
    and the DiT learns in its latents: docs/toyworld_log.md, "The world and stage 1 side by side").

    ``warmup``: stage 2's arguments; after stage 1 the branch runs its distillation warm-up (stage.stop_before_generator)
    on the toy DiT's early snapshot or finished folder (``generator_dirs``: (early, final), :func:`wait_for_generator`).
    Returns whether it ran."""
    t0 = time.time()
    def parts(*keep: str) -> list[str]:  # the step overrides of make_toy, every part but ``keep`` skipped (0 steps)
        return [f"{k}={v if k in keep else 0}" for k, v in steps.items()]

    run_phase("data", "make_toy.py", [*world, *parts(), f"hydra.run.dir={out / 'world' / 'data'}"], timings)
    run_phase("vae", "make_toy.py", [*world, "skip_existing=true", *parts("vae_steps"), f"hydra.run.dir={out / 'world' / 'vae'}"], timings)
    running = out / "world" / "running"
    running.mkdir(parents=True, exist_ok=True)
    marks = {"world": running / "vae_dit", "sft": running / "mllm_sft"}
    for mark in marks.values():
        mark.touch()
    stop, failed, warmed = threading.Event(), [], []
    if warmup is not None:
        shutil.rmtree(generator_dirs[0], ignore_errors=True)  # an older build's snapshot: only this run's make_toy writes one

    def mllm_then_sft() -> None:
        log = out / "world" / "mllm_sft.log"
        log.unlink(missing_ok=True)
        try:
            run_phase("mllm", "make_toy.py", [*world, "skip_existing=true", *parts("mllm_steps"), f"hydra.run.dir={out / 'world' / 'mllm'}"],
                      timings, log=log, shared_while=marks["world"], stop=stop)
            run_phase("sft", "train.py", sft, timings, log=log, shared_while=marks["world"], stop=stop)
            if warmup is not None:
                gen = wait_for_generator(*generator_dirs, marks["world"], stop)
                run_phase("align_warmup", "train.py", [*warmup, f"generator.path={gen}"], timings, log=log,
                          shared_while=marks["world"], stop=stop)
                warmed.append(gen)
        except BaseException as err:  # noqa: BLE001 (re-raised by the main thread)
            failed.append(err)
            stop.set()
        finally:
            marks["sft"].unlink(missing_ok=True)

    branch = threading.Thread(target=mllm_then_sft, name="mllm_then_sft")
    branch.start()
    try:
        run_phase("world", "make_toy.py", [*world, "skip_existing=true", *parts("vae_steps", "dit_steps"), f"hydra.run.dir={out / 'world'}"],
                  timings, shared_while=marks["sft"], stop=stop)
    except BaseException as err:  # noqa: BLE001 (re-raised below, after the branch beside it has stopped)
        failed.append(err)
        stop.set()
    finally:
        marks["world"].unlink(missing_ok=True)
        branch.join()
    if failed:  # the failure that stopped the other branch, not the "stopped" of that branch
        raise next((err for err in failed if not isinstance(err, PhaseStopped)), failed[0])
    timings["world_and_sft"] = round(time.time() - t0, 1)
    console.print(f"world and stage 1{' and the warm-up of stage 2' if warmed else ''}, side by side: {timings['world_and_sft']:.0f} s")
    return bool(warmed)


@hydra.main(config_path="../conf", config_name="demo", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    OmegaConf.to_object(cfg)
    out = Path(cfg.out_dir).resolve()
    toy = Path(cfg.toy_dir).resolve()
    timings: dict[str, float] = {}
    t_start = time.time()
    console.print(f"[bold]unifuse demo[/] ({cfg.profile}): toy world in {toy}, outputs in {out}")

    world = [f"out_dir={toy}", f"n_train={cfg.n_train}", f"n_test={cfg.n_test}", f"image_size={cfg.image_size}",
             f"dit_families=[{cfg.generator.removeprefix('toy_')}]", *cfg.make_toy_overrides]
    steps = {"vae_steps": cfg.vae_steps, "mllm_steps": cfg.mllm_steps, "dit_steps": cfg.dit_steps}
    for name in ("sft", "align", "eval", "feature_cache"):
        if (out / name).exists():
            shutil.rmtree(out / name)  # a fresh run each time: no stale checkpoint is resumed
    sft = ["experiment=toy_sft", f"toy_dir={toy}", f"stage.max_steps={cfg.sft_steps}", "resume=never", f"hydra.run.dir={out / 'sft'}",
           *cfg.sft_overrides]
    align = ["experiment=toy_align", f"toy_dir={toy}", f"generator={cfg.generator}", f"connector={cfg.connector}",
             f"stage.max_steps={cfg.align_steps}", f"init_from={out / 'sft'}",
             "cache=auto", f"cache.dir={out / 'feature_cache'}",  # the frozen MLLM and the VAE run once
             f"hydra.run.dir={out / 'align'}", *cfg.align_overrides, *cfg.connector_overrides.get(cfg.connector, [])]
    warmed = False
    if cfg.parallel:
        family = cfg.generator.removeprefix("toy_")
        warmup = [*align, "resume=never", "stage.stop_before_generator=true"] if cfg.align_beside_world else None
        warmed = side_by_side(out, world, steps, sft, timings, warmup, (toy / f"{family}_early", toy / family))
    else:
        run_phase("world", "make_toy.py", [*world, *(f"{k}={v}" for k, v in steps.items()), f"hydra.run.dir={out / 'world'}"], timings)
        run_phase("sft", "train.py", sft, timings)
    run_phase("align", "train.py", [*align, *(["resume=auto", "resume_generator=folder"] if warmed else ["resume=never"])], timings)
    ev = ["model=" + str(out / "align" / "final"), f"data_dir={toy / 'toyworld'}", "split=test", f"steps={cfg.sample_steps}",
          f"guidance={cfg.guidance}", f"transcripts={cfg.transcripts}", f"workers={cfg.eval_workers}", f"hydra.run.dir={out / 'eval'}"]
    if cfg.eval_n is not None:
        ev.append(f"n={cfg.eval_n}")
    run_phase("evaluate", "evaluate.py", ev, timings)

    report = json.loads((out / "eval" / "report.json").read_text())
    timings["total"] = round(time.time() - t_start, 1)
    backbones = {}
    for part in ("vae", "qwen2_5_vl", cfg.generator.removeprefix("toy_")):
        stats = toy / part / "pretrain.json"
        if stats.is_file():
            backbones[part] = json.loads(stats.read_text())
    report.update(profile=cfg.profile, generator=cfg.generator, connector=cfg.connector, seconds=timings, pretrained_backbones=backbones,
                  goals={k: g for k, g in GOALS if g is not None})
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    (out / "report.md").write_text(f"# unifuse demo ({cfg.profile}): {cfg.generator} + {cfg.connector}\n\n{markdown(report)}\n\n"
                                   f"Phase seconds: {json.dumps(timings)}\n")
    if (out / "transcripts").exists():
        shutil.rmtree(out / "transcripts")
    if (out / "eval" / "transcripts").exists():
        shutil.copytree(out / "eval" / "transcripts", out / "transcripts")
    console.rule("[bold]result")
    console.print(metrics_table(report, f"toy world test split, {report['conversations']} conversations ({cfg.generator} + {cfg.connector})"))
    console.print("phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    console.print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'transcripts'}/")


if __name__ == "__main__":
    main()
