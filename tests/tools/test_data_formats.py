"""data.format=sharegpt / hf: a LLaMA-Factory ShareGPT file and a parquet data set with embedded images (both
written here) read into the same conversations, train stage 1 with the same per-step losses as their unifuse
conversions (tools/convert_data.py), and bad rows are named by file and line / row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fusion.data import read_jsonl
from fusion.errors import DataError
from fusion.formats import from_sharegpt, read_conversations
from tests.tools.test_train import REPO, env, losses, train


def to_sharegpt(obj: dict, variant: str = "messages") -> dict:
    """A unifuse conversation in LLaMA-Factory's layout: <image> placeholders, images listed apart."""
    images, turns = [], []
    for m in obj["messages"]:
        text = ""
        for item in m["content"]:
            if item["type"] == "image":
                images.append(item["image"])
                text += "<image>"
            else:
                text += item["text"]
        turns.append({"role": m["role"], "content": text} if variant == "messages" else
                     {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": text})
    return {variant if variant == "messages" else "conversations": turns, "images": images}


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    """The tiny demo conversations as unifuse JSONL, as ShareGPT (both variants) and as parquet with the PNG bytes inside."""
    import datasets

    root = tmp_path_factory.mktemp("formats")
    shutil.copytree(tiny_dir / "demo_data" / "images", root / "images")
    src = [json.loads(line) for line in (tiny_dir / "demo_data" / "conversations.jsonl").read_text().splitlines()]
    (root / "unifuse.jsonl").write_text("".join(json.dumps(o) + "\n" for o in src))
    (root / "sharegpt.jsonl").write_text("".join(json.dumps(to_sharegpt(o, "messages" if i % 2 else "conversations")) + "\n"
                                                 for i, o in enumerate(src)))
    rows = [to_sharegpt(o) for o in src]
    feats = datasets.Features({"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
                               "images": datasets.List(datasets.Image())})
    ds = datasets.Dataset.from_dict({"messages": [r["messages"] for r in rows],
                                     "images": [[{"bytes": (root / p).read_bytes(), "path": None} for p in r["images"]] for r in rows]},
                                    features=feats)
    (root / "hf").mkdir()
    ds.to_parquet(str(root / "hf" / "train.parquet"))
    ds.save_to_disk(str(root / "hf_disk"))
    return root


def _structure(conv):
    """A conversation as (role, [text or image bytes]) with images read: what the model sees."""
    from fusion.data import load_images

    out = []
    for m in load_images(conv).messages:
        out.append((m["role"], [item["text"] if item["type"] == "text" else item["image"].tobytes() for item in m["content"]]))
    return out


@pytest.mark.parametrize("fmt,name", [("sharegpt", "sharegpt.jsonl"), ("hf", "hf"), ("hf", "hf/train.parquet"), ("hf", "hf_disk")])
def test_each_format_reads_into_the_same_conversations(data, fmt, name):
    ref = [_structure(c) for c in read_jsonl(data / "unifuse.jsonl")]
    got = [_structure(c) for c in read_conversations(data / name, fmt, image_root=data if fmt == "sharegpt" else None)]
    assert got == ref


def test_sharegpt_errors_name_the_line(tmp_path):
    with pytest.raises(DataError, match="1 <image> placeholder.*0 image"):
        from_sharegpt({"messages": [{"role": "user", "content": "<image>hi"}]})
    with pytest.raises(DataError, match=r"conversations\[0\].from is 'robot'"):
        from_sharegpt({"conversations": [{"from": "robot", "value": "hi"}]})
    assert from_sharegpt({"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}]})["messages"][0]["role"] == "system"
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "<image><image>x"}], "images": ["a.png"]}) + "\n")
    with pytest.raises(DataError) as e:
        list(read_conversations(f, "sharegpt"))
    assert e.value.line == 2 and e.value.kind == "schema" and f"{f}:2: 2 <image> placeholder(s)" in str(e.value)


