"""The command-line tools as a user runs them: one clear line on bad input, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(tool, *overrides, cwd=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *overrides],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("made")
    p = run("make_tiny.py", f"out_dir={out}", f"hydra.run.dir={out}/hydra")
    assert p.returncode == 0, p.stderr
    return out, p


def test_make_tiny_writes_a_loadable_mllm(made):
    out, p = made
    assert "qwen2_5_vl: wrote" in p.stdout
    from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter

    a = Qwen25VLAdapter.from_pretrained(str(out / "qwen2_5_vl"))
    assert a.num_layers == 4 and a.hidden_size == 64
    assert (out / "demo_data" / "conversations.jsonl").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_make_tiny_skip_existing(made):
    out, _ = made
    p = run("make_tiny.py", f"out_dir={out}", "skip_existing=true", f"hydra.run.dir={out}/hydra")
    assert p.returncode == 0 and "exists, skipped" in p.stdout


def test_demo_runs_end_to_end(made, tmp_path):
    out, _ = made
    p = run("smoke.py", f"tiny_dir={out}", "max_new_tokens=4", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["forwards_per_token"] == 1.0
    assert summary["cached_vs_full_max_abs_diff"] < 1e-4
    assert summary["images_in_cache"] == 1


@pytest.mark.parametrize("generator, connector, mllm", [("tiny_wan", "last_mlp", "tiny"), ("tiny_cosmos", "queries", "tiny_qwen3_vl"),
                                                         pytest.param("tiny_sana", "multiscale_queries", "tiny", marks=pytest.mark.slow)])
def test_demo_fused_step_with_each_generator_needs_no_code_change(made, tmp_path, generator, connector, mllm):
    out, _ = made
    p = run("smoke.py", f"tiny_dir={out}", "max_new_tokens=2", "stage=align", f"mllm={mllm}", f"generator={generator}", f"connector={connector}",
            f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    g = json.loads((tmp_path / "demo_summary.json").read_text())["fused"]
    from PIL import Image

    assert Image.open(g["sample"]).size == (64, 64)
    assert g["loss"] > 0 and g["trainable"]["mllm"] == 0 and g["trainable"]["connector"] > 0
    from fusion.model import FusedModel

    assert FusedModel.from_pretrained(g["saved"]).connector is not None


@pytest.mark.slow
def test_smoke_sweep_of_both_mllm_families_x_three_generators_x_two_connectors(made, tmp_path):
    out, _ = made
    p = run("smoke.py", "-m", f"tiny_dir={out}", "stage=align", "mllm=tiny,tiny_qwen3_vl", "generator=tiny_wan,tiny_cosmos,tiny_sana",
            "connector=last_mlp,queries", "max_new_tokens=2", f"hydra.sweep.dir={tmp_path}", timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/demo_summary.json"))
    assert len(runs) == 12
    for r in runs:
        assert json.loads(r.read_text())["fused"]["loss"] > 0


def test_demo_generator_without_connector_is_a_clear_error(made, tmp_path):
    out, _ = made
    p = run("smoke.py", f"tiny_dir={out}", "generator=tiny_wan", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2 and "needs connector=<name> and stage=align" in p.stderr


def test_unknown_key_is_one_clear_message(made, tmp_path):
    out, _ = made
    p = run("smoke.py", f"tiny_dir={out}", "mllm.pathh=/x", f"hydra.run.dir={tmp_path}")
    assert p.returncode != 0
    assert "pathh" in p.stderr and "Traceback" not in p.stderr


def test_missing_checkpoint_is_one_clear_message(tmp_path):
    p = run("smoke.py", f"mllm.path={tmp_path}/nothing", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    assert f"error: mllm.path: checkpoint folder not found: {tmp_path}/nothing" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_data_line_is_one_clear_message(made, tmp_path):
    out, _ = made
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]}]}\n')
    p = run("smoke.py", f"tiny_dir={out}", f"data.path={bad}", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    assert f"error: {bad}:2: messages[0].content[0]: image file not found" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def fused_dir(made, tmp_path_factory):
    """An untrained tiny fused model saved to disk."""
    out, _ = made
    from fusion.model import FusedModel
    from tests.conftest import compose_config

    cfg = compose_config([f"tiny_dir={out}", "stage=align", "generator=tiny_cosmos", "connector=last_mlp"])
    path = tmp_path_factory.mktemp("fused") / "model"
    FusedModel.build(cfg).save_pretrained(path)
    return path


def test_generate_one_prompt_writes_a_transcript(fused_dir, images, tmp_path):
    p = run("generate.py", f"model={fused_dir}", "prompt=Move the circle.", f"image={images['square']}", "steps=2",
            "max_new_tokens=6", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[assistant]" in p.stdout and "transcript:" in p.stdout
    data = json.loads((tmp_path / "transcript.json").read_text())
    kinds = [(s["role"], s["kind"]) for s in data["segments"]]
    assert kinds[:2] == [("user", "image"), ("user", "text")]
    assert data["meta"]["settings"]["negative"] == "auto" and data["meta"]["negative"] == "null"  # what stage=align trained with
    assert (tmp_path / "transcript.md").is_file() and (tmp_path / "turn01_user_1.png").is_file()


def test_generate_scripted_three_turn_chat(made, fused_dir, tmp_path):
    out, _ = made
    conv = out / "demo_data" / "conversations.jsonl"
    p = run("generate.py", f"model={fused_dir}", f"conversation={conv}", "conversation_line=4", "steps=2", "max_new_tokens=6",
            f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "transcript.json").read_text())
    user_texts = [s["text"] for s in data["segments"] if s["role"] == "user" and s["kind"] == "text"]
    assert user_texts == ["Draw a blue square at the top right.", "What shape is it?", "Add a green triangle to the first image."]
    assert {s["turn"] for s in data["segments"]} == {1, 2, 3}


@pytest.mark.parametrize("args, needle", [
    (["prompt=   "], "the prompt is empty"),
    (["prompt=hi", "image=/nonexistent.png"], "image file not found"),
    ([], "give either prompt="),
    (["prompt=hi", "negative=bogus"], "negative must be auto, duogen or null, got 'bogus'"),
])
def test_generate_bad_input_is_one_clear_message_and_no_transcript(fused_dir, tmp_path, args, needle):
    p = run("generate.py", f"model={fused_dir}", *args, f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "transcript.md").exists()


def test_generate_corrupt_image_is_one_clear_message_and_no_output(fused_dir, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out"
    p = run("generate.py", f"model={fused_dir}", "prompt=Edit this.", f"image={bad}", f"hydra.run.dir={out}")
    assert p.returncode == 2 and "does not decode" in p.stderr and "Traceback" not in p.stderr
    assert not list(out.glob("transcript.*")) and not list(out.glob("*.png"))


@pytest.mark.parametrize("fault", ["kill_after_turn@2", pytest.param("kill_in_transcript@0", marks=pytest.mark.slow)])
def test_generate_killed_midway_leaves_nothing_that_looks_complete(made, fused_dir, tmp_path, fault):
    out_dir, _ = made
    conv = out_dir / "demo_data" / "conversations.jsonl"
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", UNIFUSE_FAULT=fault)
    p = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), f"model={fused_dir}", f"conversation={conv}",
                        "conversation_line=4", "steps=2", "max_new_tokens=6", f"hydra.run.dir={out}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]  # killed where the fault says: after turn 2 of 3, or inside the transcript write
    assert "[assistant]" in p.stdout and "transcript:" not in p.stdout
    assert not list(out.glob("transcript.*")) and not list(out.glob("*.png"))  # at most a hidden .transcript.* folder remains


@pytest.fixture(scope="module")
def bad_conversations(tmp_path_factory):
    """Issue 19's kinds as conversation= lines: a byte-order mark on line 1 (accepted; the line has no assistant turn,
    which a conversation to play needs none of), then one line per fault."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("bad_conv")
    Image.new("RGB", (128, 128), (0, 90, 200)).save(folder / "big.png")  # 16,384 pixels: over max_image_pixels=10000
    user = {"role": "user", "content": [{"type": "text", "text": "Draw a red circle at the top left."}]}
    lines = [
        b"\xef\xbb\xbf" + json.dumps({"messages": [user]}).encode(),
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}).encode(),
        b'{"messages": [{"role": "user", "content": "a"}], "messages": [{"role": "user", "content": "b"}]}',
        b'{"messages": [{"role": "user", "content": [{"image": "big.png"}]}]}',
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "big.png"}, {"type": "text", "text": "Blue?"}]}]}).encode(),
    ]
    path = folder / "chat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


