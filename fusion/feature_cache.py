"""Stage-2 feature cache: the frozen MLLM and the VAE run once over the data, not every epoch.

Run as:
    python tools/train.py experiment=toy_align init_from=outputs/demo/sft cache=build   # build (or reuse), then train from it
    python tools/train.py experiment=toy_align init_from=outputs/demo/sft cache=use     # train from it; the MLLM is never loaded
    python tools/train.py experiment=toy_align init_from=outputs/demo/sft cache=auto    # use if present, else build

In stage 2 the MLLM is frozen and the VAE never trains, so for every sample the
selected-layer hidden states of its context and the latents of its images are the same
every epoch. The cache stores, per conversation:

* the hidden states [n_layers, L, D] of the tokens up to the ``<|bov|>`` of its *last*
  assistant image (a causal model's states of a prefix are those of the prefix alone, so
  every target's context, and the DuoGen negative, is a slice of this one forward);
* the latents of every image up to that one, at the stage's target size (with ``data.buckets``:
  fitted to the conversation's bucket, which the entry records);
* where each image starts and ends in the ids, and which images are targets.

Training then picks the target exactly as the uncached path does (same random draw), so
cached and uncached stage 2 see the same samples and give the same loss (tested).

Layout: ``<cache.dir>/<key>/manifest.json`` + ``shard-r<rank>-<n>.safetensors`` (the
entries of a shard in its safetensors metadata). ``key`` hashes everything the features
depend on: the MLLM's files, the layer selection, the processor's pixel bounds, the
target size, the VAE's files, the data file and its images (size and modification time).
A changed input gives another key, so a stale cache is never read: ``cache=use`` refuses
with the parts that changed, ``cache=build``/``auto`` build a new one. A cache is written
into a hidden ``.partial-*`` folder and renamed when complete.

Query connectors (``queries``, ``multiscale_queries``) read learnable queries through the
MLLM at every step, so their hidden states cannot be cached; what can be is the context's
key/value cache (``kind: kv``): every layer's keys and values of the same prefix, and the rope
position that follows each of its prefixes. Each step then runs only the query tokens through
the frozen MLLM, attending to the stored prefix (gradients reach the query embeddings as
before), instead of the whole context and its images: the same hidden states (tested) at the
cost of the queries. The MLLM is loaded (its vision tower is never run); the cache is larger
(all layers, keys and values, at the key/value heads' width).
"""

from __future__ import annotations

import functools

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from fusion.buckets import fit, image_size
from fusion.data import Conversation, SkipReport, load_images
from fusion.errors import CheckpointError, DataError

log = logging.getLogger(__name__)
FORMAT = 3  # 2: the context's token ids are stored too (stage.distill_target=aligned reads them); 3: a multi-image
# turn's requests are its own words per image (Conversation.text_before_image)
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WHOLE_FILE = 64 << 20  # files up to this size are hashed whole; larger ones by size + head + tail


