"""Interleaved conversations in the Qwen-VL chat message format, one per JSONL line.

    {"messages": [{"role": "user", "content": [{"type": "text", "text": "..."},
                                               {"type": "image", "image": "a.png"}]},
                  {"role": "assistant", "content": [...]}]}

Images in assistant turns are generation targets. Relative image paths are resolved
against ``image_root`` (default: the folder of the JSONL file). Every problem raises a
:class:`~fusion.errors.DataError` naming the file and line; :func:`read_jsonl` applies the
``on_error`` policy (``error`` stops at the first bad line, ``skip`` counts and goes on).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from fusion.errors import DataError

ROLES = ("system", "user", "assistant")
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark: accepted at the start of a file, a JSON error anywhere else
CONTENT_TYPES = ("text", "image")


@dataclass
class Conversation:
    """A validated conversation: messages with every image path made absolute."""

    messages: list[dict[str, Any]]
    source: str = "<memory>"
    line: int | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    def has_assistant_turn(self) -> bool:
        """Whether any message is the assistant's (stage 1 learns from those turns only)."""
        return any(m["role"] == "assistant" for m in self.messages)

    def image_items(self) -> list[tuple[str, dict[str, Any]]]:
        """(role, item) for every image, in conversation order."""
        return [
            (m["role"], item)
            for m in self.messages
            if isinstance(m["content"], list)
            for item in m["content"]
            if item["type"] == "image"
        ]

    def until_image(self, k: int) -> "Conversation":
        """The conversation cut just after image ``k`` (0-based, conversation order): every message before
        it, and its own message up to and including the image (later text and images of that message
        dropped). Its last image is then ``k``: a stage-2 sample of it targets that image (teacher forcing)."""
        out, seen = [], 0
        for m in self.messages:
            if not isinstance(m["content"], list):
                out.append(m)
                continue
            items = []
            for item in m["content"]:
                items.append(item)
                if item["type"] == "image":
                    if seen == k:
                        out.append({**m, "content": items})
                        return Conversation(copy.deepcopy(out), self.source, self.line)
                    seen += 1
            out.append(m)
        raise IndexError(f"{self.where}: conversation has {seen} images, no image {k}")

    def text_before_image(self, k: int) -> str:
        """The request an image answers: the text of every turn (user and assistant, system excluded)
        after the previous image, up to image ``k`` (0-based, conversation order), joined by spaces.

        What a generator's own text encoder reads as its prompt (the distillation teacher of stage 2
        and the conditioning-gain reference): for a text-to-image turn the user's request and the
        assistant's words before ``<|bov|>``; for an edit, the edit instruction (the earlier image
        reaches the DiT as a condition frame). In a turn that draws several images (step by step,
        a story) the request describes all of them, so each image's prompt is the turn's own words
        that introduce it ("Now a red circle at the top."), the first image's too when the turn says
        something before it."""
        chunk: list[str] = []
        seen = 0
        for m in self.messages:
            if m["role"] == "system":
                continue
            items = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            several = sum(item.get("type") == "image" for item in items) > 1
            start = len(chunk)  # chunk[start:]: this message's words since its previous image (or its start)
            for item in items:
                if item.get("type") == "image":
                    if seen == k:
                        return " ".join(chunk[start:] if several and chunk[start:] else chunk)
                    seen += 1
                    chunk, start = [], 0
                elif item.get("type") == "text" and str(item.get("text", "")).strip():
                    chunk.append(str(item["text"]).strip())
        raise IndexError(f"{self.where}: conversation has {seen} images, no image {k}")

    def num_target_images(self) -> int:
        return sum(1 for role, _ in self.image_items() if role == "assistant")