BAD_LINES = [
    (2, ":2: line is not valid UTF-8"),
    (3, ":3: messages[0].content[0].text holds a code point UTF-8 cannot encode"),
    (4, ":4: key 'messages' appears twice"),
    (5, ':5: messages[0].content[0] has no "type"'),
]


def test_generate_reads_only_its_line_and_names_that_lines_fault(bad_conversations):
    sys.path.insert(0, str(REPO / "tools"))
    from generate import user_turns

    from fusion.errors import DataError

    assert user_turns(str(bad_conversations), 1) == [("Draw a red circle at the top left.", [])]  # bad lines elsewhere are not read as it
    for line, needle in BAD_LINES:
        with pytest.raises(DataError) as e:
            user_turns(str(bad_conversations), line)
        assert needle in str(e.value) and str(bad_conversations) in str(e.value)


@pytest.mark.parametrize("line, needle", [BAD_LINES[0], (6, "image is 128x128 = 16,384 pixels, above data.max_image_pixels=10,000")])
def test_generate_refuses_a_bad_conversation_line_by_name(fused_dir, bad_conversations, tmp_path, line, needle):
    out = tmp_path / "out"
    p = run("generate.py", f"model={fused_dir}", f"conversation={bad_conversations}", f"conversation_line={line}", "max_image_pixels=10000",
            "steps=2", "max_new_tokens=4", f"hydra.run.dir={out}")
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert (str(bad_conversations) in p.stderr) == (line != 6)  # a line's own fault names file:line; the image its path
    assert not list(out.glob("transcript.*")) and not list(out.glob("*.png"))


