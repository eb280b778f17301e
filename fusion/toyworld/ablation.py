"""The connector ablation's arithmetic (tools/ablate.py): several stage-2 seeds per connector, the
mean, range and spread of every metric, a ranking, and which differences exceed the seed spread.

Pure functions of the evaluator's report dicts (tools/evaluate.py's report.json), so they are
tested without models. A difference between two connectors counts only when the difference of
their means exceeds the larger of their two seed spreads (max - min over seeds):
``|mean_a - mean_b| > max(spread_a, spread_b)``; anything else is within the noise. With one
seed the spreads are 0 and every nonzero difference counts (there is nothing to judge it by).
Differences and ties are taken up to float noise (EPS). Beside them, two file-time helpers that
decide whether the demo's stage-1 model may be reused (:func:`stage1_predates`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

from fusion.toyworld.report import GOALS

#: the conditioning gain (fusion/gain.py) that evaluate.py reports under report["conditioning_gain"], flattened
GAIN = "gain@0.7"
PRIMARY = "exact_scene"
TIE_BREAK = ("edit_applied", "trigger_f1")
NONE_BEYOND = "none: every difference is within the spread between seeds"
#: float noise (a mean of 0.20 and 0.22 is not quite 0.21): below it, means tie and differences vanish
EPS = 1e-9


def newest_mtime(folder: Path) -> float:
    """The latest modification time of any file under ``folder`` (0 when it holds none)."""
    return max((f.stat().st_mtime for f in Path(folder).rglob("*") if f.is_file()), default=0.0)


def stage1_predates(stage1: Path, mllm: Path) -> bool:
    """Whether a stage-1 model folder was trained before the toy MLLM it started from was (re)built (make_toy rewrites
    ``<mllm>/pretrain.json`` when its settings change), so the ablation must not reuse it."""
    built = Path(mllm) / "pretrain.json"
    return Path(stage1).is_dir() and built.is_file() and built.stat().st_mtime > newest_mtime(stage1)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def metrics_of(report: Mapping) -> dict[str, float]:
    """The metrics of one report: the GOALS keys it has, and ``gain@0.7`` from ``report["conditioning_gain"]``
    (or already flat in the dict). Missing or null values are left out."""
    out = {k: float(report[k]) for k, _ in GOALS if _number(report.get(k))}
    gain = report.get("conditioning_gain")
    if GAIN not in out and isinstance(gain, Mapping) and _number(gain.get(GAIN)):
        out[GAIN] = float(gain[GAIN])
    return out


def metric_keys(runs: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """The metrics any seed of any connector reports, in GOALS order (``gain@0.7`` is one of them)."""
    present = {k for reports in runs.values() for r in reports for k in metrics_of(r)}
    return [k for k, _ in GOALS if k in present]


def stats(values: Sequence[float]) -> dict[str, float] | None:
    """mean, min, max, spread (max - min) and n of the values; None when there are none."""
    if not values:
        return None
    lo, hi = min(values), max(values)
    return {"mean": sum(values) / len(values), "min": lo, "max": hi, "spread": hi - lo, "n": len(values)}


def aggregate(runs: Mapping[str, Sequence[Mapping]], keys: Sequence[str] | None = None, primary: str = PRIMARY,
              tie_break: Sequence[str] = TIE_BREAK, extra: Sequence[str] = ()) -> dict:
    """Aggregate ``{connector: [report of seed 0, report of seed 1, ...]}``.

    ``keys``: the metrics judged (default :func:`metric_keys`); ``extra``: plain numeric keys of the
    dicts (final_loss, seconds) summarised as well but neither ranked nor judged. Connectors are
    ranked by the mean of ``primary``, ties broken by ``tie_break`` in order (a connector without the
    metric ranks below those with it). Returns ``{"keys", "primary", "tie_break", "ranking",
    "connectors": {name: {"rank", "seeds", "aggregate"}}, "differences"}``; ``differences`` holds, for
    every metric (in ``keys`` order) and every pair (higher-ranked first) that both connectors report,
    the two means and spreads and ``beyond``: whether ``|mean_a - mean_b| > max(spread_a, spread_b)``.
    """
    keys = list(metric_keys(runs) if keys is None else keys)
    connectors: dict[str, dict] = {}
    for name, reports in runs.items():
        flat = [metrics_of(r) for r in reports]
        agg = {}
        for k in keys:
            s = stats([m[k] for m in flat if k in m])
            if s is not None:
                agg[k] = s
        for k in extra:
            s = stats([float(r[k]) for r in reports if _number(r.get(k))])
            if s is not None:
                agg[k] = s
        connectors[name] = {"seeds": [dict(r) for r in reports], "aggregate": agg}

    def order(name: str) -> tuple:
        agg = connectors[name]["aggregate"]
        return tuple(-round(agg[k]["mean"] / EPS) if k in agg else float("inf") for k in (primary, *tie_break))

    ranking = sorted(connectors, key=order)  # stable: full ties keep the order they were run in
    for i, name in enumerate(ranking, 1):
        connectors[name]["rank"] = i
    differences = []
    for k in keys:
        for a, b in combinations(ranking, 2):
            sa, sb = connectors[a]["aggregate"].get(k), connectors[b]["aggregate"].get(k)
            if sa is None or sb is None:
                continue
            diff = sa["mean"] - sb["mean"]
            differences.append({"metric": k, "a": a, "b": b, "mean_a": sa["mean"], "mean_b": sb["mean"], "spread_a": sa["spread"],
                                "spread_b": sb["spread"], "difference": diff, "beyond": abs(diff) > max(sa["spread"], sb["spread"]) + EPS})
    return {"keys": keys, "primary": primary, "tie_break": list(tie_break), "ranking": ranking, "connectors": connectors,
            "differences": differences}


def verdict_line(d: Mapping) -> str:
    """``exact_scene: last_mlp 0.420 > layer_mix 0.210 (spreads 0.050, 0.080)``: the higher mean first."""
    hi, lo = (("a", "b") if d["mean_a"] >= d["mean_b"] else ("b", "a"))
    sign = ">" if abs(d["mean_a"] - d["mean_b"]) > EPS else "="
    return (f"{d['metric']}: {d[hi]} {d['mean_' + hi]:.3f} {sign} {d[lo]} {d['mean_' + lo]:.3f} "
            f"(spreads {d['spread_' + hi]:.3f}, {d['spread_' + lo]:.3f})")


def beyond_lines(result: Mapping) -> list[str]:
    """One :func:`verdict_line` per difference beyond the seed spread (metric order, then rank order)."""
    return [verdict_line(d) for d in result["differences"] if d["beyond"]]


def cell(s: Mapping | None) -> str:
    """``mean (min-max)``; empty when the connector lacks the metric."""
    return "" if s is None else f"{s['mean']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def render_markdown(result: Mapping, extra: Sequence[str] = ()) -> str:
    """The ablation's markdown: one table, connectors in rank order, ``mean (min-max)`` over seeds per metric
    (then the ``extra`` keys, e.g. final_loss), and the section "Differences beyond the seed spread"."""
    cols = [*result["keys"], *extra]
    lines = ["| rank | connector | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for name in result["ranking"]:
        c = result["connectors"][name]
        lines.append(f"| {c['rank']} | {name} | {len(c['seeds'])} | " + " | ".join(cell(c["aggregate"].get(k)) for k in cols) + " |")
    tie = ", then ".join(result["tie_break"])
    beyond = beyond_lines(result)
    body = [
        f"Ranked by the mean of {result['primary']}" + (f" (ties: {tie})" if tie else "") + "; each cell is the mean over seeds (min-max).",
        "",
        *lines,
        "",
        "## Differences beyond the seed spread",
        "",
        "A difference counts when |mean_a - mean_b| > max(spread_a, spread_b), the spread being max - min over a connector's seeds; "
        "every other difference is within the noise.",
        "",
        *([f"- {line}" for line in beyond] if beyond else [NONE_BEYOND]),
    ]
    return "\n".join(body) + "\n"
