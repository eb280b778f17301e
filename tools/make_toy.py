"""Write the toy world and its toy-pretrained backbones (each cached: a rerun reuses every part
whose settings match, so ``make demo`` builds them once).

Run as:
    python tools/make_toy.py out_dir=checkpoints/toy                    # everything, defaults
    python tools/make_toy.py dit_families=[wan,cosmos,sana]             # a toy DiT per family
    python tools/make_toy.py vae_steps=0 mllm_steps=0 dit_steps=0       # data only

Parts, in <out_dir>:
    toyworld/    train / val / test JSONL (the project's chat format + a ``meta`` field with the
                 ground truth of every assistant turn) and their PNGs; disjoint seeds, held-out
                 (colour, shape) pairs never in train; distill.jsonl: text-only requests over every pair
                 (stage 2's distillation corpus, stage.distill_data; no image)
    vae/         diffusers AutoencoderKL trained to reconstruct toy scenes
    qwen2_5_vl/  tiny Qwen2.5-VL (real classes and layout) pretrained on captions and questions
    <family>/    diffusers pipeline folder (transformer/, vae/, scheduler/, text_encoder/, tokenizer/) of a
                 toy DiT pretrained with its own text encoder (the family's class: UMT5 / T5 / Gemma2,
                 requests padded to dit_text_length tokens) to draw scenes and to apply edits to a frame

Each part is written under a temporary name and renamed when complete, with the settings it
was built from in ``settings.json`` and its measured figures in ``pretrain.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs

register_configs()


def cached(target: Path, want: dict, build: Callable[[Path], dict], summary: Callable[[dict], str]) -> dict:
    """Build ``target`` with ``build(tmp_path)`` unless a finished one with settings ``want`` is there."""
    stamp = target / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (target / "pretrain.json").is_file():
        stats = json.loads((target / "pretrain.json").read_text())
        print(f"{target.name}: cached ({target}); {summary(stats)}")
        return stats
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        part = Path(tmp) / target.name
        stats = build(part)
        (part / "settings.json").write_text(json.dumps(want))
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(part), target)
    print(f"{target.name}: trained {stats['steps']} steps in {stats['seconds']} s; {summary(stats)} ({target})")
    return stats


def make_distill_corpus(cfg: DictConfig, target: Path) -> None:
    """toyworld/distill.jsonl (cfg.n_distill text-only requests), written when missing or of another size."""
    from fusion.toyworld.conversations import write_distill_corpus

    path = target / "distill.jsonl"
    have = len(path.read_text().splitlines()) if path.is_file() else None
    if not cfg.n_distill or have == cfg.n_distill:
        return
    write_distill_corpus(target, cfg.n_distill, cfg.seed)
    print(f"distill: {cfg.n_distill} text-only requests ({path})")


def make_world(cfg: DictConfig, out: Path) -> None:
    from fusion.toyworld.conversations import make_toyworld

    target = out / "toyworld"
    want = {"n": [cfg.n_train, cfg.n_val, cfg.n_test], "seed": cfg.seed, "size": cfg.image_size}
    stamp = target / "settings.json"
    if (target / "test.jsonl").is_file() and (cfg.skip_existing or (stamp.is_file() and json.loads(stamp.read_text()) == want)):
        print(f"toyworld: exists, reused ({target})")
        make_distill_corpus(cfg, target)
        return
    with tempfile.TemporaryDirectory(dir=out, prefix=".toyworld.") as tmp:
        make_toyworld(tmp, cfg.seed, "toyworld", cfg.n_train, cfg.n_val, cfg.n_test, cfg.image_size)
        (Path(tmp) / "toyworld" / "settings.json").write_text(json.dumps(want))
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(Path(tmp) / "toyworld"), target)
    for split in ("train", "val", "test"):
        kinds = Counter(json.loads(line)["meta"]["kind"] for line in (target / f"{split}.jsonl").read_text().splitlines())
        print(f"{split}: {sum(kinds.values())} conversations ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    print(f"toyworld: wrote {target}")
    make_distill_corpus(cfg, target)


def dit_summary(stats: dict) -> str:
    """make_toy's line for a toy DiT: exact read-back of sampled scenes, and its flow loss on training vs held-out items."""
    line = "sampled scenes read back exactly: " + ", ".join(f"{k} {v:.3f}" for k, v in stats["accuracy"].items())
    if "fit" in stats:  # absent from parts built before it was measured
        line += "; flow loss at t=0.3-0.9, training / held-out items: " + ", ".join(
            f"{k} {v['train']:.4f} / {v['held_out']:.4f}" for k, v in stats["fit"].items())
    if stats.get("accuracy_last"):  # with dit_ema: the saved average above, the last weights here
        line += "; the last weights (not the average): " + ", ".join(f"{k} {v:.3f}" for k, v in stats["accuracy_last"].items())
    return line


