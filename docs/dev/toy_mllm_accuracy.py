"""make_toy's scores of pretrained toy MLLMs (``fusion.toyworld.pretrain.mllm_accuracy``): held-out picture
questions and text exercises, 64 each. Re-scores MLLMs built before the picture score was fixed to never ask a text
exercise (docs/toyworld_log.md: the MLLM pretraining trials). Not part of the toolkit.

Run as: python docs/dev/toy_mllm_accuracy.py checkpoints/toy/qwen2_5_vl [more MLLM folders ...]
"""

from __future__ import annotations

import sys

from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
from fusion.toyworld.pretrain import mllm_accuracy

for path in sys.argv[1:]:
    adapter = Qwen25VLAdapter.from_pretrained(path, add_bov=False)
    adapter.model.eval()
    print(f"{path}: picture questions {mllm_accuracy(adapter):.3f}, text exercises {mllm_accuracy(adapter, text_only=True):.3f}", flush=True)