def test_generate_plays_a_good_line_of_a_file_with_bad_ones(fused_dir, bad_conversations, tmp_path):
    p = run("generate.py", f"model={fused_dir}", f"conversation={bad_conversations}", "conversation_line=1", "steps=2", "max_new_tokens=4",
            f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]  # line 1 starts with a byte-order mark; lines 2-6 are bad and never read as its
    data = json.loads((tmp_path / "transcript.json").read_text())
    assert [s["text"] for s in data["segments"] if s["role"] == "user"] == ["Draw a red circle at the top left."]


def test_generate_missing_model_folder(tmp_path):
    p = run("generate.py", f"model={tmp_path}/nothing", "prompt=hi", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2 and "no unifuse.json" in p.stderr


def test_bench_generation_reports_ratios(made, tmp_path):
    out, _ = made
    p = run("bench.py", f"tiny_dir={out}", "sections=[generation]", "connector_name=last_mlp", "mllm_hidden=0", "history_turns=1",
            "words_per_turn=10", "repeats=1", "steps=1", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "bench.json").read_text())["generation"]
    assert r["cached"]["forwards_per_token"] == 1.0 and r["cached"]["images"] == 4
    assert r["reencode_at_images"]["same_tokens_as_cached"] and r["uncached"]["same_tokens_as_cached"]
    assert r["reencode_at_images"]["forwards_per_token"] > 1.0
    assert (tmp_path / "bench.md").is_file()


