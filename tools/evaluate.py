"""Toy-world metrics of a fused model: no learned judge, the ground truth of every turn.

Run as:
    python tools/evaluate.py model=outputs/demo/align/final split=test
    python tools/evaluate.py model=... seed=7 fresh_n=100       # a fresh test set drawn with seed 7
    python tools/evaluate.py model=... workers=2                # two processes at once (on a 2-core CPU: faster)

Writes report.json (every metric, overall and by conversation kind), report.md (the table),
items.jsonl (one line per assistant turn: the scenes due and those read back from the drawings, in
words, the edit asked for, the text said and the answer expected; ``jq 'select(.images[]?.exact == false)'``
lists the misses) and transcripts/ (the first few conversations as HTML) into the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fusion.atomic import write_text_atomic
from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs
from fusion.errors import DataError

register_configs()


def measure_gain(model, path: Path, n: int, rows_per_pass: int) -> dict | None:
    """The conditioning gain (fusion/gain.py) on the first ``n`` conversations of ``path`` with an assistant image,
    with the reference of the DiT's own text encoder when the generator the model was trained from still has one."""
    import torch

    from backbones.generator.text_encoder import TextEncoder
    from fusion.data import load_images, read_jsonl
    from fusion.gain import conditioning_gain, summary_line

    convs = [c for c in read_jsonl(path) if c.num_target_images()][:n]
    if len(convs) < 2:
        return None
    source = model.generator_source
    if model.teacher is None and source and TextEncoder.has_one(source):
        model.set_teacher(TextEncoder.from_pretrained(source, device=model.generator.device))
    g = torch.Generator().manual_seed(0)
    gain = conditioning_gain(model, [model.prepare_align_sample(load_images(c), g) for c in convs], rows_per_pass=rows_per_pass)
    print(summary_line(gain))
    return gain


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    OmegaConf.to_object(cfg)
    from fusion.gain import gain_ratios
    from fusion.generate import GenerationSettings, resolve_negative
    from fusion.model import FusedModel
    from fusion.toyworld.conversations import write_split
    from fusion.toyworld.run import evaluate_split, format_table

    out = Path(cfg.output_dir)
    if cfg.seed is not None:
        path = write_split(out / "fresh", cfg.split, cfg.fresh_n, seed=cfg.seed)
    else:
        path = Path(cfg.data_dir) / f"{cfg.split}.jsonl"
        if not path.is_file():
            raise DataError(f"no {cfg.split} split here (make it with python tools/make_toy.py, or pass seed=N for a fresh one)", str(path))
    model = FusedModel.from_pretrained(cfg.model, device=cfg.device)
    settings = GenerationSettings(steps=cfg.steps, guidance=cfg.guidance, image_guidance=cfg.image_guidance, max_new_tokens=cfg.max_new_tokens)
    gains = []  # measured by this process while the other workers play (evaluate_split's beside)
    report = evaluate_split(model, path, cfg.n, settings, out / "transcripts", cfg.transcripts, items_path=out / "items.jsonl",
                            workers=cfg.workers, model_dir=cfg.model,
                            beside=(lambda: gains.append(measure_gain(model, path, cfg.gain_samples, cfg.gain_rows))) if cfg.gain_samples else None)
    report["model"], report["data"] = cfg.model, str(path)
    report["settings"] = {"steps": settings.steps, "guidance": settings.guidance, "image_guidance": settings.image_guidance}
    report["negative"] = resolve_negative(settings.negative, model.trained_negative)  # negative=auto: what stage 2 trained with
    if gains:
        gain = report["conditioning_gain"] = gains[0]
        if gain is not None:  # headline figures at t=0.7 and 0.9: the fused model's gain, its DiT's own-encoder gain, their ratio
            report.update(gain_ratios(gain))  # the ratio is None (undefined) where the DiT's own gain is under RATIO_FLOOR
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    table = format_table(report)
    write_text_atomic(out / "report.md", f"# {cfg.model} on {path}\n\n{table}\n")
    print(table)
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
