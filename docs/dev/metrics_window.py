"""Mean of metrics.jsonl keys over windows of steps, for several stage-2 runs side by side (the
frame head's weight trial in docs/toyworld_log.md: distillation loss per 500 steps, frame_acc at the end).
Not part of the toolkit.

Run as: python docs/dev/metrics_window.py distill 500 outputs/joint1500 outputs/frames1 outputs/frames2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

key, width, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for run in runs:
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if key in r]
    last = max((r["step"] for r in rows), default=0)
    cells = []
    for start in range(0, last, width):
        values = [r[key] for r in rows if start < r["step"] <= start + width]
        cells.append(f"{start + 1}-{start + width}: {sum(values) / len(values):.4f}" if values else f"{start + 1}-{start + width}: -")
    print(run, key, "; ".join(cells))
