"""Crashes and interruptions never lose work: SIGKILL at several points (inside a checkpoint write too)
then resume gives the uninterrupted run's per-step losses and final weights; SIGTERM saves and exits;
damaged checkpoints are detected and skipped; NaN / Inf steps follow stage.on_nonfinite; an
interrupted generation leaves nothing that looks complete.

Exact kill points come from fusion/faults.py (UNIFUSE_FAULT=<fault>@<step>: the process sends itself
SIGKILL or SIGTERM there); the slow tier also kills from outside at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tools.test_train import REPO, cmd, env, losses

STEPS = 6


def run(*overrides, fault: str | None = None, check: bool = True):
    e = env()
    if fault:
        e["UNIFUSE_FAULT"] = fault
    p = subprocess.run(cmd(*overrides), cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "final" / "mllm").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def common(tiny_dir):
    return [f"tiny_dir={tiny_dir}", "stage=sft", f"stage.max_steps={STEPS}", "stage.save_every=2", "stage.keep_checkpoints=0",
            "stage.lr=1e-3", "stage.warmup_steps=2", "stage.lr_schedule=cosine"]


@pytest.fixture(scope="module")
def reference(common, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(*common, f"hydra.run.dir={out}")
    return out


def kill_then_resume(common, reference, run_dir: Path, fault: str) -> subprocess.CompletedProcess:
    p = run(*common, f"hydra.run.dir={run_dir}", fault=fault, check=False)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    assert not (run_dir / "summary.json").exists() or fault.startswith("kill_in_export")
    resumed = run(*common, f"hydra.run.dir={run_dir}")
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (fault, step, got[step], want[step])
    same_weights(run_dir, reference)
    return resumed


@pytest.mark.slow
def test_kill_inside_a_checkpoint_write_then_resume(common, reference, tmp_path):
    kill_then_resume(common, reference, tmp_path, "kill_in_checkpoint@4")
    log = (tmp_path / "train.log").read_text()
    assert "resumed from" in log and "step-0000002" in log  # the half-written step-4 was never picked


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_after_step@1", "kill_after_step@3", "kill_after_step@5", "kill_in_checkpoint@2",
                                   "kill_before_rename@2", "kill_before_rename@4", "kill_in_export@0"])
def test_kill_at_each_point_then_resume(common, reference, tmp_path, fault):
    kill_then_resume(common, reference, tmp_path, fault)


@pytest.mark.slow
def test_kill_from_outside_at_random_moments(tiny_dir, tmp_path):
    """SIGKILL from outside at random moments of a longer run, resuming each time, until it finishes."""
    long = [f"tiny_dir={tiny_dir}", "stage=sft", "stage.max_steps=120", "stage.save_every=5", "stage.keep_checkpoints=2",
            "stage.lr=1e-3", "stage.warmup_steps=2", "stage.lr_schedule=cosine"]
    ref = tmp_path / "reference"
    run(*long, f"hydra.run.dir={ref}")
    rng = random.Random(0)
    killed_at = []
    work = tmp_path / "killed"

    def newest_checkpoint() -> int:
        steps = [int(d.name.removeprefix("step-")) for d in (work / "checkpoints").glob("step-*") if (d / "complete.json").is_file()]
        return max(steps, default=0)

    # Progress is measured from the newest complete checkpoint (what a resume starts from), never from logged steps:
    # each attempt is killed only after it has written a checkpoint past the one it resumed from, so every attempt
    # moves the run forward whatever the machine's speed; after 4 kills the run is left to finish. Bounded by wall time.
    deadline = time.time() + 1200
    while time.time() < deadline:
        resumed_from = newest_checkpoint()
        p = subprocess.Popen(cmd(*long, f"hydra.run.dir={work}"), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if len(killed_at) < 4:
            while time.time() < deadline and p.poll() is None and newest_checkpoint() <= resumed_from:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.5))  # a random moment after that checkpoint: mid-step, mid-write, mid-log
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                killed_at.append(max(losses(work)))
        p.wait(timeout=max(1.0, deadline - time.time()))
        if (work / "summary.json").is_file():
            break
    assert len(killed_at) >= 3, killed_at
    got, want = losses(work), losses(ref)
    assert sorted(got) == list(range(1, 121))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-5, (step, killed_at)
    same_weights(work, ref)
    print(f"\nkilled after steps {killed_at}; resumed each time; per-step losses and final weights equal to the uninterrupted run")


def test_sigterm_saves_a_checkpoint_and_exits_then_resumes(common, reference, tmp_path):
    p = run(*common, f"hydra.run.dir={tmp_path}", fault="term_after_step@3", check=False)
    assert p.returncode == 143, p.stderr[-3000:]
    assert "interrupted after step 3" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "checkpoints" / "step-0000003" / "complete.json").is_file()
    assert not (tmp_path / "final").exists()  # nothing that looks like a finished export
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"]["step"] == 3
    run(*common, f"hydra.run.dir={tmp_path}")
    got, want = losses(tmp_path), losses(reference)
    assert all(abs(got[s] - want[s]) < 1e-5 for s in want)
    same_weights(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_from_outside(common, tmp_path):
    p = subprocess.Popen(cmd(*common[:2], "stage=sft", "stage.max_steps=100000", f"hydra.run.dir={tmp_path}"), cwd=REPO, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").is_file() and len(losses(tmp_path)) >= 3):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    step = json.loads((tmp_path / "summary.json").read_text())["interrupted"]["step"]
    assert (tmp_path / "checkpoints" / f"step-{step:07d}" / "complete.json").is_file()


@pytest.fixture(scope="module")
def checkpointed(common, tmp_path_factory):
    """A 5-step run with complete checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("checkpointed")
    run(*common[:1], "stage=sft", "stage.max_steps=5", "stage.save_every=2", "stage.keep_checkpoints=0", f"hydra.run.dir={out}")
    return out