def parse_conversation(
    obj: Any, source: str = "<memory>", line: int | None = None, image_root: str | os.PathLike | None = None,
    allow_outside_root: bool = True,
) -> Conversation:
    """Validate one decoded JSON value and return a :class:`Conversation`.

    Checks the schema (roles, content types, required keys), that every image file exists
    and, unless ``allow_outside_root``, that its path (after ``..`` and symlinks) stays inside
    the image root; decoding and size are checked when the image is loaded (:func:`open_image`).
    """

    def fail(msg: str, kind: str = "schema") -> DataError:
        return DataError(msg, source, line, kind=kind)

    if not isinstance(obj, dict) or "messages" not in obj:
        raise fail('expected an object with a "messages" list')
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise fail('"messages" must be a non-empty list')
    root = Path(image_root) if image_root is not None else (Path(source).parent if line is not None else Path.cwd())
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise fail(f"messages[{i}] must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise fail(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            _check_unicode(content, f"messages[{i}].content", source, line)
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list) or not content:
            raise fail(f"messages[{i}].content must be a string or a non-empty list")
        items = []
        for j, item in enumerate(content):
            key = f"messages[{i}].content[{j}]"
            if not isinstance(item, dict):
                raise fail(f"{key} must be an object")
            if "type" not in item:  # {"image": ...} alone: refused, so what trains is what the file says
                raise fail(f'{key} has no "type" (expected "type": "text" or "type": "image")')
            ctype = item.get("type")
            if ctype not in CONTENT_TYPES:
                raise fail(f"{key} has unknown content type {ctype!r}; expected one of {', '.join(CONTENT_TYPES)}")
            if ctype == "text":
                if not isinstance(item.get("text"), str):
                    raise fail(f'{key} is a text item without a "text" string')
                _check_unicode(item["text"], f"{key}.text", source, line)
                items.append({"type": "text", "text": item["text"]})
            else:
                ref = item.get("image")
                if isinstance(ref, Image.Image):
                    items.append({"type": "image", "image": ref})
                    continue
                if not isinstance(ref, str) or not ref:
                    raise fail(f'{key} is an image item without an "image" path')
                if ref.startswith("file://"):
                    ref = ref[len("file://") :]
                p = Path(ref)
                if not p.is_absolute():
                    p = root / p
                if not allow_outside_root and not _inside(p, root):
                    raise DataError(f"{key}: image path {ref!r} resolves outside the image root {root} "
                                    "(data.allow_outside_root=true allows it)", source, line, kind="outside_root")
                try:
                    found = p.is_file()
                except (OSError, ValueError) as e:  # a name too long, no permission, a NUL byte ...
                    raise DataError(f"{key}: image path cannot be read: {ref!r} ({e})", source, line, kind="missing_image") from None
                if not found:
                    raise DataError(f"{key}: image file not found: {p}", source, line, kind="missing_image")
                items.append({"type": "image", "image": str(p)})
        out.append({"role": role, "content": items})
    return Conversation(out, source, line)


def _check_unicode(text: str, key: str, source: str, line: int | None) -> None:
    """Text the tokenizer can encode: no lone surrogates (JSON's ``"\\ud800"`` escapes decode to them) and
    no other code point UTF-8 cannot carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{key} holds a code point UTF-8 cannot encode ({e.reason}: U+{ord(text[e.start]):04X} at character {e.start})",
                        source, line, kind="invalid_unicode") from None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook: a key given twice in one object is an error, not the last value silently winning."""
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


def parse_converted(obj: Any, convert, source: str, line: int, image_root: str | os.PathLike | None = None,
                    allow_outside_root: bool = True) -> Conversation:
    """:func:`parse_conversation` of ``convert(obj)`` (another layout's decoded line or row, ``fusion/formats.py``;
    None: none), the converter's DataErrors named by ``source`` and ``line`` too."""
    if convert is not None:
        try:
            obj = convert(obj)
        except DataError as e:
            raise DataError(e.reason, source, line, kind=e.kind) from None
    return parse_conversation(obj, source, line, image_root, allow_outside_root)


PLACEHOLDER_SIDE = 28  # a drawing's stand-in: the smallest image the MLLM's processor takes (one 28 x 28 patch group)


