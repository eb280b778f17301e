"""``make demo`` on a reduced toy world (about 2 minutes): every phase runs as the user runs it,
the report holds every metric, the parts are cached, the ablation writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: a world and budgets small enough for the fast tier (scores are not asserted: they are near 0)
REDUCED = ["n_train=12", "n_test=6", "eval_n=6", "vae_steps=10", "mllm_steps=6", "dit_steps=6", "sft_steps=2", "align_steps=2",
           "sample_steps=2", "transcripts=2", "make_toy_overrides=['dit_pool=16','n_val=3','dit_eval_n=4','dit_text_length=24','n_distill=12']",
           "sft_overrides=['stage.save_every=0','stage.micro_batch_size=2']", "align_overrides=['stage.save_every=0','stage.micro_batch_size=2']"]

METRICS = ("trigger_precision", "trigger_recall", "trigger_f1", "exact_scene", "exact_scene_t2i", "attr_shape", "attr_colour", "attr_position",
           "attr_count", "edit_applied", "edit_preserved", "tracking", "text_answer")


def run(tool, *overrides):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    p = run("demo.py", f"toy_dir={root / 'toy'}", f"out_dir={root / 'out'}", *REDUCED, "parallel=true")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root, p


@pytest.mark.slow  # the reduced demo end to end (~75 s with the next test); its phases are tested one by one in the fast tier
def test_demo_writes_a_report_with_every_metric(demo):
    root, p = demo
    report = json.loads((root / "out" / "report.json").read_text())
    for key in METRICS:
        assert key in report and 0.0 <= report[key] <= 1.0, key
    assert report["conversations"] == 6
    assert set(report["by_kind"]) == {"t2i", "edit_user", "edit_generated", "steps", "question", "distractor"}
    assert set(report["seconds"]) == {"data", "vae", "world", "mllm", "sft", "align_warmup", "world_and_sft", "align", "evaluate",
                                      "total"}  # parallel=true: stage 2's warm-up in the branch beside the toy DiT
    log = (root / "out" / "world" / "mllm_sft.log").read_text()
    assert f"generator.path={root / 'toy' / 'wan_early'}" in p.stdout  # its early snapshot (make_toy's dit_text_freeze)
    assert "stopped before the generator's first step" in log
    assert "resume_generator=folder: the generator's weights from" in (root / "out" / "align" / "train.log").read_text()
    assert not list((root / "out" / "world" / "running").iterdir())  # the markers of the branches side by side are gone
    assert "toy MLLM" in (root / "out" / "world" / "mllm_sft.log").read_text()  # the branch beside the DiT wrote its own output
    assert set(report["pretrained_backbones"]) == {"vae", "qwen2_5_vl", "wan"}
    assert report["goals"]["trigger_f1"] == 0.95
    assert "| trigger_f1 |" in (root / "out" / "report.md").read_text()
    pages = list((root / "out" / "transcripts").rglob("*.html"))
    assert len(pages) == 2
    assert "trigger_f1" in p.stdout and "phase seconds" in p.stdout  # the table is printed
    assert (root / "out" / "align" / "final" / "unifuse.json").is_file()


@pytest.mark.slow
def test_demo_reuses_the_cached_world_and_backbones(demo):
    root, _ = demo
    stamps = {part: (root / "toy" / part / "pretrain.json").stat().st_mtime for part in ("vae", "qwen2_5_vl", "wan")}
    p = run("make_toy.py", f"out_dir={root / 'toy'}", "n_train=12", "n_test=6", "n_val=3", "vae_steps=10", "mllm_steps=6", "dit_steps=6",
            "dit_pool=16", "dit_eval_n=4", "dit_text_length=24", "n_distill=12", f"hydra.run.dir={root / 'again'}")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("cached") == 3 and "reused" in p.stdout
    assert stamps == {part: (root / "toy" / part / "pretrain.json").stat().st_mtime for part in stamps}
    assert not [q for q in (root / "toy").iterdir() if q.name.startswith(".")]  # no temporary leftovers


@pytest.mark.slow  # 4 stage-2 runs + 4 evaluations; the ranking / spread arithmetic is in tests/fusion/test_ablation.py
def test_ablation_writes_one_table_for_the_connectors(demo):
    root, _ = demo
    p = run("ablate.py", f"toy_dir={root / 'toy'}", f"out_dir={root / 'out'}", *REDUCED, "connectors=[last_mlp,layer_mix]", "seeds=[0]")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = json.loads((root / "out" / "ablation" / "ablation.json").read_text())
    assert sorted(table["connectors"]) == ["last_mlp", "layer_mix"] and sorted(table["ranking"]) == ["last_mlp", "layer_mix"]
    assert table["seeds"] == [0]  # two seeds: the aggregation is tested in tests/fusion/test_ablation.py
    for name, c in table["connectors"].items():
        assert [r["seed"] for r in c["seeds"]] == [0] and all(r["final_loss"] > 0 for r in c["seeds"])
        assert "trigger_f1" in c["aggregate"] and "exact_scene" in c["aggregate"] and c["rank"] in (1, 2)
        assert (root / "out" / "ablation" / name / "seed0" / "eval" / "report.json").is_file()
    assert "differences" in table
    md = (root / "out" / "ablation" / "ablation.md").read_text()
    assert "| last_mlp |" in md and "| layer_mix |" in md and "## Differences beyond the seed spread" in md
    assert "overrides of these connectors" not in md  # neither has connector_overrides: the title's schedule is theirs
    assert "reusing" in p.stdout  # the demo's stage-1 run
    # a second call reuses the finished runs (same stage-1 model and arguments) and rewrites the same table
    report = root / "out" / "ablation" / "layer_mix" / "seed0" / "eval" / "report.json"
    stamp = report.stat().st_mtime
    again = run("ablate.py", f"toy_dir={root / 'toy'}", f"out_dir={root / 'out'}", *REDUCED, "connectors=[layer_mix,last_mlp]", "seeds=[0]")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing the finished run") == 2 and report.stat().st_mtime == stamp
    again_table = json.loads((root / "out" / "ablation" / "ablation.json").read_text())
    # the same table up to order (the connectors were listed the other way round); compared as sorted JSON lines,
    # since a metric with no samples in this reduced world is NaN, and NaN != NaN in a dict comparison
    lines = [sorted(json.dumps(t["connectors"], sort_keys=True, indent=0).splitlines()) for t in (again_table, table)]
    assert lines[0] == lines[1]


def test_a_failing_phase_stops_the_demo_with_its_name(tmp_path):
    p = run("demo.py", f"toy_dir={tmp_path / 'toy'}", f"out_dir={tmp_path / 'out'}", *REDUCED, "make_toy_overrides=['dit_lr=-1','mllm_hidden_size=nope']",
            "parallel=false")  # one phase after another (the branches side by side: the next test)
    assert p.returncode == 2
    assert "demo phase 'world' failed" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_failing_branch_stops_the_one_beside_it(tmp_path):
    """Stage 1 fails (a bad override) while the toy DiT would train for hours beside it: the demo stops both at once
    and names the failure, not the stopped phase, with the log of the branch that failed."""
    p = run("demo.py", f"toy_dir={tmp_path / 'toy'}", f"out_dir={tmp_path / 'out'}", *REDUCED, "parallel=true", "dit_steps=1000000",
            "sft_overrides=['stage.lr=-1']")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "demo phase 'sft' failed" in p.stderr and "mllm_sft.log" in p.stderr and "Traceback" not in p.stderr
    assert "stage.lr" in (tmp_path / "out" / "world" / "mllm_sft.log").read_text()
    assert (tmp_path / "toy" / "vae" / "pretrain.json").is_file()  # the VAE trained first, alone
    assert not (tmp_path / "toy" / "wan").exists()  # the DiT beside stage 1 was stopped, not finished
    assert not list((tmp_path / "out" / "world" / "running").iterdir())
    assert not (tmp_path / "out" / "report.json").exists()
