"""How often a stage-1 toy MLLM writes each assistant text line of a split right, given the
conversation's ground-truth prefix (teacher forcing: every token of the line is its argmax after
the true tokens before it, the real images in the context, no DiT). A "line" is a run of
supervised assistant text up to ``<|bov|>`` or the end of the turn. By conversation kind and line
(step-by-step: "Now <object>." before each image, copied from the request). Not part of the toolkit.

Run as: python docs/dev/toy_sft_lines.py outputs/demo/sft/final/mllm [checkpoints/toy/toyworld/test.jsonl] [kind ...]
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch

from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
from fusion.data import load_images, read_jsonl

split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
kinds = set(sys.argv[3:]) or {"steps"}
adapter = Qwen25VLAdapter.from_pretrained(sys.argv[1])
adapter.model.eval()
stops = {adapter.bov_token_id, adapter.end_of_turn_id}
right, total, misses = Counter(), Counter(), []
for conv, line in zip(read_jsonl(split), open(split)):
    kind = json.loads(line)["meta"]["kind"]
    if kind not in kinds:
        continue
    r = adapter.render(load_images(conv))
    inputs = {k: v for k, v in r.model_inputs().items() if k != "labels"}
    with torch.no_grad():
        pred = adapter(**inputs)["logits"][0, :-1].argmax(-1)
    labels, ids = r.labels[0, 1:], r.input_ids[0]
    n, ok, start = 0, True, None
    for i, lab in enumerate(labels.tolist()):
        if lab == -100:
            continue
        start = i + 1 if start is None else start
        ok &= int(pred[i]) == lab
        if lab in stops:  # the line ends with its <|bov|> or the end of the turn
            n += 1
            right[kind, n] += ok
            total[kind, n] += 1
            if not ok:
                misses.append(f"{adapter.tokenizer.decode(ids[start:i + 2])!r} -> "
                              f"{adapter.tokenizer.decode(pred[start - 1:i + 1])!r}")
            ok, start = True, None
for key in sorted(total):
    print(f"{key[0]} line {key[1]}: {right[key]}/{total[key]}")
print(f"all: {sum(right.values())}/{sum(total.values())}")
print("misses (first 12):", *misses[:12], sep="\n  ")
