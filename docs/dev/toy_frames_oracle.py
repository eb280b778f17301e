"""The frame-selection oracle: the toy world's distractor conversations played through a fused
model, with the turn that refers back to the first picture handed only that picture as its
condition frame (``oracle``) or every earlier image (``all``, what the model does with
``stage.frame_select=all``). The gap is what picking the right frame is worth (docs/toyworld_log.md,
frame selection). Not part of the toolkit.

Run as: python docs/dev/toy_frames_oracle.py outputs/joint1500/final oracle|all [checkpoints/toy/toyworld/test.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fusion.toyworld.run as run
from fusion.generate import Chat, GenerationSettings
from fusion.model import FusedModel
from fusion.toyworld.conversations import BACK

model_dir, mode = sys.argv[1], sys.argv[2]
split = Path(sys.argv[3] if len(sys.argv) > 3 else "checkpoints/toy/toyworld/test.jsonl")
BACK_OPENINGS = tuple(b.split("{")[0] for b in BACK)


class OracleChat(Chat):
    def send(self, text, images=()):
        self.refers_back = text.startswith(BACK_OPENINGS)
        return super().send(text, images)

    def _frames_for(self, ctx):
        frames = super()._frames_for(ctx)
        return [0] if mode == "oracle" and getattr(self, "refers_back", False) else frames


run.Chat = OracleChat
lines = [x for x in split.read_text().splitlines() if x.strip() and json.loads(x)["meta"]["kind"] == "distractor"]
only = split.parent / f"_distractor_only_{mode}.jsonl"  # beside the split: its image paths are relative to it
only.write_text("\n".join(lines) + "\n")
try:
    settings = GenerationSettings(steps=20, guidance=3.0, max_new_tokens=64)  # tools/evaluate.py's defaults
    report = run.evaluate_split(FusedModel.from_pretrained(model_dir), only, settings=settings, progress=False)
finally:
    only.unlink()
keys = ("tracking", "tracking_one_earlier", "tracking_several_earlier", "edit_applied", "edit_preserved", "exact_scene_distractor")
print(mode, {k: round(report[k], 3) for k in keys if k in report}, {k: report["n"].get(k) for k in keys[:3]})