def drawings_as_placeholders(obj: Any) -> Any:
    """A text-only line (``stage.distill_data``): each assistant ``{"type": "image"}`` item without a file becomes a
    blank stand-in, so a request can say where a drawing goes without one. The stand-in is never learned from: the
    distillation reads the MLLM's states of the context *before* the drawing and the teacher's of the request's words.
    An image item without a file in a user turn is refused (the MLLM would read a blank picture as the user's)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return obj  # parse_conversation names what is wrong
    messages, blank = [], None
    for i, m in enumerate(obj["messages"]):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            items = []
            for j, item in enumerate(m["content"]):
                if isinstance(item, dict) and item.get("type") == "image":
                    if blank is not None:
                        raise DataError(f"{blank} is an image item without a file and messages[{i}].content[{j}] follows it: only "
                                        "a line's last image may be left without one (a later request would read a blank picture)")
                    if item.get("image") is None:
                        blank = f"messages[{i}].content[{j}]"
                        if m.get("role") != "assistant":
                            raise DataError(f'{blank} is an image item without an "image" path: only an '
                                            "assistant's drawing may be left without a file in a text-only line")
                        item = {**item, "image": Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE), "white")}
                items.append(item)
            m = {**m, "content": items}
        messages.append(m)
    return {**obj, "messages": messages}


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


#: default ``data.max_image_pixels``: PIL's own decompression-bomb threshold (89,478,485 pixels)
MAX_IMAGE_PIXELS = 89_478_485
_max_pixels = MAX_IMAGE_PIXELS


def set_max_image_pixels(n: int | None) -> None:
    """``data.max_image_pixels``: images with more pixels are refused from their header, before decoding (None: the default)."""
    global _max_pixels
    if n is not None and int(n) < 1:
        raise ValueError(f"data.max_image_pixels must be positive, got {n}")
    _max_pixels = int(n) if n is not None else MAX_IMAGE_PIXELS


def max_image_pixels() -> int:
    return _max_pixels


#: Qwen2-VL's smart_resize (transformers and qwen-vl-utils) refuses images whose long side exceeds 200x the short one
MAX_ASPECT = 200


def check_image_size(im: Image.Image, ref: Any = "") -> Image.Image:
    """An image the processor accepts: non-empty, aspect ratio at most :data:`MAX_ASPECT`."""
    w, h = im.size
    if min(w, h) < 1:
        raise DataError(f"image is empty ({w}x{h}): {ref}", kind="image_size")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise DataError(f"image is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f} is above the processor's limit of {MAX_ASPECT}: {ref}",
                        kind="image_size")
    return im


def check_pixels(im: Image.Image, ref: Any = "") -> None:
    """Refuse an image whose header declares more than ``data.max_image_pixels`` pixels, before it is decoded."""
    w, h = im.size
    if w * h > _max_pixels:
        raise DataError(f"image is {w}x{h} = {w * h:,} pixels, above data.max_image_pixels={_max_pixels:,} (refused before decoding): {ref}",
                        kind="image_too_large")


def open_image(ref: str | Image.Image, where: str = "") -> Image.Image:
    """Open and fully decode an image as RGB; a file that does not decode, or that the processor
    would refuse (:func:`check_image_size`), raises DataError."""
    if isinstance(ref, Image.Image):  # e.g. from a datasets Image column, opened lazily (header read, nothing decoded)
        check_pixels(ref, "<image>")
        try:
            return check_image_size(ref, "<image>").convert("RGB")
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt embedded bytes
            raise DataError(f"embedded image does not decode ({type(e).__name__}: {e})", where or None, kind="bad_image") from None
    try:
        with warnings.catch_warnings():  # PIL warns of a decompression bomb on open: check_pixels decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(ref)  # reads the header only
        with im:
            check_pixels(im, ref)
            im.load()
            return check_image_size(im, ref).convert("RGB")
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's own limit: refused by PIL on open
        raise DataError(f"image is too large to decode safely: {ref} ({e})", where or None, kind="image_too_large") from None
    except FileNotFoundError:
        raise DataError(f"image file not found: {ref}", where or None, kind="missing_image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"image does not decode: {ref} ({type(e).__name__}: {e})", where or None, kind="bad_image") from None


def load_images(conv: Conversation) -> Conversation:
    """Return a copy of ``conv`` whose image items hold decoded PIL images."""
    messages = []
    for m in conv.messages:
        items = []
        for item in m["content"]:
            if item["type"] == "image":
                try:
                    img = open_image(item["image"])
                except DataError as e:
                    raise DataError(e.reason, conv.source if conv.line is not None else None, conv.line, kind=e.kind) from None
                items.append({"type": "image", "image": img, "path": item["image"] if isinstance(item["image"], str) else None})
            else:
                items.append(dict(item))
        messages.append({"role": m["role"], "content": items})
    return Conversation(messages, conv.source, conv.line)


@dataclass
class SkipReport:
    """Counts of skipped lines by kind, with the first few messages kept for the summary."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, err: DataError, keep: int = 20) -> None:
        self.counts[err.kind] += 1
        if len(self.examples) < keep:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"skipped {self.total} samples ({kinds})"


