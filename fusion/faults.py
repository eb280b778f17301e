"""Fault injection for the reliability tests: make a run die or misbehave at an exact point.

Set ``UNIFUSE_FAULT`` to a comma-separated list of ``<fault>@<step>`` items, e.g.
``UNIFUSE_FAULT=kill_in_checkpoint@4``. Unset (always, outside tests) every hook is a no-op.

Faults (``step`` = the optimizer step the run is on):

* ``kill_after_step``   SIGKILL right after optimizer step ``step``;
* ``kill_in_checkpoint`` SIGKILL inside the checkpoint of ``step``, after DeepSpeed wrote its files
  and before the checkpoint is marked complete;
* ``kill_before_rename`` SIGKILL after the completion marker is written, before the folder is renamed;
* ``kill_in_export``    SIGKILL while the final model is being written (``step`` = the last step);
* ``term_after_step``   SIGTERM to this process after optimizer step ``step`` (the graceful path);
* ``kill_after_turn``   tools/generate.py: SIGKILL after user turn ``step`` was answered;
* ``kill_in_transcript`` SIGKILL with the transcript written to its hidden folder, before it moves in (``@0``);
* ``nan_loss``          the loss of ``step`` becomes NaN;
* ``inf_grad``          one trainable gradient of ``step`` becomes +Inf (the loss stays finite).
"""

from __future__ import annotations

import os
import signal

ENV = "UNIFUSE_FAULT"
KNOWN = {"kill_after_step", "kill_in_checkpoint", "kill_before_rename", "kill_in_export", "term_after_step", "nan_loss", "inf_grad",
         "kill_after_turn", "kill_in_transcript"}


def planned() -> dict[str, set[int]]:
    """{fault: steps} parsed from ``UNIFUSE_FAULT``; an unknown fault name is an error (a typo must not pass silently)."""
    spec = os.environ.get(ENV, "").strip()
    out: dict[str, set[int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, step = item.partition("@")
        if name not in KNOWN or not step.isdigit():
            raise ValueError(f"{ENV}: cannot read {item!r}; expected <fault>@<step> with fault one of {', '.join(sorted(KNOWN))}")
        out.setdefault(name, set()).add(int(step))
    return out


def due(name: str, step: int) -> bool:
    return step in planned().get(name, ()) if os.environ.get(ENV) else False


def maybe_signal(name: str, step: int) -> None:
    """Deliver the planned signal of ``name`` at ``step`` to this very process."""
    if due(name, step):
        os.kill(os.getpid(), signal.SIGTERM if name.startswith("term") else signal.SIGKILL)
