"""The stage-1 side-by-side data set of issue 18: 64 one-image Q&A samples at 112x112 (unifuse JSONL + PNGs).

Run as:
    python docs/dev/make_qa64.py /tmp/qa64
    python tools/train.py mllm=tiny tiny_dir=checkpoints/tiny stage=sft data=jsonl data.path=/tmp/qa64/train.jsonl \
        stage.micro_batch_size=4 stage.max_steps=32 stage.lr=1e-5 hydra.run.dir=/tmp/qa64/run resume=never
    tail -1 /tmp/qa64/run/metrics.jsonl      # "time": seconds of the training loop (32 steps)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw


def main(out: str) -> Path:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = []
    for i in range(64):
        colour = rng.choice(["red", "green", "blue", "yellow"])
        im = Image.new("RGB", (112, 112), "white")
        ImageDraw.Draw(im).ellipse((20, 20, 90, 90), fill=colour)
        im.save(root / f"img{i}.png")
        lines.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img{i}.png"},
                                         {"type": "text", "text": "What color is the circle in this picture?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"The circle is {colour}."}]}]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qa64"))
