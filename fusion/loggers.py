"""Metric loggers, chosen with ``logger=<name>`` (``conf/logger/``).

Every logger appends to ``<output_dir>/metrics.jsonl`` so a run is readable without an
account; :class:`WandbLogger` also sends the metrics (and images) to Weights & Biases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class JsonlLogger:
    """Append one json object per ``log`` call to ``<output_dir>/metrics.jsonl``."""

    def __init__(self, output_dir: str | Path = ".", run_config: dict | None = None, start_step: int = 0, **_: Any):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._start = time.time()
        self._truncate(start_step)

    def _truncate(self, start_step: int) -> None:
        """Keep only rows up to ``start_step`` (a fresh run: none; a resumed run: those before its checkpoint)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if row.get("step") is not None and row["step"] <= start_step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        tmp.replace(self.path)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"step": step, "time": round(time.time() - self._start, 3)}
        row.update({k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, str)) else v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_images(self, images: dict[str, Any], step: int | None = None) -> None:  # files are already on disk
        pass

    def finish(self) -> None:
        pass


class WandbLogger(JsonlLogger):
    """Weights & Biases run (``mode`` online / offline / disabled) plus metrics.jsonl."""

    def __init__(self, output_dir: str | Path = ".", run_config: dict | None = None, start_step: int = 0, project: str = "unifuse",
                 mode: str = "offline", **_: Any):
        super().__init__(output_dir, start_step=start_step)
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, mode=mode, dir=str(output_dir), config=run_config or {})

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log(metrics, step)
        self.run.log(dict(metrics), step=step)

    def log_images(self, images: dict[str, Any], step: int | None = None) -> None:
        self.run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()
