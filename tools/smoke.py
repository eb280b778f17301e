"""The end-to-end smoke path on tiny checkpoints (``make smoke``).

Run as:
    python tools/make_tiny.py out_dir=checkpoints/tiny && python tools/smoke.py
    python tools/smoke.py mllm.hidden_layers=[0,-1] max_new_tokens=8

It loads the MLLM through the adapter (``<|bov|>`` added once), reads the demo data set,
renders each conversation (ids, labels, images), reports the supervised tokens and the
selected hidden states, then runs one interleaved turn with the KV cache: decode until
``<|bov|>`` (forced here, since the tiny model is untrained), append an image to the cache,
go on decoding, and checks the cached states against a full forward of the same ids.
The generator, connector, training and toy world arrive with later issues.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from backbones.generator.base import to_pil
from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs, validate
from fusion.data import SkipReport, read_jsonl
from fusion.errors import ConfigError

register_configs()
console = Console()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    validate(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mllm = instantiate(cfg.mllm, device=cfg.device)
    mllm.eval()
    console.print(
        f"[bold]MLLM[/] {cfg.mllm.path}: {mllm.num_layers} layers, width {mllm.hidden_size}, "
        f"<|bov|> id {mllm.bov_token_id}, hidden layers {mllm.hidden_layers}"
    )

    report = SkipReport()
    convs = list(read_jsonl(cfg.data.path, cfg.data.image_root, cfg.data.on_error, report))
    table = Table(title=f"{cfg.data.path} ({report.summary()})")
    for col in ("line", "tokens", "supervised", "images (user/assistant)", "hidden states"):
        table.add_column(col)
    for conv in convs:
        r = mllm.render(conv)
        with torch.no_grad():
            h = mllm(**{k: (v.to(mllm.device) if v is not None else v) for k, v in r.model_inputs().items()}, compute_logits=False)["hidden"]
        roles = r.image_roles
        table.add_row(
            str(conv.line), str(r.length), str(int((r.labels != -100).sum())),
            f"{roles.count('user')}/{roles.count('assistant')}", str(tuple(h.shape)),
        )
    console.print(table)

    # One interleaved turn with the KV cache.
    conv = convs[0]
    user = {"messages": [m for m in conv.messages if m["role"] == "user"][:1]}
    prompt = mllm.render(conv.__class__(user["messages"], conv.source, conv.line), add_generation_prompt=True)
    state = mllm.new_state()
    mllm.prefill(state, prompt)
    new, reason = mllm.decode(state, max_new_tokens=cfg.max_new_tokens)
    console.print(f"decoded {len(new)} tokens (stop: {reason}): {mllm.tokenizer.decode(new)!r}")
    if reason != "bov":
        mllm.extend(state, [mllm.bov_token_id])  # the untrained tiny model rarely says <|bov|> by itself
    target = next(item["image"] for role, item in conv.image_items() if role == "assistant")
    mllm.append_image(state, target)
    new2, reason2 = mllm.decode(state, max_new_tokens=cfg.max_new_tokens)
    console.print(f"after the image: {len(new2)} tokens (stop: {reason2}): {mllm.tokenizer.decode(new2)!r}")

    with torch.no_grad():
        ids = torch.tensor([state.ids], device=mllm.device)
        pv = torch.cat([prompt.pixel_values, mllm.image_inputs(target)[1]]) if prompt.pixel_values is not None else mllm.image_inputs(target)[1]
        grids = torch.stack(state.image_grids)
        full = mllm(ids, pixel_values=pv.to(mllm.device), image_grid_thw=grids.to(mllm.device), compute_logits=False)["hidden"][0]
    diff = (state.hidden_states() - full).abs().max().item()
    summary = {
        "sequence_length": state.length,
        "tokens_forwarded": state.tokens_forwarded,
        "forwards_per_token": state.tokens_forwarded / state.length,
        "cached_vs_full_max_abs_diff": diff,
        "images_in_cache": len(state.image_grids),
    }
    if cfg.generator is not None:
        summary["fused"] = fused_step(cfg, out)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    console.print(summary)
    console.print(f"[green]ok[/]: wrote {out / 'demo_summary.json'}")
    if diff > 1e-3:
        raise SystemExit(f"cached decoding disagrees with a full forward (max abs diff {diff:.2e})")


def fused_step(cfg: DictConfig, out: Path) -> dict:
    """Build the fused model, run one stage-2 step on the demo data, draw one image, save the model."""
    from fusion.model import FusedModel

    if cfg.connector is None or cfg.stage is None or cfg.stage.name != "align":
        raise ConfigError("generator=... in the demo needs connector=<name> and stage=align "
                          "(e.g. python tools/smoke.py stage=align generator=tiny_wan connector=last_mlp)")
    model = FusedModel.build(cfg)
    report = model.apply_trainable(cfg.stage)
    g = torch.Generator().manual_seed(cfg.seed)
    convs = [c for c in read_jsonl(cfg.data.path, cfg.data.image_root, cfg.data.on_error) if c.num_target_images()]
    samples = [model.prepare_align_sample(c, g) for c in convs]
    opt = torch.optim.AdamW(model.param_groups(cfg.stage))
    losses = model.align_loss(samples, g)
    losses["loss"].backward()
    opt.step()
    model.eval()
    s = max(samples, key=lambda x: 0 if x.cond is None else x.cond.shape[0])  # one with condition frames
    with torch.no_grad():
        states, mask, _ = model.context_states(s.ctx_ids, s.ctx_pixel_values, s.ctx_grids)
        img = model.generator.sample(states, mask, None if s.cond is None else s.cond[None], steps=4, guidance=2.0,
                                     generator=torch.Generator().manual_seed(cfg.seed))
    name = f"{type(model.generator).__name__}_{type(model.connector).__name__}"
    path = out / f"sample_{name}.png"
    to_pil(img)[0].save(path)
    saved = model.save_pretrained(out / "fused_model", config=cfg)
    trainable = {k: v[0] for k, v in report.items()}
    console.print(f"[bold]{name}[/]: trainable {trainable}; align loss {losses['loss'].item():.4f} -> {path}; model -> {saved}")
    return {"generator": type(model.generator).__name__, "connector": type(model.connector).__name__,
            "loss": losses["loss"].item(), "trainable": trainable, "sample": str(path), "saved": str(saved),
            "condition_frames": 0 if s.cond is None else s.cond.shape[0]}


if __name__ == "__main__":
    main()