def _bench_section(made, tmp_path, section: str, batch: int) -> tuple[dict, str]:
    """One bench section on the tiny checkpoints (2 repeats of 2 micro-batches): its bench.json entry and bench.md."""
    out, _ = made
    p = run("bench.py", f"tiny_dir={out}", "use_toy=false", f"sections=[{section}]", "repeats=2", f"batch={batch}", "batches=2",
            f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((tmp_path / "bench.json").read_text())[section], (tmp_path / "bench.md").read_text()


def test_bench_frame_labels_counts_the_dit_passes_it_saves(made, tmp_path):
    """The frame-label section: probed every step, the frozen DiT runs two forwards a step (candidates with one frame, and
    none) in the distillation warm-up, which has no flow pass; memoised, none once every sample is known."""
    r, md = _bench_section(made, tmp_path, "frame_labels", batch=2)
    assert r["dit_forwards_per_step"] == {"every_step": 2, "memo": 0} and r["speedup"] > 0
    assert "frame head's labels" in md


def test_bench_connector_batching_reads_a_micro_batch_in_one_connector_call(made, tmp_path):
    """The connector-batching section: the recipe's warm-up step calls the connector once per sample in the loop before
    and once per micro-batch batched, with the same loss."""
    r, md = _bench_section(made, tmp_path, "connector_batching", batch=3)
    assert r["connector_calls_per_step"] == {"per_sample": 3, "batched": 1} and r["speedup"] > 0
    assert r["loss_diff_same_batch"] < 1e-5
    assert "in one call" in md


def test_bench_muon_times_the_grouped_step_against_torchs_with_the_same_update(tmp_path):
    """The muon section: the toy Wan's hidden matrices stepped by torch.optim.Muon and by GroupedMuon from the same
    weights and gradients end bit for bit equal; both times and their ratio are reported (not asserted: noisy)."""
    p = run("bench.py", "use_toy=false", "sections=[muon]", "repeats=1", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "bench.json").read_text())["muon"]
    assert r["max_weight_diff"] == 0.0 and r["matrices"] > r["shapes"] > 1 and r["speedup"] > 0
    assert len(r["step_seconds"]["torch"]["all"]) == 10
    assert "Muon's orthogonalisation per shape" in (tmp_path / "bench.md").read_text()


