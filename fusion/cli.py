"""Shared plumbing for the command-line tools in ``tools/``."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

from fusion.errors import UnifuseError


def setup_environment() -> None:
    """Offline-friendly defaults; quiet library warnings that say nothing to a user."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from fusion import cpushare

    cpushare.poll()  # one thread while a process the demo runs beside this one works (fusion/cpushare.py)


def take_launcher_args(argv: list[str] | None = None) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (the ``deepspeed`` launcher adds it unless
    given ``--no_local_rank``; Hydra would reject it) from ``argv`` (default ``sys.argv``, in
    place) and put its value in ``LOCAL_RANK`` where the launcher did not."""
    argv = sys.argv if argv is None else argv
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            del argv[i]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            del argv[i : i + 2]
        else:
            i += 1
    return argv


def friendly_errors(fn: Callable) -> Callable:
    """Turn a :class:`UnifuseError` into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # Hydra's instantiate wraps the error raised by a _target_
            err: BaseException | None = e
            while err is not None and not isinstance(err, UnifuseError):
                err = err.__cause__ or err.__context__
            if err is None:
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
