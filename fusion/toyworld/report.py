"""What the toy-world pipelines share: phases run as processes, the goals, the tables."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fusion import cpushare
from fusion.errors import UnifuseError

console = Console()
ROOT = Path(__file__).resolve().parents[2]

#: (metric, goal) of issue 7; None: reported, no goal
GOALS = [
    ("trigger_f1", 0.95),
    ("exact_scene_t2i", 0.8),
    ("t2i_1obj", 0.95),
    ("t2i_multi", None),
    ("edit_applied", 0.7),
    ("edit_preserved", 0.9),
    ("edit_recolour_applied", 0.9),
    ("edit_add_applied", 0.9),
    ("edit_remove_applied", 0.9),
    ("edit_move_applied", None),
    ("tracking", 0.7),
    ("tracking_one_earlier", None),  # the image referred back to was the only earlier one (a plain edit)
    ("tracking_several_earlier", None),  # other drawings came after it: the DiT must pick the right condition frame
    ("text_answer", 0.8),
    ("gain_ratio@0.7", 0.5),  # the fused model's conditioning gain at t=0.7 / its DiT's own-encoder gain (fusion/gain.py)
    ("gain@0.7", None),
    ("reference_gain@0.7", None),
    ("gain_ratio@0.9", 0.5),  # the same where text decides most (undefined at a t where the DiT's own gain is under 0.05)
    ("gain@0.9", None),
    ("reference_gain@0.9", None),
    ("exact_scene", None),
    ("attr_shape", None),
    ("attr_colour", None),
    ("attr_position", None),
    ("attr_count", None),
]


class PhaseError(UnifuseError):
    pass


class PhaseStopped(PhaseError):
    """A phase ended because the phase beside it failed (tools/demo.py, parallel=true)."""


def run_phase(name: str, script: str, overrides: list[str], timings: dict, *, log: Path | None = None,
              shared_while: Path | None = None, stop: threading.Event | None = None) -> None:
    """Run ``python tools/<script> <overrides>`` as its own process; time it; stop the pipeline if it fails.

    ``log``: its output appended to this file instead of the console. ``shared_while``: the process runs torch on
    one thread while this marker file exists (fusion/cpushare.py). ``stop``: terminate it when this event is set."""
    cmd = [sys.executable, str(ROOT / "tools" / script), *overrides]
    line = " ".join(["python", f"tools/{script}", *overrides])
    env = dict(os.environ)
    if shared_while is not None:
        env[cpushare.ENV] = str(shared_while)
    if log is None:
        console.rule(f"[bold]{name}")
        console.print(line, style="dim", markup=False)  # an override like dit_families=[wan] is not rich markup
    else:
        console.print(f"[bold]{name}[/] runs beside it: {escape(line)} [dim](output: {escape(str(log))})[/]")
    t0 = time.time()
    with open(log, "a") if log is not None else contextlib.nullcontext() as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT if sink else None)
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    proc.terminate()
                    proc.wait()
                    raise PhaseStopped(f"demo phase {name!r} stopped: the phase beside it failed")
    timings[name] = round(time.time() - t0, 1)
    if rc != 0:
        where = f"its output is in {log}" if log is not None else "rerun the command above to see why"
        raise PhaseError(f"demo phase {name!r} failed (exit status {rc}): {where}")
    console.print(f"{name}: {timings[name]:.0f} s")


def cell(value: float | None) -> str:
    """A metric's value as the tables print it; None is a gain ratio left undefined (fusion.gain.gain_ratios)."""
    from fusion.gain import RATIO_FLOOR

    return f"n/a (its DiT's own gain < {RATIO_FLOOR:g})" if value is None else f"{value:.3f}"


def metrics_table(report: dict, title: str) -> Table:
    """The report's metrics with their goals (rich table)."""
    table = Table(title=title)
    for col, just in (("metric", "left"), ("value", "right"), ("n", "right"), ("goal", "right"), ("", "left")):
        table.add_column(col, justify=just)
    n = report.get("n", {})
    for key, goal in GOALS:
        if key not in report:
            continue
        value = report[key]
        if value is None:  # a gain ratio whose reference gain is ~0 (fusion.gain.gain_ratios)
            table.add_row(key, "n/a", "", "" if goal is None else f">= {goal}", f"[yellow]undefined: {cell(None)[5:-1]}[/]")
            continue
        mark = "" if goal is None else ("[green]met[/]" if value >= goal else f"[red]missed by {goal - value:.2f}[/]")
        table.add_row(key, f"{value:.3f}", str(n.get(key, "")), "" if goal is None else f">= {goal}", mark)
    return table


def markdown(report: dict) -> str:
    """The report's metrics with their goals (markdown table)."""
    rows = ["| metric | value | n | goal |", "|---|---|---|---|"]
    n = report.get("n", {})
    for key, goal in GOALS:
        if key in report:
            rows.append(f"| {key} | {cell(report[key])} | {n.get(key, '')} | {'' if goal is None else f'>= {goal}'} |")
    return "\n".join(rows)


