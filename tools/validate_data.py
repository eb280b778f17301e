"""Check a JSONL data file before training: the same checks the training loader applies lazily.

Run as:
    python tools/validate_data.py data.path=/data/train.jsonl data.image_root=/data/images
    python tools/validate_data.py data.path=/data/align.jsonl stage=align mllm.path=outputs/duogen_sft/final/mllm
    python tools/validate_data.py data.path=x.jsonl data.on_error=skip report=outputs/validate.json

Prints: samples, valid, and per problem kind the count and the first lines (file:line: reason).
Exit status 1 if any sample has an error and data.on_error=error (the default here), else 0;
2 for a bad config or a missing file. Checks: JSON, schema, image path policy
(data.allow_outside_root), image exists, decodes, size/aspect the processor accepts, rendered
length <= mllm.max_length (with the MLLM's processor; only the processor and config are read,
no weights), and for stage=align that there is an assistant image to learn from (a warning).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs, validate

register_configs()


@hydra.main(config_path="../conf", config_name="validate_data", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    validate(cfg)
    from fusion.atomic import write_text_atomic
    from fusion.validate import validate_file

    render = None
    note = None
    if cfg.check_length:
        from hydra.utils import instantiate

        from fusion.errors import CheckpointError

        try:
            mllm = instantiate(cfg.mllm, device="meta")  # the architecture and processor only: no weights
            if mllm.processor is None:
                note = f"rendered length (no local processor at mllm.path={cfg.mllm.path})"
            else:
                render = mllm.render
        except CheckpointError as e:
            note = f"rendered length ({e})"
    stage = cfg.stage.name if cfg.stage is not None else None
    d = cfg.data
    from fusion.data import set_max_image_pixels

    set_max_image_pixels(d.max_image_pixels)
    report = validate_file(d.path, d.image_root, d.allow_outside_root, render, stage, progress=sys.stderr.isatty(), fmt=d.format)
    if note:
        report.skipped_checks = [note]
    print(report.render())
    if cfg.report:
        write_text_atomic(cfg.report, json.dumps(report.to_json(), indent=2))
        print(f"wrote {cfg.report}")
    if report.errors and d.on_error == "error":
        sys.exit(1)


if __name__ == "__main__":
    main()
