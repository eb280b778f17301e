"""Write a data set in another layout as unifuse JSONL (the Qwen-VL chat format every tool here reads).

Run as:
    python tools/convert_data.py in=data/llamafactory.jsonl in_format=sharegpt out=data/unifuse/train.jsonl
    python tools/convert_data.py in=data/hf_parquet/ in_format=hf out=data/unifuse/train.jsonl on_error=skip

Images (paths, or bytes embedded in parquet / arrow) are copied under ``<out's folder>/images/`` with
names from their content hashes; the JSONL appears only complete. Every check of the loader applies
(bad lines stop the conversion naming file:line, or are skipped and counted with on_error=skip).
Formats: fusion/formats.py. Training reads sharegpt and hf directly too (``data.format=``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment
from fusion.errors import ConfigError

KEYS = {"in", "in_format", "out", "image_root", "on_error", "max_image_pixels"}


@hydra.main(config_path="../conf", config_name="convert_data", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    from fusion.data import SkipReport, set_max_image_pixels
    from fusion.formats import FORMATS, convert_to_unifuse

    unknown = set(cfg) - KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}; tools/convert_data.py takes {', '.join(sorted(KEYS))}")
    for key in ("in", "out"):
        if cfg.get(key) in (None, "", "???"):
            raise ConfigError(f"give {key}=<path>")
    if cfg.in_format not in FORMATS:
        raise ConfigError(f"in_format must be one of {', '.join(FORMATS)}, got {cfg.in_format!r}")
    if cfg.on_error not in ("error", "skip"):
        raise ConfigError(f"on_error must be error or skip, got {cfg.on_error!r}")
    set_max_image_pixels(cfg.max_image_pixels)
    report = SkipReport()
    n = convert_to_unifuse(cfg["in"], cfg.in_format, cfg.out, cfg.image_root, cfg.on_error, report, progress=sys.stderr.isatty())
    print(f"wrote {n} conversations to {cfg.out} (images under {hydra.utils.to_absolute_path(str(cfg.out))}/../images); {report.summary()}")
    for e in report.examples[:5]:
        print(f"  {e}")


if __name__ == "__main__":
    main()
