"""Write the toy world: train / val / test splits of interleaved conversations with ground
truth, and the toy-pretrained VAE (cached: rerunning reuses it while its settings match).

Run as:
    python tools/make_toy.py out_dir=checkpoints/toy n_train=600 n_val=60 n_test=60
    python tools/make_toy.py vae_steps=0          # data only

Each split is a JSONL file (the project's chat format plus a ``meta`` field with the ground
truth of every assistant turn) and a folder of PNGs. The splits use disjoint seeds; the
held-out (colour, shape) pairs of ``fusion/toyworld/conversations.py`` never occur in train.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion.cli import friendly_errors, setup_environment
from fusion.config import register_configs

register_configs()


def make_vae(cfg: DictConfig, target: Path) -> None:
    """Pretrain the toy VAE unless a finished one with the same settings is there (cached)."""
    import json

    from fusion.toyworld.pretrain import pretrain_vae

    want = {"steps": cfg.vae_steps, "channels": list(cfg.vae_channels), "lr": cfg.vae_lr, "seed": cfg.seed}
    stamp = target / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"vae: cached ({target}); reader accuracy {json.loads((target / 'pretrain.json').read_text())['reader_accuracy']:.3f}")
        return
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".vae.") as tmp:
        stats = pretrain_vae(Path(tmp) / "vae", steps=cfg.vae_steps, lr=cfg.vae_lr, seed=cfg.seed, channels=tuple(cfg.vae_channels))
        (Path(tmp) / "vae" / "settings.json").write_text(json.dumps(want))
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(Path(tmp) / "vae"), target)
    print(f"vae: trained {stats['steps']} steps in {stats['seconds']} s; reader accuracy {stats['reader_accuracy']:.3f} ({target})")


@hydra.main(config_path="../conf", config_name="make_toy", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    setup_environment()
    import json

    from fusion.toyworld.conversations import make_toyworld

    out = Path(cfg.out_dir)
    target = out / "toyworld"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.vae_steps > 0:
        make_vae(cfg, out / "vae")
    if cfg.skip_existing and (target / "test.jsonl").is_file():
        print(f"toyworld: exists, skipped ({target})")
        return
    with tempfile.TemporaryDirectory(dir=out, prefix=".toyworld.") as tmp:
        make_toyworld(tmp, cfg.seed, "toyworld", cfg.n_train, cfg.n_val, cfg.n_test, cfg.image_size)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(Path(tmp) / "toyworld"), target)
    for split in ("train", "val", "test"):
        kinds = Counter(json.loads(line)["meta"]["kind"] for line in (target / f"{split}.jsonl").read_text().splitlines())
        print(f"{split}: {sum(kinds.values())} conversations ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    print(f"toyworld: wrote {target}")


if __name__ == "__main__":
    main()
