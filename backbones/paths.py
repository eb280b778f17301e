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


def plain(node) -> dict | None:
    """A yaml node (DictConfig) or dict as a plain dict, or None."""
    if node is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


#: config.json bookkeeping fields that say nothing about the architecture
BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "architectures", "transformers_version", "torch_dtype",
               "dtype", "_commit_hash", "use_cache", "_attn_implementation_autoset", "output_hidden_states", "return_dict"}


def architecture_diff(expected: dict, actual: dict, prefix: str = "") -> list[str]:
    """Fields of ``expected`` (a yaml's ``architecture``) whose value differs in ``actual`` (a
    checkpoint's config), as ``"key: yaml X, checkpoint Y"`` lines; nested dicts are walked,
    bookkeeping fields skipped, lists and tuples compared as lists."""
    out = []
    for key, want in expected.items():
        if key in BOOKKEEPING:
            continue
        name = f"{prefix}{key}"
        if key not in actual:
            continue  # a field this library version does not keep: nothing to compare
        got = actual[key]
        if isinstance(want, dict) and isinstance(got, dict):
            out += architecture_diff(want, got, f"{name}.")
            continue
        if _canon(want) != _canon(got):
            out.append(f"{name}: yaml {want!r}, checkpoint {got!r}")
    return out


def _canon(v):
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    return v
