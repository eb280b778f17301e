"""Play toy-world conversations through a fused model and score them.

Every user turn of a test conversation is sent to a fresh :class:`~fusion.generate.Chat`
(so the model answers on its own history, images it drew included); each assistant turn's
images and text are scored by :class:`~fusion.toyworld.evaluate.Scorer`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from fusion.data import read_jsonl
from fusion.generate import Chat, GenerationSettings
from fusion.toyworld.evaluate import Scorer, TurnOutput
from fusion.toyworld.report import cell


def evaluate_split(model, path: str | Path, n: int | None = None, settings: GenerationSettings | None = None,
                   transcripts_dir: str | Path | None = None, n_transcripts: int = 3, progress: bool = True,
                   items_path: str | Path | None = None) -> dict:
    """Scores of ``model`` (a FusedModel) on the first ``n`` conversations of a split file; ``items_path``: also one
    JSON line per assistant turn there (what was due, what was drawn read back, the text; :func:`turn_record`)."""
    from fusion.atomic import write_text_atomic
    from fusion.transcript import write_transcript

    path = Path(path)
    metas = [json.loads(line)["meta"] for line in path.read_text().splitlines() if line.strip()]
    convs = list(read_jsonl(path))
    if n is not None:
        convs, metas = convs[:n], metas[:n]
    items: list[dict] = []
    scorer = Scorer(items if items_path is not None else None)
    per_kind: dict[str, Scorer] = {}
    for i, (conv, meta) in enumerate(tqdm(list(zip(convs, metas)), desc="evaluate", disable=not progress)):
        chat = Chat(model, settings or GenerationSettings())
        outputs = []
        for msg in conv.messages:
            if msg["role"] != "user":
                continue
            text = " ".join(x["text"] for x in msg["content"] if x["type"] == "text")
            images = [x["image"] for x in msg["content"] if x["type"] == "image"]
            new = chat.send(text, images)
            drawn = [s.image for s in new if s.role == "assistant" and s.kind == "image"]
            said = " ".join(s.text for s in new if s.role == "assistant" and s.kind == "text")
            outputs.append(TurnOutput(drawn, said))
        scorer.score(meta, outputs, {"file": path.name, "line": conv.line})
        per_kind.setdefault(meta["kind"], Scorer()).score(meta, outputs)
        if transcripts_dir is not None and i < n_transcripts:
            write_transcript(chat.segments, Path(transcripts_dir) / f"{i:03d}_{meta['kind']}", title=f"{path.name} #{conv.line} ({meta['kind']})")
    if items_path is not None:  # complete or absent: never a half-written file that looks whole
        write_text_atomic(Path(items_path), "".join(json.dumps(r) + "\n" for r in items))
    report = scorer.report()
    report["by_kind"] = {k: s.report() for k, s in sorted(per_kind.items())}
    report["conversations"] = len(convs)
    return report


def format_table(report: dict, keys: tuple[str, ...] = ("trigger_f1", "exact_scene", "t2i_1obj", "t2i_multi", "edit_applied",
                                                     "edit_preserved", "edit_preserved_source_right", "edit_move_applied", "tracking", "text_answer", "gain@0.7",
                                                     "reference_gain@0.7", "gain_ratio@0.7", "gain@0.9", "reference_gain@0.9",
                                                     "gain_ratio@0.9")) -> str:
    rows = ["| metric | value | n |", "|---|---|---|"]
    n = report.get("n", {})
    for k in keys:
        if k in report:
            rows.append(f"| {k} | {cell(report[k])} | {n.get(k, '')} |")
    return "\n".join(rows)