@hydra.main(config_path="../conf", config_name="make_toy", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    from omegaconf import OmegaConf

    from fusion.toyworld.conversations import EditMix
    from fusion.toyworld.pretrain import RECIPES, pretrain_dit, pretrain_mllm, pretrain_vae

    OmegaConf.to_object(cfg)  # runs the schema's checks
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_world(cfg, out)
    # the image side joins each part's settings only when it is not 64, so parts built before it was a setting stay cached
    sized = {"size": cfg.image_size} if cfg.image_size != 64 else {}
    vae_want = {"steps": cfg.vae_steps, "channels": list(cfg.vae_channels), "lr": cfg.vae_lr, "seed": cfg.seed, "recipe": RECIPES["vae"], **sized}
    if cfg.vae_steps > 0:
        cached(out / "vae", vae_want,
               lambda p: pretrain_vae(p, steps=cfg.vae_steps, lr=cfg.vae_lr, seed=cfg.seed, channels=tuple(cfg.vae_channels),
                                      image_size=cfg.image_size),
               lambda s: f"reader accuracy of its reconstructions {s['reader_accuracy']:.3f}")
    if cfg.mllm_steps > 0:
        want = {"steps": cfg.mllm_steps, "hidden_size": cfg.mllm_hidden_size, "lr": cfg.mllm_lr, "seed": cfg.seed, "recipe": RECIPES["mllm"], **sized}
        if cfg.mllm_rope_theta != 10000.0:  # only when it differs from the base parts built before the setting used
            want["rope_theta"] = cfg.mllm_rope_theta
        if cfg.mllm_mrope_interleaved:
            want["mrope_interleaved"] = True
        if cfg.mllm_p_text:
            want["p_text"] = cfg.mllm_p_text
        if cfg.mllm_vision_out_scale != 1.0:
            want["vision_out_scale"] = cfg.mllm_vision_out_scale
        if cfg.mllm_optimizer != "adamw":
            want["optimizer"] = cfg.mllm_optimizer
        cached(out / "qwen2_5_vl", want,
               lambda p: pretrain_mllm(p, steps=cfg.mllm_steps, lr=cfg.mllm_lr, seed=cfg.seed, hidden_size=cfg.mllm_hidden_size,
                                         rope_theta=cfg.mllm_rope_theta, mrope_interleaved=cfg.mllm_mrope_interleaved,
                                         p_text=cfg.mllm_p_text, vision_out_scale=cfg.mllm_vision_out_scale, image_size=cfg.image_size,
                                         optimizer=cfg.mllm_optimizer),
               lambda s: f"held-out questions answered exactly {s['answer_accuracy']:.3f}"
                         + (f", text exercises {s['text_accuracy']:.3f}" if "text_accuracy" in s else ""))
    if cfg.dit_steps > 0:
        for family in cfg.dit_families:
            want = {"steps": cfg.dit_steps, "lr": cfg.dit_lr, "batch": cfg.dit_batch, "pool": cfg.dit_pool, "seed": cfg.seed, "vae": vae_want,
                    "text_length": cfg.dit_text_length, "text_layers": cfg.dit_text_layers, "recipe": RECIPES["dit"]}
            # each only when it differs from what parts built before the setting used, so those stay cached
            if cfg.dit_patch != 2:
                want["patch"] = cfg.dit_patch
            if family == "wan" and cfg.dit_coord_freqs:
                want["coord_freqs"] = cfg.dit_coord_freqs
            if family == "wan" and cfg.dit_copy_heads:
                want["copy_heads"] = cfg.dit_copy_heads
            if cfg.dit_p_frames:
                want["p_frames"] = cfg.dit_p_frames
            if cfg.dit_p_context:
                want["p_context"] = cfg.dit_p_context
            want["p_edit"] = cfg.dit_p_edit
            if cfg.dit_p_recolour:
                want["p_recolour"] = cfg.dit_p_recolour
            if cfg.dit_p_shared_colour:
                want["p_shared_colour"] = cfg.dit_p_shared_colour
            if cfg.dit_p_shared_shape:
                want["p_shared_shape"] = cfg.dit_p_shared_shape
            if cfg.dit_t_sampling != "logit_normal":
                want["t_sampling"] = [cfg.dit_t_sampling, cfg.dit_t_shift]
            if cfg.dit_ema:
                want["ema"] = cfg.dit_ema
            if cfg.dit_optimizer != "adamw":
                want["optimizer"] = cfg.dit_optimizer
            freeze = int(cfg.dit_text_freeze * cfg.dit_steps)
            if freeze:
                want["text_freeze_step"] = freeze
            early = out / f"{family}_early"  # the DiT part-way, with its final text encoder (stage 2's warm-up reads it)
            cached(out / family, want,
                   lambda p, f=family, e=early: pretrain_dit(f, p, out / "vae", steps=cfg.dit_steps, batch=cfg.dit_batch, lr=cfg.dit_lr,
                                                     seed=cfg.seed, pool_size=cfg.dit_pool, text_length=cfg.dit_text_length,
                                                     text_layers=cfg.dit_text_layers, eval_n=cfg.dit_eval_n,
                                                     coord_freqs=cfg.dit_coord_freqs, t_sampling=cfg.dit_t_sampling,
                                                     t_shift=cfg.dit_t_shift, copy_heads=cfg.dit_copy_heads if f == "wan" else 0.0,
                                                     p_frames=cfg.dit_p_frames, p_context=cfg.dit_p_context,
                                                     p_edit=cfg.dit_p_edit, edit_mix=EditMix(cfg.dit_p_recolour, cfg.dit_p_shared_colour,
                                                                                       cfg.dit_p_shared_shape),
                                                     ema_decay=cfg.dit_ema, patch=cfg.dit_patch, image_size=cfg.image_size,
                                                     optimizer=cfg.dit_optimizer, text_freeze_step=freeze, early_dir=e),
                   dit_summary)


if __name__ == "__main__":
    main()
