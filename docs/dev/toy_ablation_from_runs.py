"""The connector ablation's table and verdicts (fusion.toyworld.ablation, as tools/ablate.py) over evaluation folders
made apart, seed k being the k-th folder of a connector:

    python docs/dev/toy_ablation_from_runs.py multilayer_concat=outputs/j1k_align/eval,outputs/j1k_align_s1/eval \
        last_mlp=outputs/demo_w3k/ablation/last_mlp/seed0/eval,outputs/demo_w3k/ablation/last_mlp/seed1/eval

(docs/toyworld_log.md, "On the current recipe (partial, this round)")."""
import json
import sys
from pathlib import Path

from fusion.toyworld.ablation import aggregate, beyond_lines, metrics_of, render_markdown

runs = {}
for arg in sys.argv[1:]:
    name, folders = arg.split("=", 1)
    runs[name] = [{"seed": k, **metrics_of(json.loads((Path(f) / "report.json").read_text()))} for k, f in enumerate(folders.split(","))]
agg = aggregate(runs)
print(render_markdown(agg))
for name in agg["ranking"]:
    a = agg["connectors"][name]["aggregate"]
    cell = lambda k: f"{a[k]['mean']:.3f} ({a[k]['min']:.3f}-{a[k]['max']:.3f})"  # noqa: E731
    print(f"{agg['connectors'][name]['rank']}. {name}: t2i {cell('exact_scene_t2i')}, applied {cell('edit_applied')}, preserved "
          f"{cell('edit_preserved')}, recolour {cell('edit_recolour_applied')}, tracking {cell('tracking')}, gain@0.7 {cell('gain@0.7')} "
          f"(ratio {cell('gain_ratio@0.7')}), exact scene {cell('exact_scene')}")
print(f"beyond the seed spread: {len(beyond_lines(agg))}")
