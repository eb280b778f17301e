"""Launching at scale: the deepspeed launcher's --local_rank argument, the multi-node launch scripts
(tools/launch/), and stage 1 loading the MLLM alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusion.cli import take_launcher_args
from tests.tools.test_train import REPO, env, train


def test_take_launcher_args(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["train.py", "--local_rank=3", "stage=sft", "x=1"]
    assert take_launcher_args(argv) == ["train.py", "stage=sft", "x=1"] and os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert take_launcher_args(["t.py", "a=1", "--local_rank", "5"]) == ["t.py", "a=1"] and os.environ["LOCAL_RANK"] == "5"
    monkeypatch.setenv("LOCAL_RANK", "1")  # the launcher's own environment wins
    take_launcher_args(["t.py", "--local-rank=7"])
    assert os.environ["LOCAL_RANK"] == "1"


def _script(name, extra_env, *args):
    e = dict(os.environ, DRY_RUN="1", **extra_env)
    return subprocess.run(["bash", str(REPO / "tools" / "launch" / name), *args], env=e, capture_output=True, text=True, timeout=60)


def test_multinode_scripts_print_the_launch_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text((REPO / "tools" / "launch" / "hostfile.example").read_text())
    p = _script("deepspeed_multinode.sh", {"HOSTFILE": str(hostfile), "RUN_DIR": "/shared/run"}, "experiment=duogen_cosmos25_7b", "data.path=d.jsonl")
    assert p.returncode == 0, p.stderr
    assert "deepspeed --hostfile" in p.stdout and "--no_local_rank tools/train.py hydra.run.dir=/shared/run experiment=duogen_cosmos25_7b" in p.stdout
    p = _script("torchrun_multinode.sh", {"NNODES": "4", "MASTER_ADDR": "node-001", "RUN_DIR": "/shared/run"}, "stage=sft")
    assert p.returncode == 0, p.stderr
    for part in ("--nnodes 4", "--nproc_per_node 8", "--rdzv_backend c10d", "--rdzv_endpoint node-001:29500", "hydra.run.dir=/shared/run stage=sft"):
        assert part in p.stdout
    p = _script("torchrun_multinode.sh", {"NNODES": "4", "MASTER_ADDR": "node-001", "RUN_DIR": ""})
    assert p.returncode != 0 and "RUN_DIR" in p.stderr  # every rank must write to one shared run folder
    p = _script("deepspeed_multinode.sh", {"HOSTFILE": str(tmp_path / "none"), "RUN_DIR": "/r"})
    assert p.returncode == 2 and "hostfile" in p.stderr
    for name in ("deepspeed_multinode.sh", "torchrun_multinode.sh", "slurm_torchrun.sbatch"):
        assert subprocess.run(["bash", "-n", str(REPO / "tools" / "launch" / name)]).returncode == 0


@pytest.mark.slow
def test_deepspeed_launcher_two_processes(tiny_dir, tmp_path):
    """`deepspeed --num_gpus 2 tools/train.py ...` as documented: the launcher passes --local_rank=N."""
    p = subprocess.run([str(REPO / ".venv" / "bin" / "deepspeed") if (REPO / ".venv" / "bin" / "deepspeed").exists() else "deepspeed",
                        "--num_gpus", "2", "--master_port", "29647", "tools/train.py", f"tiny_dir={tiny_dir}", "stage=sft",
                        "stage.max_steps=2", f"hydra.run.dir={tmp_path}"],
                       cwd=REPO, env=dict(env(), DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "--local_rank=1" in p.stdout + p.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_torchrun_multinode_script_on_one_node(tiny_dir, tmp_path):
    e = dict(env(), NNODES="1", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29653", RUN_DIR=str(tmp_path), DS_ACCELERATOR="cpu")
    p = subprocess.run(["bash", "tools/launch/torchrun_multinode.sh", f"tiny_dir={tiny_dir}", "stage=sft", "stage.max_steps=2"],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_stage1_does_not_load_the_generator(tiny_dir, tmp_path):
    train(f"tiny_dir={tiny_dir}", "stage=sft", "generator=tiny_wan", "connector=last_mlp", "stage.max_steps=1", f"hydra.run.dir={tmp_path}")
    assert "generator and connector are not loaded" in (tmp_path / "train.log").read_text()
    assert set(json.loads((tmp_path / "final" / "unifuse.json").read_text())["parts"]) == {"mllm"}