def is_blank(raw: bytes) -> bool:
    """A line with nothing but JSON whitespace (space, tab, CR, LF): not a sample."""
    return not raw.strip(b" \t\r\n")


def read_jsonl(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    on_error: str = "error",
    report: SkipReport | None = None,
    allow_outside_root: bool = True,
    convert=None,
) -> Iterator[Conversation]:
    """Yield validated conversations from a JSONL file.

    ``on_error='error'`` raises the first :class:`DataError`; ``'skip'`` records it in
    ``report`` and goes on. ``convert``: a function from another layout's decoded line to this
    one's (``fusion/formats.py``), applied before the checks; its DataErrors name the line too. Blank lines are ignored. Whatever the bytes, a bad line raises
    (or records) a DataError naming file and line, never another exception.
    """
    yield from apply_policy(iter_jsonl(path, image_root, allow_outside_root, convert), on_error, report)


def apply_policy(items, on_error: str = "error", report: SkipReport | None = None) -> Iterator[Conversation]:
    """Conversations of a stream of ``Conversation | DataError``: the first error raised (``error``) or counted (``skip``)."""
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")
    report = report if report is not None else SkipReport()
    for item in items:
        if isinstance(item, DataError):
            if on_error == "error":
                raise item
            report.add(item)
        else:
            yield item


def iter_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None, allow_outside_root: bool = True,
               convert=None) -> Iterator[Conversation | DataError]:
    """Every non-blank line of a JSONL file in order, as its validated Conversation or the DataError naming it
    (``.line`` set either way); a missing file raises."""
    path = Path(path)
    if not path.is_file():
        raise DataError("data file not found", str(path), kind="missing_file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                if lineno == 1 and raw.startswith(BOM):  # a UTF-8 byte-order mark (Windows editors): not part of the JSON
                    raw = raw[len(BOM):]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"line is not valid UTF-8 ({e.reason} at byte {e.start})", str(path), lineno, kind="invalid_utf8") from None
                if is_blank(raw):
                    continue
                try:
                    obj = json.loads(text, object_pairs_hook=_no_duplicates)
                except _DuplicateKey as e:
                    raise DataError(f"key {e.args[0]!r} appears twice in one object (the last value would silently win)", str(path), lineno,
                                    kind="duplicate_key") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", str(path), lineno, kind="json")
                except RecursionError:
                    raise DataError("JSON nested too deeply to read", str(path), lineno, kind="json") from None
                except ValueError as e:  # e.g. an integer longer than Python's int-string limit
                    raise DataError(f"not valid JSON ({e})", str(path), lineno, kind="json") from None
                yield parse_converted(obj, convert, str(path), lineno, image_root, allow_outside_root)
            except DataError as e:
                yield e
