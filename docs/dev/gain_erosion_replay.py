"""Replay stage.erosion_warn over a finished stage-2 run's train.log: at each gain measurement, the warning the
trainer would give now (fusion.gain.erosion_warning), from the DiT's own-encoder gains the log line holds.

    python docs/dev/gain_erosion_replay.py outputs/demo/align/train.log [threshold=0.25]

docs/toyworld_log.md, "All six connectors ...": silent on the demo's run and the twelve runs of make ablation, warns
from step 2500 on the resampler run whose DiT trained at 2.5e-4.
"""

import re
import sys

from fusion.gain import DEFAULT_TS, erosion_warning


def main(path: str, threshold: float) -> None:
    history = []
    for line in open(path):
        m = re.search(r"step (\d+): conditioning gain .* own text encoder ([-\d./]+),", line)
        if not m:
            continue
        own = {"step": int(m.group(1)), **{f"reference_gain@{t:g}": float(v) for t, v in zip(DEFAULT_TS, m.group(2).split("/"))}}
        print(own["step"], erosion_warning(history, own, threshold) or "-")
        history.append(own)
    if not history:
        print(f"{path}: no gain line with the DiT's own text encoder")


if __name__ == "__main__":
    kv = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    main(sys.argv[1], float(kv.get("threshold", 0.25)))
