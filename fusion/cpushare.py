"""Share the machine's cores with a process that runs beside this one, and take them back when it ends.

``make demo`` (tools/demo.py, ``parallel=true``) runs the toy MLLM and stage 1 beside the toy VAE and DiT. On the
2-core machine two processes of one thread each do about 1.35x the work of one process of two threads (these
models are small: a step is mostly a fixed cost per op), but the longer branch must not stay on one thread once
the other has finished. So each process the demo starts gets :data:`ENV` = a marker file that exists while the
other branch runs: while it exists torch runs on one thread, afterwards on as many as it started with.
:func:`poll` is called from the training loops (at most one look at the file every :data:`EVERY_S` seconds) and
once by :func:`fusion.cli.setup_environment`. Without :data:`ENV` it does nothing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

ENV = "UNIFUSE_CPU_SHARED_WHILE"
EVERY_S = 2.0
log = logging.getLogger(__name__)


class _Share:
    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)
        self.full = torch.get_num_threads()
        self.shared = False
        self.next_look = 0.0

    def poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next_look:
            return
        self.next_look = now + EVERY_S
        shared = self.marker.exists()
        if shared == self.shared:
            return
        self.shared = shared
        threads = 1 if shared else self.full
        torch.set_num_threads(threads)  # the calling (main) thread's setting is what torch's ops read
        log.info("%s: torch on %d thread%s", "another process runs beside this one" if shared else "the process beside this one ended",
                 threads, "" if threads == 1 else "s")


_share: _Share | None = None


def poll(force: bool = False) -> int:
    """Run torch on one thread while the marker file named by ``$UNIFUSE_CPU_SHARED_WHILE`` exists, on all after.
    Returns torch's thread count now."""
    global _share
    marker = os.environ.get(ENV)
    if marker:
        if _share is None or str(_share.marker) != marker:
            _share = _Share(marker)
            force = True
        _share.poll(force)
    return torch.get_num_threads()
