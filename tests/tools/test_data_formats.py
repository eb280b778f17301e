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
