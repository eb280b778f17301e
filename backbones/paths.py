"""Where a ``path`` setting points: a local checkpoint folder or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from fusion.errors import CheckpointError


def local_folder(path: str, key: str) -> Path | None:
    """The folder ``path`` names, or None for a hub id (``owner/name``).

    A path that looks local (absolute, relative, ``~``, or not of the ``owner/name`` form)
    but is not a folder raises a CheckpointError naming ``key``.
    """
    if not (path.startswith(("/", ".", "~")) or path.count("/") != 1 or os.path.exists(path)):
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"{key}: checkpoint folder not found: {p}")
    return p