# ---------------------------------------------------------------------------- fingerprints
def file_fingerprint(path: Path) -> str:
    """sha256 of a file (of its size, first and last 4 MiB when it is larger than 64 MiB)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(4 << 20))
            f.seek(size - (4 << 20))
            h.update(f.read())
    return h.hexdigest()


def folder_fingerprint(path: str | Path) -> str:
    """Fingerprint of a model folder (every file, recursively); a hub id stands for itself."""
    p = Path(path)
    if not p.is_dir():
        return f"id:{path}"
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(f.relative_to(p)).encode())
        h.update(file_fingerprint(f).encode())
    return h.hexdigest()


def data_fingerprint(path: str | Path, convs: Sequence[Conversation]) -> str:
    """The data file's content and every image it uses (path, size, modification time)."""
    h = hashlib.sha256((file_fingerprint(Path(path)) if Path(path).is_file() else folder_fingerprint(path)).encode())
    for conv in convs:
        for _, item in conv.image_items():
            ref = item["image"]
            if isinstance(ref, str):
                st = os.stat(ref)
                h.update(f"{ref}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- the MLLM stand-in
class MLLMFolder(nn.Module):
    """Stands in for the frozen MLLM when its features come from the cache: its widths and
    layer indices (read from ``config.json``, no weights loaded) and its folder, which the
    fused model copies when it is saved."""

    model = None  # no transformers model behind it

    def __init__(self, path: str | Path, hidden_layers: Sequence[int] = (-1,)):
        from transformers import AutoConfig

        super().__init__()
        self.path = Path(path)
        self._config = AutoConfig.from_pretrained(str(self.path))
        text = self._config.get_text_config()
        self.hidden_size, self.num_layers = text.hidden_size, text.num_hidden_layers
        self.hidden_layers = self.resolve_layers(hidden_layers, "mllm.hidden_layers")

    def resolve_layers(self, layers: Sequence[int], key: str) -> list[int]:
        from backbones.mllm.base import resolve_layers

        return resolve_layers(layers, self.num_layers, key)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def save_pretrained(self, path: str | Path) -> None:
        shutil.copytree(self.path, path, dirs_exist_ok=True)

    @functools.cached_property
    def vision_start_id(self) -> int:
        """The token that opens an image's span (``stage.frame_select=learned`` finds the cached contexts' images)."""
        return self._token("vision_start_token_id", "<|vision_start|>")

    @functools.cached_property
    def vision_end_id(self) -> int:
        return self._token("vision_end_token_id", "<|vision_end|>")

    def _token(self, key: str, token: str) -> int:
        value = getattr(self._config, key, None)
        return int(value) if value is not None else int(self.tokenizer.convert_tokens_to_ids(token))

    @functools.cached_property
    def tokenizer(self):
        """The MLLM's tokenizer (``stage.distill_target=aligned`` decodes the cached contexts with it)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))


# ---------------------------------------------------------------------------- the cache
class FeatureCache:
    """A complete cache folder, read lazily (safetensors memory maps)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mf = self.root / MANIFEST
        if not mf.is_file():
            raise CheckpointError(f"{self.root}: not a complete feature cache (no {MANIFEST})")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format", 0) > FORMAT:
            raise CheckpointError(f"{mf}: cache format {self.manifest['format']} is newer than this unifuse ({FORMAT})")
        self._files: list[Any] = []
        self.entries: dict[int, dict[str, Any]] = {}
        for name in self.manifest["shards"]:
            f = safe_open(str(self.root / name), framework="pt")
            for e in json.loads(f.metadata()["entries"]):
                self.entries[e["line"]] = {**e, "shard": len(self._files)}
            self._files.append(f)
        self.skipped: dict[int, dict[str, str]] = {int(k): v for k, v in self.manifest.get("skipped", {}).items()}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def kind(self) -> str:
        """``hidden`` (selected-layer hidden states) or ``kv`` (every layer's keys and values: query connectors)."""
        return self.manifest.get("kind", "hidden")

    def tensors(self, line: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(hidden [n_layers, L, D] or None, latents [N, C, h, w] or None) of one conversation (kind ``kv``:
        the first is the key/value cache [layers, 2, kv_heads, L, head_dim])."""
        e = self.entries[line]
        f = self._files[e["shard"]]
        if not e["targets"]:
            return None, None
        return f.get_tensor(f"{line}.{'kv' if self.kind == 'kv' else 'hidden'}"), f.get_tensor(f"{line}.latents")

    def ids(self, line: int) -> torch.Tensor:
        """The token ids of the cached context [L] (the MLLM's tokens the hidden states belong to)."""
        e = self.entries[line]
        return self._files[e["shard"]].get_tensor(f"{line}.ids").long()

    def entry(self, conv: Conversation) -> dict[str, Any]:
        """A conversation's entry (no tensor read); the DataError the uncached path would raise for it."""
        if conv.line in self.skipped:
            s = self.skipped[conv.line]
            raise DataError(s["reason"], conv.source, conv.line, kind=s["kind"])
        if conv.line not in self.entries:
            raise CheckpointError(f"feature cache {self.root}: no entry for {conv.where}; rebuild it (cache=build)")
        e = self.entries[conv.line]
        if not e["targets"]:
            raise DataError("stage=align sample has no assistant image to learn from", conv.source, conv.line, kind="no_target")
        return e

    def sample(self, conv: Conversation, settings: dict, generator: torch.Generator | None = None):
        """The stage-2 sample of a conversation, as :meth:`FusedModel.prepare_align_sample` would cut it."""
        from fusion.model import AlignSample

        e = self.entry(conv)
        targets = e["targets"]
        if settings.get("target_image", "last") == "random":
            k = targets[int(torch.randint(len(targets), (1,), generator=generator))]
        else:
            k = targets[-1]
        features, latents = self.tensors(conv.line)
        ctx_end = e["starts"][k] if settings.get("include_bov", True) else e["starts"][k] - 1
        neg_len = e["ends"][k - 1] + 1 if k else 0
        if self.kind == "kv":
            f = self._files[e["shard"]]
            kv = (features[:, :, :, :ctx_end], f.get_tensor(f"{conv.line}.next")[:ctx_end].long())
            hidden = None
        else:
            kv, hidden = None, features[:, :ctx_end]
        return AlignSample(self.ids(conv.line)[:ctx_end], None, None, neg_len, latents[k].float(), latents[:k].float() if k else None,
                           conv.where, ctx_hidden=hidden, request=conv.text_before_image(k),
                           bucket=tuple(e["bucket"]) if e.get("bucket") else None, ctx_kv=kv)


def find(cache_dir: str | Path, key: str) -> Path | None:
    p = Path(cache_dir) / key
    return p if (p / MANIFEST).is_file() else None


def explain_miss(cache_dir: str | Path, parts: dict[str, Any]) -> str:
    """Why no cache matches: the parts that differ from complete caches of the same data file."""
    root = Path(cache_dir)
    reasons = []
    for mf in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else []:
        old = json.loads(mf.read_text()).get("parts", {})
        if old.get("data_path") != parts.get("data_path"):
            continue
        changed = sorted(k for k in parts if old.get(k) != parts[k])
        reasons.append(f"{mf.parent.name} (stale: {', '.join(changed)} changed)")
    return "; ".join(reasons) if reasons else "no cache of this data file"


def build(model, convs: Sequence[Conversation], root: str | Path, key: str, parts: dict[str, Any], on_error: str, report: SkipReport,
          dtype: str = "auto", shard_samples: int = 512, rank: int = 0, world: int = 1, progress: bool = True) -> Path:
    """Run the frozen MLLM and the VAE once over ``convs`` into ``<root>/<key>`` (every rank a share)."""
    import torch.distributed as dist

    from fusion.train import NOT_FOR_THIS_STAGE

    final = Path(root) / key
    partial = Path(root) / f".partial-{key}"
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    if distributed:
        dist.barrier()
    mllm, gen = model.mllm, model.generator
    store = DTYPES[dtype] if dtype != "auto" else mllm.model.dtype
    s = model.settings
    kind = "kv" if getattr(model.connector, "uses_queries", False) else "hidden"
    vs, ve = mllm.vision_start_id, mllm.vision_end_id
    entries: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    shards: list[str] = []
    skipped: dict[int, dict[str, str]] = {}

    def flush() -> None:
        if not entries:
            return
        name = f"shard-r{rank:03d}-{len(shards):05d}.safetensors"
        save_file(tensors, str(partial / name), metadata={"entries": json.dumps(entries)})
        shards.append(name)
        entries.clear()
        tensors.clear()

    t0 = time.time()
    mine = list(convs)[rank::world]
    with torch.no_grad():
        for conv in tqdm(mine, desc="feature cache", disable=not progress or rank != 0, dynamic_ncols=True):
            try:
                conv = load_images(conv)
                r = mllm.render(conv)
            except DataError as e:
                if on_error == "error" and e.kind not in NOT_FOR_THIS_STAGE:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise
                report.add(e)
                skipped[conv.line] = {"kind": e.kind, "reason": e.reason}
                continue
            ids = r.input_ids[0]
            targets = [i for i, role in enumerate(r.image_roles) if role == "assistant"]
            entry = {"line": conv.line, "targets": targets, "starts": (ids == vs).nonzero().flatten().tolist(),
                     "ends": (ids == ve).nonzero().flatten().tolist()}
            if targets:
                last = targets[-1]
                rows = [int(g.prod()) for g in r.image_grid_thw]
                pv = r.pixel_values[: sum(rows[:last])].to(mllm.device, mllm.model.dtype) if last else None
                grids = r.image_grid_thw[:last].to(mllm.device) if last else None
                if kind == "kv":
                    kv, nxt = mllm.prefix_cache(ids[: entry["starts"][last]], pv, grids)
                    tensors[f"{conv.line}.kv"] = kv.to(store).contiguous().cpu()
                    tensors[f"{conv.line}.next"] = nxt.to(torch.int32).contiguous().cpu()
                else:
                    hidden = mllm(ids[None, : entry["starts"][last]].to(mllm.device), pixel_values=pv, image_grid_thw=grids,
                                  compute_logits=False)["hidden"][0]
                    tensors[f"{conv.line}.hidden"] = hidden.to(store).contiguous().cpu()
                images = [item["image"] for _, item in conv.image_items()][: last + 1]
                size = model.square_size
                if s.get("buckets"):  # the conversation's bucket, as prepare_align_sample picks it: every image fitted to it
                    size = model.bucket_for(*image_size(images[last]))
                    images = [fit(im, size) for im in images]
                    entry["bucket"] = list(size)
                tensors[f"{conv.line}.ids"] = ids[: entry["starts"][last]].to(torch.int32).contiguous().cpu()
                tensors[f"{conv.line}.latents"] = gen.encode(images, size=size).contiguous().cpu()
            entries.append(entry)
            if len(entries) >= shard_samples:
                flush()
        flush()
    (partial / f"rank{rank:03d}.json").write_text(json.dumps({"shards": shards, "skipped": skipped}))
    if distributed:
        dist.barrier()
    if rank == 0:
        all_shards, all_skipped = [], {}
        for f in sorted(partial.glob("rank*.json")):
            d = json.loads(f.read_text())
            all_shards += d["shards"]
            all_skipped.update(d["skipped"])
            f.unlink()
        manifest = {"format": FORMAT, "key": key, "parts": parts, "shards": all_shards, "skipped": all_skipped,
                    "samples": len(convs), "dtype": str(store).removeprefix("torch."), "seconds": round(time.time() - t0, 1),
                    "layers": list(mllm.hidden_layers), "hidden_size": mllm.hidden_size, "kind": kind}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        log.info("feature cache: %d samples in %.0f s -> %s", len(convs), time.time() - t0, final)
    if distributed:
        dist.barrier()
    return final
