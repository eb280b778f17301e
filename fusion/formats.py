"""Data sets in the layouts people already have (``data.format=``), read into the one :class:`Conversation`.

* ``unifuse`` (default): the Qwen-VL chat JSONL of :mod:`fusion.data`.
* ``sharegpt``: LLaMA-Factory's multimodal ShareGPT JSONL, one object per line::

      {"messages": [{"role": "user", "content": "<image>What is this?"}, {"role": "assistant", "content": "A cat."}],
       "images": ["imgs/cat.png"]}

  or its ``conversations`` / ``from`` / ``value`` variant (``human`` / ``gpt`` / ``system``), with an
  optional top-level ``"system"`` prompt. Each ``<image>`` placeholder takes the next entry of
  ``images`` in order; an ``<image>`` in an assistant turn is a generation target. A count of
  placeholders that differs from the number of images is an error naming the line.
* ``hf``: a Hugging Face ``datasets`` data set on local disk, ``data.path`` a ``save_to_disk``
  folder, a parquet / arrow file or a folder of them. Each row holds ``messages`` (or
  ``conversations``) in either layout above (string contents with ``<image>`` placeholders, or
  typed content lists ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` whose image items take
  the next entry of the row's ``images`` column) and ``images``: a ``datasets.Image`` column (bytes
  inside the file, or paths) or plain path strings. Errors name the file and the row (1-based,
  written as its line). Embedded images are opened lazily: their size is checked from the header
  (``image_too_large``) before anything is decoded. ``data.streaming=true`` reads the rows as training
  consumes them (``datasets``' streaming mode, a buffered shuffle): a set larger than memory trains.

Every check of :mod:`fusion.data` applies to the converted form. ``tools/convert_data.py`` writes any of
them as unifuse JSONL.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from fusion.data import Conversation, SkipReport, apply_policy, iter_jsonl, parse_converted
from fusion.errors import DataError

FORMATS = ("unifuse", "sharegpt", "hf")
PLACEHOLDER = "<image>"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _schema(msg: str) -> DataError:
    return DataError(msg, kind="schema")


def _turns(obj: Any) -> tuple[list, str, str]:
    if not isinstance(obj, dict):
        raise _schema('expected an object with "messages" or "conversations" (ShareGPT)')
    if "messages" in obj:
        turns, role_key, content_key = obj["messages"], "role", "content"
    elif "conversations" in obj:
        turns, role_key, content_key = obj["conversations"], "from", "value"
    else:
        raise _schema('expected an object with "messages" or "conversations" (ShareGPT)')
    if not isinstance(turns, list) or not turns:
        raise _schema(f'"{"messages" if role_key == "role" else "conversations"}" must be a non-empty list')
    return turns, role_key, content_key


def from_sharegpt(obj: Any) -> dict[str, Any]:
    """One ShareGPT object -> the unifuse layout (image entries passed through as they are)."""
    turns, role_key, content_key = _turns(obj)
    name = "messages" if role_key == "role" else "conversations"
    images = obj.get("images", [])
    images = [images] if isinstance(images, str) else images
    if images is None:
        images = []
    if not isinstance(images, list):
        raise _schema('"images" must be a list')
    messages: list[dict[str, Any]] = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    values = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _schema(f"{name}[{i}] must be an object")
        role = SHAREGPT_ROLES.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            raise _schema(f"{name}[{i}].{role_key} is {turn.get(role_key)!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        value = turn.get(content_key)
        if not isinstance(value, str):
            raise _schema(f'{name}[{i}] has no "{content_key}" string')
        values.append((role, value))
    n = sum(v.count(PLACEHOLDER) for _, v in values)
    if n != len(images):
        raise _schema(f"{n} {PLACEHOLDER} placeholder(s) in the text but {len(images)} image(s) in \"images\"")
    k = 0
    for i, (role, value) in enumerate(values):
        items: list[dict[str, Any]] = []
        for j, part in enumerate(value.split(PLACEHOLDER)):
            if j:
                items.append({"type": "image", "image": images[k]})
                k += 1
            if part.strip():
                items.append({"type": "text", "text": part.strip()})
        if not items:
            raise _schema(f"{name}[{i}] is empty")
        messages.append({"role": role, "content": items})
    return {"messages": messages}


def _hf_image(entry: Any, raw: bool = False) -> Any:
    """A ``datasets.Image`` value read with ``decode=False`` ({"bytes", "path"}) or a path string ->
    a lazily opened PIL image (bytes), the path, or with ``raw`` the bytes themselves."""
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
        if data:
            if raw:
                return bytes(data)
            try:
                return Image.open(io.BytesIO(data))  # the header only: check_pixels sees the size before a pixel decodes
            except Exception as e:  # noqa: BLE001 - any undecodable payload is this sample's problem
                raise DataError(f"embedded image does not decode ({type(e).__name__}: {e})", kind="bad_image") from None
        if isinstance(path, str) and path:
            return path
        raise _schema("an image entry with neither bytes nor a path")
    if isinstance(entry, str) and entry:
        return entry
    raise _schema(f"an image entry must be a datasets Image or a path, got {type(entry).__name__}")


def from_hf_row(row: dict[str, Any], raw_images: bool = False) -> dict[str, Any]:
    """One ``datasets`` row -> the unifuse layout."""
    images = [_hf_image(e, raw_images) for e in (row.get("images") or [])]
    turns, role_key, content_key = _turns(row)
    if all(isinstance(t, dict) and isinstance(t.get(content_key), str) for t in turns):  # ShareGPT strings with <image>
        return from_sharegpt({**{k: row[k] for k in ("messages", "conversations", "system") if k in row}, "images": images})
    messages, k = [], 0
    for i, turn in enumerate(turns):  # typed content lists (arrow fills absent keys with None)
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), list):
            raise _schema(f"messages[{i}] must hold a content string or a list of typed items")
        items = []
        for item in turn[content_key]:
            item = {key: v for key, v in item.items() if v is not None} if isinstance(item, dict) else item
            if isinstance(item, dict) and item.get("type") == "image" and "image" not in item:
                if k >= len(images):
                    raise _schema(f"more image items than the {len(images)} image(s) in the row's \"images\"")
                item = {**item, "image": images[k]}
                k += 1
            items.append(item)
        messages.append({"role": SHAREGPT_ROLES.get(turn.get(role_key), turn.get(role_key)), "content": items})
    if k != len(images) and k:
        raise _schema(f"{k} image item(s) but {len(images)} image(s) in the row's \"images\"")
    return {"messages": messages}


def load_hf(path: str | os.PathLike, streaming: bool = False):
    """A local ``datasets`` data set (a ``save_to_disk`` folder, parquet / arrow files or a folder of them),
    image columns set to ``decode=False`` so nothing is decoded before the checks. ``streaming``: a
    ``datasets.IterableDataset`` that reads the files as it is iterated, never the whole set at once."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError("data set not found", str(p), kind="missing_file")
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        ds = datasets.load_from_disk(str(p))  # memory-mapped arrow: not read into memory either way
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        files = [p] if p.is_file() else sorted([*p.glob("*.parquet"), *p.glob("*.arrow")])
        if not files:
            raise DataError("no save_to_disk data set, parquet or arrow files here", str(p), kind="missing_file")
        kind = "parquet" if files[0].suffix == ".parquet" else "arrow"
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", streaming=streaming)
    for col, feat in (ds.features or {}).items():
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
        elif isinstance(feat, (datasets.Sequence, datasets.List)) and isinstance(feat.feature, datasets.Image):
            ds = ds.cast_column(col, datasets.List(datasets.Image(decode=False)))
    return ds


