"""The command-line tools as a user runs them: one clear line on bad input, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(tool, *overrides, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *overrides],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=300,
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
    p = run("demo.py", f"tiny_dir={out}", "max_new_tokens=4", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["forwards_per_token"] == 1.0
    assert summary["cached_vs_full_max_abs_diff"] < 1e-4
    assert summary["images_in_cache"] == 1


@pytest.mark.parametrize("generator, connector", [("tiny_wan", "last_mlp"), ("tiny_cosmos", "queries"), ("tiny_sana", "multiscale_queries")])
def test_demo_fused_step_with_each_generator_needs_no_code_change(made, tmp_path, generator, connector):
    out, _ = made
    p = run("demo.py", f"tiny_dir={out}", "max_new_tokens=2", "stage=align", f"generator={generator}", f"connector={connector}",
            f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    g = json.loads((tmp_path / "demo_summary.json").read_text())["fused"]
    from PIL import Image

    assert Image.open(g["sample"]).size == (64, 64)
    assert g["loss"] > 0 and g["trainable"]["mllm"] == 0 and g["trainable"]["connector"] > 0
    from fusion.model import FusedModel

    assert FusedModel.from_pretrained(g["saved"]).connector is not None


def test_demo_generator_without_connector_is_a_clear_error(made, tmp_path):
    out, _ = made
    p = run("demo.py", f"tiny_dir={out}", "generator=tiny_wan", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2 and "needs connector=<name> and stage=align" in p.stderr


def test_unknown_key_is_one_clear_message(made, tmp_path):
    out, _ = made
    p = run("demo.py", f"tiny_dir={out}", "mllm.pathh=/x", f"hydra.run.dir={tmp_path}")
    assert p.returncode != 0
    assert "pathh" in p.stderr and "Traceback" not in p.stderr


def test_missing_checkpoint_is_one_clear_message(tmp_path):
    p = run("demo.py", f"mllm.path={tmp_path}/nothing", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    assert f"error: mllm.path: checkpoint folder not found: {tmp_path}/nothing" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_data_line_is_one_clear_message(made, tmp_path):
    out, _ = made
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]}]}\n')
    p = run("demo.py", f"tiny_dir={out}", f"data.path={bad}", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 2
    assert f"error: {bad}:2: messages[0].content[0]: image file not found" in p.stderr
    assert "Traceback" not in p.stderr
