"""fusion.cpushare: one torch thread while the process beside this one runs, all of them once it has ended."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from fusion import cpushare

REPO = Path(__file__).resolve().parents[2]


def test_one_thread_while_the_marker_exists_then_all_again(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    marker = tmp_path / "running"
    marker.touch()
    monkeypatch.setenv(cpushare.ENV, str(marker))
    monkeypatch.setattr(cpushare, "_share", None)
    torch.set_num_threads(2)
    try:
        assert cpushare.poll() == 1
        marker.unlink()
        assert cpushare.poll() == 1  # looked less than EVERY_S ago: no file access every step
        assert cpushare.poll(force=True) == 2
        marker.touch()  # another phase beside it later
        assert cpushare.poll(force=True) == 1
    finally:
        torch.set_num_threads(before)


def test_does_nothing_without_the_variable(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(cpushare.ENV, raising=False)
    monkeypatch.setattr(cpushare, "_share", None)
    try:
        torch.set_num_threads(2)
        assert cpushare.poll(force=True) == 2
    finally:
        torch.set_num_threads(before)


def test_every_tool_shares_from_its_start(tmp_path):
    """setup_environment (every tool's first call) reads the variable: the demo's processes start on one thread."""
    marker = tmp_path / "running"
    code = "import torch; from fusion.cli import setup_environment; torch.set_num_threads(2); setup_environment(); print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for exists, want in ((True, "1"), (False, "2")):
        if exists:
            marker.touch()
        else:
            marker.unlink()
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, cpushare.ENV: str(marker)}, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.split()[-1] == want