def iter_samples(path: str | os.PathLike, fmt: str = "unifuse", image_root: str | os.PathLike | None = None,
                 allow_outside_root: bool = True, streaming: bool = False) -> Iterator[Conversation | DataError]:
    """Every sample of a data set in file order, as its validated Conversation or the DataError that names its
    file and line (row); nothing is decoded. ``streaming`` (hf): rows read as iterated, not the whole set."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "hf":
        yield from iter_jsonl(path, image_root, allow_outside_root, convert=from_sharegpt if fmt == "sharegpt" else None)
        return
    ds = load_hf(path, streaming)
    root = Path(image_root) if image_root is not None else (Path(path) if Path(path).is_dir() else Path(path).parent)
    for row_no, row in enumerate(ds, start=1):
        try:
            yield parse_converted(row, from_hf_row, str(path), row_no, root, allow_outside_root)
        except DataError as e:
            yield e


def read_conversations(path: str | os.PathLike, fmt: str = "unifuse", image_root: str | os.PathLike | None = None, on_error: str = "error",
                       report: SkipReport | None = None, allow_outside_root: bool = True, streaming: bool = False) -> Iterator[Conversation]:
    """:func:`fusion.data.read_jsonl` for any ``data.format``: validated conversations, bad ones raised or counted."""
    yield from apply_policy(iter_samples(path, fmt, image_root, allow_outside_root, streaming), on_error, report)


def shuffled(items, buffer: int, rng) -> Iterator:
    """A buffered shuffle of a stream (``random.Random`` ``rng``): each item leaves a ``buffer``-slot reservoir at a
    random draw, so memory stays at ``buffer`` items whatever the stream's length. (datasets' own
    ``IterableDataset.shuffle`` does the same but loses each row's number, which every error message names.)"""
    buf: list = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        j = rng.randrange(buffer)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def count_samples(path: str | os.PathLike, fmt: str = "unifuse") -> int:
    """Non-blank lines of a JSONL file, rows of a ``datasets`` data set."""
    if fmt == "hf":
        return len(load_hf(path))
    from fusion.validate import count_lines

    return count_lines(path)


def _image_bytes(ref: Any) -> tuple[bytes, str]:
    """(the encoded bytes, a file suffix) of a conversation's image: a file path, or a lazily opened embedded image."""
    if isinstance(ref, str):
        return Path(ref).read_bytes(), (Path(ref).suffix.lower() or ".png")
    fp = getattr(ref, "fp", None)
    if isinstance(fp, io.BytesIO):
        return fp.getvalue(), "." + (ref.format or "png").lower().replace("jpeg", "jpg")
    buf = io.BytesIO()
    ref.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def convert_to_unifuse(src: str | os.PathLike, fmt: str, out: str | os.PathLike, image_root: str | os.PathLike | None = None,
                       on_error: str = "error", report: SkipReport | None = None, progress: bool = False) -> int:
    """Write ``src`` (any ``data.format``) as unifuse JSONL at ``out``, every image copied to ``<out's folder>/images/``
    under a name from its content hash (the same image once). The file appears only complete. Returns the lines written."""
    import hashlib
    import json

    from fusion.atomic import write_text_atomic

    out = Path(out)
    images = out.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    it = read_conversations(src, fmt, image_root, on_error, report)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="convert", unit="sample", dynamic_ncols=True)
    for conv in it:
        messages = []
        for m in conv.messages:
            items = []
            for item in m["content"]:
                if item["type"] == "image":
                    data, suffix = _image_bytes(item["image"])
                    name = hashlib.sha256(data).hexdigest()[:20] + suffix
                    if not (images / name).is_file():
                        (images / name).write_bytes(data)
                    items.append({"type": "image", "image": f"images/{name}"})
                else:
                    items.append({"type": "text", "text": item["text"]})
            messages.append({"role": m["role"], "content": items})
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    return len(lines)
