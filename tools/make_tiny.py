"""Write tiny random-init checkpoints in the published folder layouts (no network needed).

Run as:
    python tools/make_tiny.py out_dir=checkpoints/tiny
    python tools/make_tiny.py out_dir=/tmp/tiny seed=1 skip_existing=true

Each part is a sub-folder of ``out_dir`` that loads with the same ``from_pretrained`` path
as the published checkpoint (``qwen2_5_vl``: ``AutoProcessor`` +
``Qwen2_5_VLForConditionalGeneration``), plus ``demo_data`` (a few interleaved
conversations). Parts are listed in ``conf/make_tiny.yaml`` (``parts``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs

register_configs()


def make_parts(cfg: DictConfig) -> dict[str, Path]:
    """Build every part into a temporary folder, then move it into place (never half-written)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, spec in cfg.parts.items():
        target = out / name
        if cfg.skip_existing and target.is_dir():
            print(f"{name}: exists, skipped ({target})")
            continue
        builder = instantiate(spec)
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}.") as tmp:
            builder(out_dir=tmp, seed=cfg.seed, name=name)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(Path(tmp) / name), target)
        written[name] = target
        print(f"{name}: wrote {target}")
    return written


@hydra.main(config_path="../conf", config_name="make_tiny", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    make_parts(cfg)


if __name__ == "__main__":
    main()
