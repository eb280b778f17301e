"""Greedy text answers of a stage-1 toy MLLM on the test split's text-answer turns, each given the
conversation's ground-truth prefix (its real images, no DiT): the MLLM alone, by question. Not
part of the toolkit.

Run as: python docs/dev/toy_sft_answers.py outputs/demo/sft/final/mllm [checkpoints/toy/toyworld/test.jsonl]
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import torch

from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter
from fusion.data import read_jsonl

split = sys.argv[2] if len(sys.argv) > 2 else "checkpoints/toy/toyworld/test.jsonl"
adapter = Qwen25VLAdapter.from_pretrained(sys.argv[1])
adapter.model.eval()
eot = adapter.end_of_turn_id
metas = [json.loads(line)["meta"] for line in open(split) if line.strip()]
counts, misses = Counter(), []
for conv, meta in zip(read_jsonl(split), metas):
    answers = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
    for turn, i in zip(meta["turns"], answers):
        if turn.get("answer") is None:
            continue
        r = adapter.render({"messages": conv.messages[:i]}, add_generation_prompt=True)
        inputs = {k: v for k, v in r.model_inputs().items() if k != "labels"}
        with torch.no_grad():
            out = adapter.model.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        said = adapter.tokenizer.decode(out[0, r.input_ids.shape[1]:], skip_special_tokens=True).strip()
        words = re.findall(r"[a-z]+", said.lower())
        ok = all(w in words for w in turn["answer"].lower().split())  # the evaluator's text_answer rule
        question = " ".join(x["text"] for x in conv.messages[i - 1]["content"] if x["type"] == "text")
        kind = f"{meta['kind']}: " + (" ".join(question.split()[:2]) if meta["kind"] == "question" else question)
        counts[kind, ok] += 1
        if not ok:
            misses.append(f"{question!r} -> {said!r} (expected {turn['answer']!r})")
for kind in sorted({k for k, _ in counts}):
    print(f"{kind}: {counts[kind, True]}/{counts[kind, True] + counts[kind, False]}")
total = sum(v for (_, ok), v in counts.items() if ok), sum(counts.values())
print(f"all: {total[0]}/{total[1]}")
print("misses (first 10):", *misses[:10], sep="\n  ")