def test_a_bad_parquet_row_is_named_by_its_row(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "<image>"}]],
                                     "images": [[], []]})
    ds.to_parquet(str(tmp_path / "x.parquet"))
    from fusion.data import SkipReport

    report = SkipReport()
    assert len(list(read_conversations(tmp_path / "x.parquet", "hf", on_error="skip", report=report))) == 1
    assert report.counts == {"schema": 1} and report.examples[0].startswith(f"{tmp_path / 'x.parquet'}:2: 1 <image>")


@pytest.mark.slow  # three stage-1 runs (~1 min); the conversions themselves are checked in the fast tier above
def test_convert_then_train_gives_the_same_losses(tiny_dir, data, tmp_path):
    tiny = f"tiny_dir={tiny_dir}"
    import subprocess
    import sys

    for fmt, src in (("sharegpt", data / "sharegpt.jsonl"), ("hf", data / "hf")):
        out = tmp_path / fmt / "train.jsonl"
        p = subprocess.run([sys.executable, str(REPO / "tools" / "convert_data.py"), f"in={src}", f"in_format={fmt}", f"out={out}"]
                           + ([f"image_root={data}"] if fmt == "sharegpt" else []), cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "wrote 4 conversations" in p.stdout and len(list((out.parent / "images").iterdir())) == 4  # each image once, by hash
    assert (tmp_path / "sharegpt" / "train.jsonl").read_text() == (tmp_path / "hf" / "train.jsonl").read_text()
    steps = ["stage=sft", "stage.max_steps=3", "stage.micro_batch_size=2", "stage.save_every=0", "data.prevalidate=false"]
    runs = {"jsonl": [f"data.path={tmp_path / 'hf' / 'train.jsonl'}"],
            "sharegpt": [f"data.path={data / 'sharegpt.jsonl'}", "data.format=sharegpt", f"data.image_root={data}"],
            "hf": [f"data.path={data / 'hf'}", "data.format=hf"]}
    got = {}
    for name, extra in runs.items():
        train(tiny, *steps, *extra, f"hydra.run.dir={tmp_path / ('run_' + name)}")
        got[name] = losses(tmp_path / ("run_" + name))
    assert sorted(got["jsonl"]) == [1, 2, 3]
    assert got["sharegpt"] == got["jsonl"] and got["hf"] == got["jsonl"], got


@pytest.mark.parametrize("fmt,name", [("sharegpt", "sharegpt.jsonl"), ("hf", "hf")])
def test_validate_data_takes_the_format(tiny_dir, data, fmt, name):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(REPO / "tools" / "validate_data.py"), f"data.path={data / name}", f"data.format={fmt}",
                        f"data.image_root={data}", f"tiny_dir={tiny_dir}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "4 samples, 4 valid, 0 with errors" in p.stdout


@pytest.fixture(scope="module")
def stream_data(data, tmp_path_factory):
    """Three parquet files of the tiny conversations (13 rows with embedded images), one row bad: its placeholder has no image."""
    import datasets

    root = tmp_path_factory.mktemp("stream")
    ds = datasets.load_dataset("parquet", data_files=[str(data / "hf" / "train.parquet")], split="train")
    rows = ds.to_list()
    bad = {"messages": [{"role": "user", "content": "<image>Draw it."}, {"role": "assistant", "content": "No."}], "images": []}
    rows = rows * 3
    rows.insert(6, bad)
    for k, chunk in enumerate((rows[:5], rows[5:9], rows[9:])):
        datasets.Dataset.from_list(chunk, features=ds.features).to_parquet(str(root / f"part-{k}.parquet"))
    return root


def _stream(path, seed=0, epoch=0, rank=0, world=1, start=0, buffer=4):
    from omegaconf import OmegaConf

    from fusion.train import StreamingConversations

    d = OmegaConf.create({"path": str(path), "format": "hf", "image_root": None, "allow_outside_root": False, "seed": seed,
                          "shuffle_buffer": buffer})
    s = StreamingConversations(d, rank, world)
    s.epoch, s.start = epoch, start
    return [(x.line, x.kind) if isinstance(x, DataError) else (x.line, None) for x in s]


def test_streaming_reads_rows_in_a_seeded_buffered_shuffle_sharded_by_rank(stream_data):
    from fusion.formats import load_hf

    import datasets

    assert isinstance(load_hf(stream_data, streaming=True), datasets.IterableDataset)  # read as iterated, not loaded
    whole = _stream(stream_data, buffer=1)
    assert [n for n, _ in whole] == list(range(1, 14))  # buffer 1: file order, rows numbered across the three files
    assert [k for _, k in whole if k] == ["schema"] and whole[6] == (7, "schema")  # the bad row named by its row, handed on
    e0, e1 = _stream(stream_data, epoch=0), _stream(stream_data, epoch=1)
    assert sorted(e0) == sorted(e1) == whole and e0 != e1 != whole  # each epoch a permutation of its own
    assert e0 == _stream(stream_data, epoch=0)  # deterministic with the seed
    assert _stream(stream_data, epoch=0, seed=1) != e0
    assert _stream(stream_data, epoch=0, start=5) == e0[5:]  # resume: the rest of the same order
    r0, r1 = _stream(stream_data, rank=0, world=2), _stream(stream_data, rank=1, world=2)
    assert sorted(r0 + r1) == whole and not set(r0) & set(r1) and (len(r0), len(r1)) == (7, 6)  # ranks: disjoint, covering
    far = _stream(stream_data, buffer=4)
    assert all(n <= pos + 1 + 4 for pos, (n, _) in enumerate(far))  # memory: never more than 4 rows read ahead of what leaves


def test_streaming_trains_skips_bad_rows_and_resumes_exactly(tiny_dir, stream_data, tmp_path):
    import subprocess

    from tests.tools.test_train import cmd

    common = [f"tiny_dir={tiny_dir}", "stage=sft", "stage.max_steps=6", "stage.save_every=2", "stage.micro_batch_size=2",
              f"data.path={stream_data}", "data.format=hf", "data.streaming=true", "data.shuffle_buffer=4", "data.on_error=skip"]
    train(*common, f"hydra.run.dir={tmp_path / 'full'}")
    full = losses(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]  # 2 samples a step: past the first epoch (13 rows, one bad)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["skipped"] == {"schema": 1}
    log = (tmp_path / "full" / "train.log").read_text()
    assert "data: streaming from" in log
    run = tmp_path / "killed"
    p = subprocess.run(cmd(*common, f"hydra.run.dir={run}"), cwd=REPO, env=dict(env(), UNIFUSE_FAULT="kill_after_step@3"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and sorted(losses(run)) == [1, 2, 3]
    train(*common, f"hydra.run.dir={run}")  # resumes from step 2: the stream skips the samples step 1-2 consumed
    again = losses(run)
    assert again == full, (again, full)
    assert "resumed from" in (run / "train.log").read_text()


@pytest.mark.slow
def test_streaming_error_policy_and_cache_refusal(tiny_dir, stream_data, tmp_path):
    common = [f"tiny_dir={tiny_dir}", "stage=sft", "stage.max_steps=6", "stage.micro_batch_size=2", f"data.path={stream_data}", "data.format=hf",
              "data.streaming=true", "data.shuffle_buffer=4"]  # the bad row 7 comes within the 12 samples of 6 steps
    bad = train(*common, "data.on_error=error", f"hydra.run.dir={tmp_path / 'strict'}", check=False)
    assert bad.returncode == 2 and f"{stream_data}:7: " in bad.stderr and "Traceback" not in bad.stderr
    cached = train(*common[:1], "stage=align", "generator=tiny_wan", "connector=last_mlp", "init_from=base", *common[2:], "cache=auto",
                   f"hydra.run.dir={tmp_path / 'cached'}", check=False)
    assert cached.returncode == 2 and "data.streaming=true" in cached.stderr and "cache=off" in cached.stderr


def test_streaming_data_with_nothing_usable_stops_with_the_report_instead_of_spinning(tiny_dir, tmp_path):
    data = tmp_path / "questions.jsonl"  # valid conversations, none with an assistant turn: nothing for stage 1
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"}]}) + "\n" for i in range(3)))
    p = train(f"tiny_dir={tiny_dir}", "stage=sft", "stage.max_steps=2", f"data.path={data}", "data.streaming=true",
              f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2 and "a whole epoch of data gave no usable sample" in p.stderr and "no_assistant_turn" in p.stderr, p.stderr[-2000:]
