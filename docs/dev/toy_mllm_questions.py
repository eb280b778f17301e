"""Greedy answers of a toy MLLM to held-out pretraining questions, by kind (docs/toyworld_log.md: the toy
world's text answers). Not part of the toolkit.

Run as: python docs/dev/toy_mllm_questions.py checkpoints/toy/qwen2_5_vl [n=96]
"""

from __future__ import annotations

import random
import sys
from collections import Counter

import torch

from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
from fusion.toyworld.pretrain import mllm_sample

adapter = Qwen25VLAdapter.from_pretrained(sys.argv[1], add_bov=False)
adapter.model.eval()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 96
rng, counts, eot = random.Random(30_011), Counter(), adapter.end_of_turn_id
for _ in range(n):
    msgs = mllm_sample(rng)
    question, answer = msgs[0]["content"][1]["text"], msgs[1]["content"][0]["text"]
    kind = "caption" if question.startswith(("Describe", "What is in", "What do")) else " ".join(question.split()[:2])
    r = adapter.render(msgs[:1], add_generation_prompt=True)
    inputs = {k: v for k, v in r.model_inputs().items() if k != "labels"}
    with torch.no_grad():
        out = adapter.model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    got = adapter.tokenizer.decode(out[0, r.input_ids.shape[1]:], skip_special_tokens=True).strip()
    counts[kind, got == answer] += 1
for kind in sorted({k for k, _ in counts}):
    print(f"{kind}: {counts[kind, True]}/{counts[kind, True] + counts[kind, False]}")
