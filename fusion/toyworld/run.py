"""Play toy-world conversations through a fused model and score them.

Every user turn of a test conversation is sent to a fresh :class:`~fusion.generate.Chat`
(so the model answers on its own history, images it drew included); each assistant turn's
images and text are scored by :class:`~fusion.toyworld.evaluate.Scorer`.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from fusion.data import read_jsonl
from fusion.generate import Chat, GenerationSettings
from fusion.toyworld.evaluate import Scorer, TurnOutput
from fusion.toyworld.report import cell


def play(model, conv, settings: GenerationSettings | None = None, transcript: tuple[Path, str] | None = None) -> list[TurnOutput]:
    """Send each user turn of ``conv`` to a fresh :class:`Chat`; the assistant's drawings and text, one per user turn.
    ``transcript``: (folder, title) where the chat is written as HTML."""
    from fusion.transcript import write_transcript

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
    if transcript is not None:
        write_transcript(chat.segments, transcript[0], title=transcript[1])
    return outputs


def _play_one(model, convs: list, metas: list[dict], i: int, path: Path, settings, transcripts_dir, n_transcripts: int):
    where = Path(transcripts_dir) / f"{i:03d}_{metas[i]['kind']}" if transcripts_dir is not None and i < n_transcripts else None
    return play(model, convs[i], settings, None if where is None else (where, f"{path.name} #{convs[i].line} ({metas[i]['kind']})"))


def _load_split(path: Path, n: int | None) -> tuple[list, list[dict]]:
    metas = [json.loads(line)["meta"] for line in path.read_text().splitlines() if line.strip()]
    convs = list(read_jsonl(path))
    return (convs[:n], metas[:n]) if n is not None else (convs, metas)


_COUNTER = None  # in a worker process: the shared index of the next conversation to play (_init_worker)


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def _play_claimed(model, convs: list, metas: list[dict], counter, path: Path, settings, transcripts_dir, n_transcripts: int,
                  bar=None) -> dict[int, list[TurnOutput]]:
    """Play the next unclaimed conversation until none is left (every process claims from the same counter, so a
    process that drew long conversations takes fewer of them)."""
    out = {}
    while True:
        with counter.get_lock():
            i = counter.value
            if i >= len(convs):
                return out
            counter.value = i + 1
        out[i] = _play_one(model, convs, metas, i, path, settings, transcripts_dir, n_transcripts)
        if bar is not None:  # the conversations every process has taken
            bar.n = counter.value
            bar.refresh()


def _play_worker(model_dir: str, device: str, path: str, n: int | None, settings, transcripts_dir,
                 n_transcripts: int) -> dict[int, list[TurnOutput]]:
    """A worker process's share of :func:`evaluate_split` (its own model, torch on one thread)."""
    import torch

    from fusion.model import FusedModel

    torch.set_num_threads(1)
    convs, metas = _load_split(Path(path), n)
    model = FusedModel.from_pretrained(model_dir, device=device)
    return _play_claimed(model, convs, metas, _COUNTER, Path(path), settings, transcripts_dir, n_transcripts)


def evaluate_split(model, path: str | Path, n: int | None = None, settings: GenerationSettings | None = None,
                   transcripts_dir: str | Path | None = None, n_transcripts: int = 3, progress: bool = True,
                   items_path: str | Path | None = None, workers: int = 1, model_dir: str | Path | None = None,
                   beside: Callable[[], object] | None = None) -> dict:
    """Scores of ``model`` (a FusedModel) on the first ``n`` conversations of a split file; ``items_path``: also one
    JSON line per assistant turn there (what was due, what was drawn read back, the text; :func:`turn_record`).

    ``workers`` > 1: the conversations are played in that many processes at once (this one and ``workers - 1`` others
    that load the model from ``model_dir``), each on one torch thread, each taking the next conversation not yet taken;
    each conversation's chat is seeded on its own (:class:`GenerationSettings`), so the scores are those of one process
    up to the rounding of other thread counts. Scoring, the items and the report are the same code either way.

    ``beside``: other work of this process (tools/evaluate.py: the conditioning gain), run before it takes any
    conversation, so with ``workers`` > 1 on one thread while the others play (they take more conversations meanwhile)."""
    from fusion.atomic import write_text_atomic

    path = Path(path)
    convs, metas = _load_split(path, n)
    if workers > 1 and model_dir is None:
        raise ValueError("evaluate_split(workers > 1) needs model_dir: each worker process loads the model itself")
    workers = max(1, min(workers, len(convs)))
    bar = tqdm(total=len(convs), desc="evaluate" if workers == 1 else f"evaluate ({workers} processes)", disable=not progress)
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)  # the next conversation not yet taken, shared by every process
    if workers == 1:
        if beside is not None:
            beside()
        outputs = _play_claimed(model, convs, metas, counter, path, settings, transcripts_dir, n_transcripts, bar)
    else:
        import torch

        with ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
            futures = [pool.submit(_play_worker, str(model_dir), str(next(model.parameters()).device), str(path), n, settings,
                                   transcripts_dir, n_transcripts) for _ in range(workers - 1)]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                if beside is not None:
                    beside()
                outputs = _play_claimed(model, convs, metas, counter, path, settings, transcripts_dir, n_transcripts, bar)
            finally:
                torch.set_num_threads(threads)
            for f in futures:
                outputs.update(f.result())
        bar.n = len(convs)
    bar.close()
    items: list[dict] = []
    scorer = Scorer(items if items_path is not None else None)
    per_kind: dict[str, Scorer] = {}
    for i, (conv, meta) in enumerate(zip(convs, metas)):
        scorer.score(meta, outputs[i], {"file": path.name, "line": conv.line})
        per_kind.setdefault(meta["kind"], Scorer()).score(meta, outputs[i])
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
