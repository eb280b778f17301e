"""Slow tier: the full ``make demo`` and issue 15's quality goals, one test per goal.

Runs ``python tools/demo.py`` (the full profile; the toy backbones in checkpoints/toy are
reused when cached, built otherwise) once for the module. Goals the demo does not reach yet
are marked xfail with the measured value, so a regression and an improvement both show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion.toyworld.report import GOALS

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

#: goals missed by the full demo as measured (README, "The toy world"; 240 test conversations): metric -> measured value,
#: from the recipe's parts built on a 2-core machine with AVX-512 (same seeds): the toy Wan pretrained 6000 steps with a
#: quarter of its requests in context (dit_p_context=0.25), 70% edits (dit_p_edit=0.7), half of them drawn where another
#: object has the edited object's colour (dit_p_shared_colour=0.5) and the recolour probe labels of recipe 4; the toy
#: MLLM at lr 5e-4 with its vision merger's output initialised at 0.03x and interleaved MRoPE (mllm_vision_out_scale,
#: mllm_mrope_interleaved); stage 1 for 3000 steps, stage 2 as toy_align says (6000 distillation steps, 1500 joint steps,
#: the learned frame head pooling its request; each image of a multi-image turn distilled onto its own words; a 4-layer
#: refiner reading the tokens after the last image, connector_span=since_image; multilayer_concat's projection reading 3
#: neighbouring tokens, window=3): outputs/v2_align. Every goal met there: trigger_f1 1.000, exact_scene_t2i 0.975,
#: t2i_1obj 1.000, edit_applied 0.975, edit_preserved 0.917 (fresh set 0.908), edit_recolour_applied 0.975,
#: edit_add_applied 0.950, edit_remove_applied 1.000, tracking 0.850, text_answer 0.812 (fresh 0.849), gain_ratio@0.7
#: 0.951, gain_ratio@0.9 1.000. (Its second seed, outputs/v2_s1: edit_recolour_applied 0.850 on the test split, 0.927
#: fresh; edit_preserved 0.900 / 0.933; tracking 0.900 / 0.850.) The same code and seeds from a fresh clone on a 2-core
#: machine without AVX-512 (docs/toyworld_log.md, "make demo from a fresh clone on the machine kind without AVX-512") built weaker toy
#: backbones (toy MLLM 0.734 of its held-out questions against 0.812; toy Wan edits 0.828 applied against 0.922) and missed
#: four goals at stage 1's lr 1e-3 (t2i_1obj 0.913, edit_preserved 0.817, edit_recolour_applied 0.850, text_answer 0.765).
#: Stage 1 at lr 5e-4 since (conf/experiment/toy_sft.yaml; the same world, stage 2 as the demo runs it: outputs/lr5e4_align):
#: text_answer 0.835 (fresh 0.932), then t2i_1obj 0.913, edit_preserved 0.825, edit_recolour_applied 0.875 missed. With the
#: text-only distillation corpus since (stage.distill_data, toyworld/distill.jsonl: outputs/dd_align): t2i_1obj 1.000
#: (fresh 1.000), edit_recolour_applied 0.875 (fresh 0.951), edit_preserved 0.875 (fresh 0.883); the two below still
#: missed on the test split: the goals sit inside the spread of a rebuild, so either side may show. With the toy Wan
#: pretrained 9000 steps since (dit_steps=9000, outputs/k9_align on that world): edit_preserved 0.933, edit_recolour_applied
#: 0.900, tracking 0.925, exact_scene_t2i 0.975 (t2i_1obj 1.000): every goal but the budget met on the test split. The
#: fresh-clone `make demo`s of 2026-12-07 (the toy Wan 4500 steps with Muon, then 3500 at 4e-3, the recipe since): every
#: goal but the budget met on both sets (README, "Where it stands"). Two fresh clones of the recipe with stage 2's warm-up
#: beside the toy Wan (90c27dd, 5dba969): every goal met in the first; in the second recolour on the test split 0.875 (35
#: of 40; the fresh set 0.976): a triangle recoloured and drawn as a circle, the same turns failing in both, so the goal
#: sits inside the spread of a rebuild and either side may show. With the DiT frozen throughout stage 2 since (6629b32,
#: fresh clone): every goal met on both sets, recolour 0.950 on the test split (38 of 40), several objects 1.000.
MISSED: dict[str, float] = {}
#: total seconds of the demo's phases with the world built from scratch, measured by `make demo` from a fresh clone on
#: the 2-core machine with AVX-512 on 2026-12-07 (commit 6629b32: the toy Wan's text encoder frozen halfway, stage 2's
#: warm-up on its early snapshot beside the Wan's last steps, the DiT frozen throughout stage 2; README, "Where it
#: stands"): data 5, VAE 214, then side by side 1258 (toy Wan 1038 beside the toy MLLM 337, stage 1 213 and stage 2's
#: warm-up 295), stage 2's joint steps 149, evaluation 75, in a fast hour (the VAE's training 207 s; 231-234 s in the
#: hours of 90c27dd: 1727 s with the DiT at 0.1x in the joint steps, 7570509: 2021 s and 5128632: 1996 s); `make setup`
#: 117 s on top. Earlier runs: docs/toyworld_log.md.
MEASURED_TOTAL_S = 1482


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_full")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), f"out_dir={out}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=7200)  # about 1700-2000 s here with the world built
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("metric,goal", [pytest.param(k, g, marks=pytest.mark.xfail(reason=f"missed: measured {MISSED[k]:.3f}", strict=False))
                                         if k in MISSED else (k, g) for k, g in GOALS if g is not None])
def test_full_demo_reaches_goal(report, metric, goal):
    if report[metric] is None:  # a gain ratio where the DiT's own-encoder gain is ~0 (fusion.gain.gain_ratios)
        pytest.skip(f"{metric} undefined: the DiT's own-encoder gain at that t is under 0.05")
    assert report[metric] >= goal, f"{metric} = {report[metric]:.3f} < {goal}"


@pytest.mark.xfail(reason=f"met at {MEASURED_TOTAL_S} s from a fresh clone; a slower hour (up to 1.2x seen) can miss it", strict=False)
def test_full_demo_fits_its_time_budget(report):
    assert report["seconds"]["total"] < 30 * 60  # setup excluded here; the README gives the fresh-clone figure