@pytest.mark.slow
def test_bench_training_sections_reduced(made, tmp_path):
    """The stage-1/2 sections run end to end on the tiny checkpoints (figures not asserted: the machine is noisy)."""
    out, _ = made
    p = run("bench.py", f"tiny_dir={out}", "use_toy=false", "sections=[cache,cache_queries,stage2_batching,frame_labels,sampling_guidance,overhead,stage1_overhead,packing]",
            "repeats=1", "batch=2", "sft_batch=2", "batches=2", "sample_steps=2", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["cache"]["speedup"] > 0 and r["cache"]["loss_diff_same_batch"] < 1e-4
    assert r["cache_queries"]["cache_kind"] == "kv" and r["cache_queries"]["loss_diff_same_batch"] < 1e-4
    assert r["stage2_batching"]["loss_diff_same_batch"] < 1e-5 and r["stage2_batching"]["dit_forwards_per_step"]["per_sample"] == 2
    g = r["sampling_guidance"]
    assert g["text_guidance"]["max_latent_diff"] < 1e-5 and g["text_guidance"]["dit_forwards"] == {"separate": 4, "batched": 2}
    assert r["overhead"]["overhead"] > 0
    assert r["stage1_overhead"]["overhead"] > 0 and r["stage1_overhead"]["rendered_once"] == r["stage1_overhead"]["samples"]
    assert r["packing"]["packed"]["pad_fraction"] <= r["packing"]["padded"]["pad_fraction"]
    assert "### stage 1: trainer overhead" in (tmp_path / "bench.md").read_text()
    md = (tmp_path / "bench.md").read_text()
    assert "feature cache" in md and "fusion overhead" in md and "packed sequences" in md


@pytest.mark.slow  # the reduced demo (slow tier) runs make_toy too
def test_make_toy_writes_three_splits(tmp_path):
    args = ["make_toy.py", f"out_dir={tmp_path}", "n_train=12", "n_val=6", "n_test=6", "vae_steps=3", "vae_channels=[8,8,8]",
            "mllm_steps=0", "dit_steps=0", f"hydra.run.dir={tmp_path}/h"]
    p = run(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "vae: trained 3 steps" in p.stdout and (tmp_path / "vae" / "config.json").is_file()
    again = run(*args)
    assert "vae: cached" in again.stdout  # a second run reuses the pretrained VAE
    for split, n in (("train", 12), ("val", 6), ("test", 6)):
        assert len((tmp_path / "toyworld" / f"{split}.jsonl").read_text().splitlines()) == n
    assert "train: 12 conversations" in p.stdout
    assert not [q for q in tmp_path.iterdir() if q.name.startswith((".toyworld", ".vae"))]


def test_evaluate_on_a_fresh_split_reports_every_metric(fused_dir, tmp_path):
    p = run("evaluate.py", f"model={fused_dir}", "seed=5", "fresh_n=6", "steps=1", "max_new_tokens=6", "transcripts=1",
            "image_guidance=1.5", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["conversations"] == 6
    assert r["settings"] == {"steps": 1, "guidance": 3.0, "image_guidance": 1.5}  # what drew the figures, in the report
    for k in ("trigger_precision", "trigger_recall", "trigger_f1", "exact_scene", "attr_shape", "attr_colour", "attr_position",
              "attr_count", "text_answer"):
        assert 0.0 <= r[k] <= 1.0, k
    assert set(r["by_kind"]) == {"t2i", "edit_user", "edit_generated", "steps", "question", "distractor"}
    g = r["conditioning_gain"]  # the instrument: loss with true vs zero vs shuffled states, on the split's image turns
    assert g["samples"] == 5 and all(f"gain@{t}" in g and f"shuffle_gain@{t}" in g for t in ("0.3", "0.5", "0.7", "0.9"))
    assert "conditioning gain at t=0.3/0.5/0.7/0.9" in p.stdout
    assert (tmp_path / "report.md").is_file() and any((tmp_path / "transcripts").iterdir())
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    turns = sum(len(json.loads(line)["meta"]["turns"]) for line in (tmp_path / "fresh" / "test.jsonl").read_text().splitlines())
    assert len(items) == turns and {i["file"] for i in items} == {"test.jsonl"}  # one record per assistant turn
    exact = [im["exact"] for i in items for im in i["images"]]
    assert len(exact) == r["n"]["exact_scene"] and sum(exact) / len(exact) == pytest.approx(r["exact_scene"])
    answered = [i["answered"] for i in items if "answer" in i]
    assert len(answered) == r["n"]["text_answer"] and sum(answered) / len(answered) == pytest.approx(r["text_answer"])


def test_evaluation_in_two_processes_scores_what_one_does(fused_dir, tmp_path, monkeypatch):
    """workers=2: a second process that loads the model itself plays the conversations beside this one (each takes the
    next one not yet taken); the items, the scores and the transcripts are those of one process (both on one thread
    here, so bit for bit); this process's other work (``beside``) runs first, on one thread."""
    import torch

    from fusion.generate import GenerationSettings
    from fusion.model import FusedModel
    from fusion.toyworld.conversations import write_split
    from fusion.toyworld import run as runmod
    from fusion.toyworld.run import evaluate_split

    path = write_split(tmp_path / "split", "test", 8, seed=3)
    model = FusedModel.from_pretrained(fused_dir)
    settings = GenerationSettings(steps=1, max_new_tokens=6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = evaluate_split(model, path, settings=settings, transcripts_dir=tmp_path / "t1", n_transcripts=2, progress=False,
                             items_path=tmp_path / "one.jsonl")
    finally:
        torch.set_num_threads(threads)
    mine, real = [], runmod.play

    def slow_play(*args, **kw):  # this process plays slowly, so the worker (its own, unpatched module) takes some
        mine.append(1)
        time.sleep(4.0)
        return real(*args, **kw)

    monkeypatch.setattr(runmod, "play", slow_play)
    beside = []  # this process's other work (evaluate.py: the gain), before it takes a conversation, on one thread
    two = evaluate_split(model, path, settings=settings, transcripts_dir=tmp_path / "t2", n_transcripts=2, progress=False,
                         items_path=tmp_path / "two.jsonl", workers=2, model_dir=fused_dir,
                         beside=lambda: beside.append((torch.get_num_threads(), len(mine))))
    assert beside == [(1, 0)]
    assert 1 <= len(mine) < 8  # the other process played the rest
    assert torch.get_num_threads() == threads  # this process's threads are given back
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()  # the same turns, in the same order
    assert two == one and two["conversations"] == 8
    assert sorted(p.name for p in (tmp_path / "t2").iterdir()) == sorted(p.name for p in (tmp_path / "t1").iterdir())
    assert len(list((tmp_path / "t2").iterdir())) == 2
    with pytest.raises(ValueError, match="model_dir"):
        evaluate_split(model, path, settings=settings, progress=False, workers=2)
