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