def _damage(ck: Path, how: str) -> str:
    files = json.loads((ck / "files.json").read_text())["files"]
    rel = max(files, key=lambda k: files[k]["size"])  # the largest file: model or optimizer states
    victim = ck / rel
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[: files[rel]["size"] // 2])
    elif how == "delete":
        victim.unlink()
    elif how == "flip":  # same size, one byte changed: only the checksum sees it
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif how == "no_list":
        (ck / "files.json").unlink()
    return rel


def test_verify_checkpoint_detects_each_kind_of_damage(checkpointed, tmp_path):
    import shutil

    from fusion.train import verify_checkpoint

    src = checkpointed / "checkpoints" / "step-0000004"
    assert verify_checkpoint(src) == []
    for how, needle in (("truncate", "truncated"), ("delete", "is missing"), ("flip", "sha256 differs"), ("no_list", "files.json")):
        ck = tmp_path / how
        shutil.copytree(src, ck)
        _damage(ck, how)
        problems = verify_checkpoint(ck)
        assert problems and needle in problems[0], (how, problems)


def test_damaged_checkpoint_is_skipped_by_resume_auto(checkpointed, common, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    shutil.rmtree(run_dir / "final")
    (run_dir / "summary.json").unlink()
    _damage(run_dir / "checkpoints" / "step-0000004", "truncate")
    base = [*common[:1], "stage=sft", "stage.save_every=2", "stage.keep_checkpoints=0", f"hydra.run.dir={run_dir}"]
    run(*base, "stage.max_steps=6")
    log = (run_dir / "train.log").read_text()
    assert "is damaged" in log and "step-0000002 at step 2" in log, log[-2000:]
    assert (run_dir / "checkpoints" / "broken-step-0000004").is_dir()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    p = run(*base, "stage.max_steps=6", f"resume={run_dir / 'checkpoints' / 'broken-step-0000004'}", check=False)
    assert p.returncode == 2 and "damaged" in p.stderr and "Traceback" not in p.stderr


def test_nan_loss_skips_the_step_and_counts_it(common, tmp_path):
    one = tmp_path / "one"
    run(*common[:1], "stage=sft", "stage.max_steps=1", "stage.lr_schedule=constant", "stage.warmup_steps=0", f"hydra.run.dir={one}")
    two = tmp_path / "two"
    run(*common[:1], "stage=sft", "stage.max_steps=2", "stage.lr_schedule=constant", "stage.warmup_steps=0", f"hydra.run.dir={two}",
        fault="nan_loss@2")
    same_weights(one, two)  # step 2 changed nothing: no update, no Adam moment change
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["nonfinite_steps"] == 1 and rows[1]["loss"] != rows[1]["loss"]  # NaN logged as NaN
    assert json.loads((two / "summary.json").read_text())["nonfinite_steps"] == 1
    assert "NaN/Inf loss or gradient: optimizer step skipped" in (two / "train.log").read_text()


@pytest.mark.slow
def test_inf_gradient_with_a_finite_loss_is_caught(common, tmp_path):
    p = run(*common[:1], "stage=sft", "stage.max_steps=4", "stage.on_nonfinite=stop", f"hydra.run.dir={tmp_path}", fault="inf_grad@3",
            check=False)
    assert p.returncode == 2 and "step 3: the loss or a gradient is NaN/Inf" in p.stderr and "on_nonfinite=stop" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_diverged_run_stops_after_too_many_nonfinite_steps(common, tmp_path):
    p = run(*common[:1], "stage=sft", "stage.max_steps=6", "stage.max_nonfinite_in_a_row=2", f"hydra.run.dir={tmp_path}",
            fault="nan_loss@2,nan_loss@3,nan_loss@4", check=False)
    assert p.returncode == 2 and "3 steps in a row" in p.stderr


def test_unknown_fault_name_is_refused(monkeypatch):
    from fusion import faults

    monkeypatch.setenv(faults.ENV, "kil_after_step@2")
    with pytest.raises(ValueError, match="cannot read"):
        faults.planned()


def test_verify_checkpoint_never_raises(tmp_path):
    from fusion.train import verify_checkpoint

    ck = tmp_path / "step-0000002"
    ck.mkdir()
    (ck / "complete.json").write_bytes(b"\xff\xfe not utf-8")
    assert verify_checkpoint(ck)
    (ck / "complete.json").write_text(json.dumps({"version": 2}))
    for listing in ("[1, 2]", json.dumps({"files": {"a.pt": {}}}), json.dumps({"files": 3})):
        (ck / "files.json").write_text(listing)
        assert verify_checkpoint(ck), listing  # a problem reported, nothing raised
