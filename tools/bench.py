"""Benchmarks that print ratios measured side by side in one process.

Run as:
    python tools/bench.py                                   # on an untrained tiny fused model
    python tools/bench.py model=outputs/demo/align/final history_turns=8 images=4

``generation``: one answer with ``images`` images (``<|bov|>`` forced at fixed decode steps,
so every variant produces the same tokens) after ``history_turns`` earlier turns, run three
ways with the same seed: the KV-cached loop (each MLLM token runs once), the naive loop that
re-encodes the full context at each image, and the fully uncached loop. Reported: token
forwards / final sequence length, median wall time, the speed-up ratios, and whether the
outputs (tokens, image latents) agree. Writes bench.json and bench.md to the run folder.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs

register_configs()


def build_model(cfg: DictConfig):
    from hydra import compose, initialize_config_dir

    from fusion.model import FusedModel

    if cfg.model:
        return FusedModel.from_pretrained(cfg.model)
    conf = Path(__file__).resolve().parents[1] / "conf"
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    overrides = [f"tiny_dir={cfg.tiny_dir}", "stage=align", f"generator={cfg.generator}", f"connector={cfg.connector}"]
    if cfg.mllm_hidden:  # a wider MLLM of the real class, so the MLLM's share of the time is not negligible
        from backbones.mllm.tiny_qwen2_5_vl import make_tiny

        path = make_tiny(Path(cfg.output_dir) / "bench_mllm", name="qwen2_5_vl", hidden_size=cfg.mllm_hidden, num_layers=cfg.mllm_layers)
        overrides.append(f"mllm.path={path}")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        c = compose("config", overrides)
    torch.manual_seed(0)
    return FusedModel.build(c)


def history_images(n: int):
    import random

    from fusion.toyworld.scenes import random_scene, render

    rng = random.Random(0)
    return [render(random_scene(rng, 1 + i % 3)) for i in range(n)]


def run_answer(model, cfg: DictConfig, recompute: str):
    from fusion.generate import Chat, ForceTokens, GenerationSettings

    words = " ".join(["the red circle moves next to the blue square"] * (cfg.words_per_turn // 9 + 1)).split()[: cfg.words_per_turn]
    chat = Chat(model, GenerationSettings(steps=cfg.steps, guidance=3.0, max_new_tokens=8 * cfg.images + 8), recompute=recompute)
    # history: force an immediate end of turn so every variant holds the same context
    for i, img in enumerate(history_images(cfg.history_turns)):
        chat.logits_processor = ForceTokens({0: chat.mllm.end_of_turn_id})
        chat.send(f"Turn {i}: " + " ".join(words), images=[img])
    bov, eot = chat.mllm.bov_token_id, chat.mllm.end_of_turn_id
    schedule = {2 + 3 * k: bov for k in range(cfg.images)}
    schedule[2 + 3 * cfg.images] = eot
    chat.logits_processor = ForceTokens(schedule)
    start_forwards = chat.state.tokens_forwarded
    t0 = time.perf_counter()
    chat.send("Now draw it step by step.")
    seconds = time.perf_counter() - t0
    return chat, seconds, chat.state.tokens_forwarded - start_forwards


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    model = build_model(cfg).eval()
    variants = {"cached": "never", "reencode_at_images": "images", "uncached": "always"}
    results, chats = {}, {}
    run_answer(model, cfg, "never")  # warm-up
    for name, mode in variants.items():
        times = []
        for _ in range(cfg.repeats):
            chat, seconds, forwards = run_answer(model, cfg, mode)
            times.append(seconds)
        chats[name] = chat
        drawn = len([s for s in chat.segments if s.kind == "image" and s.role == "assistant"])
        results[name] = {"median_seconds": statistics.median(times), "seconds": times, "images": drawn,
                         "sequence_length": chat.state.length, "tokens_forwarded_total": chat.state.tokens_forwarded,
                         "forwards_per_token": chat.state.tokens_forwarded / chat.state.length, "answer_token_forwards": forwards}
    ref = chats["cached"]
    for name, chat in chats.items():
        same_tokens = chat.state.ids == ref.state.ids
        diff = max(float((a - b).abs().max()) for a, b in zip(ref._latents, chat._latents))
        results[name]["same_tokens_as_cached"] = same_tokens
        results[name]["max_latent_diff_vs_cached"] = diff
        results[name]["speedup_of_cached"] = results[name]["median_seconds"] / results["cached"]["median_seconds"]
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_mllm = sum(p.numel() for p in model.mllm.parameters())
    n_dit = sum(p.numel() for p in model.generator.transformer.parameters())
    meta = {"model": cfg.model or f"untrained ({cfg.generator} + {cfg.connector})", "mllm_params": n_mllm, "dit_params": n_dit, "images": cfg.images,
            "history_turns": cfg.history_turns, "words_per_turn": cfg.words_per_turn, "steps": cfg.steps, "repeats": cfg.repeats,
            "torch_threads": torch.get_num_threads()}
    (out / "bench.json").write_text(json.dumps({"generation": results, "meta": meta}, indent=2))
    lines = ["| variant | images | seq len | token forwards / seq len | median s | cached is faster by | same tokens | max latent diff |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['images']} | {r['sequence_length']} | {r['forwards_per_token']:.2f} | {r['median_seconds']:.3f} | "
                     f"{r['speedup_of_cached']:.2f}x | {r['same_tokens_as_cached']} | {r['max_latent_diff_vs_cached']:.1e} |")
    table = "\n".join(lines)
    (out / "bench.md").write_text(f"# generation benchmark\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


if __name__ == "__main__":
    main()
