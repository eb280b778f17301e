"""Check a JSONL data file before training, with the same checks the training loader applies lazily.

Per line, in order (the first failing check names the line's problem kind):

``invalid_utf8``    a line that is not valid UTF-8 (a UTF-8 byte-order mark at the start of the file is accepted)
``json``            not JSON
``duplicate_key``   a key given twice in one JSON object (the last value would silently win)
``schema``          not ``{"messages": [...]}``, unknown role, a content item with no or an unknown ``"type"``, missing text / image key
``invalid_unicode`` text holding code points UTF-8 cannot carry (lone surrogates from ``"\\ud800"`` escapes)
``outside_root``    an image path that resolves outside the image root (``data.allow_outside_root=true`` allows it)
``missing_image``   an image file that does not exist
``image_too_large`` an image whose header declares more than ``data.max_image_pixels`` pixels (refused before decoding)
``bad_image``       an image that does not decode
``image_size``      an image the processor refuses (aspect ratio above 200, empty)
``too_long``        the rendered sample is longer than ``mllm.max_length`` (needs the MLLM's processor)
``no_target``       (stage=align only) no assistant image to learn from: skipped by stage 2, a warning here
``no_assistant_turn`` (stage=sft or none given) no assistant turn at all: skipped by stage 1, a warning here

:func:`validate_file` returns a :class:`ValidationReport`; ``tools/validate_data.py`` prints it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion.data import BOM, Conversation, is_blank, load_images
from fusion.errors import DataError

#: kinds that do not make the file invalid: the sample is fine, it just has nothing for this stage
WARNING_KINDS = ("no_target", "no_assistant_turn")


@dataclass
class ValidationReport:
    path: str
    lines: int = 0  # non-blank lines
    valid: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    skipped_checks: list[str] = field(default_factory=list)

    def add(self, err: DataError, keep: int = 5) -> None:
        self.counts[err.kind] += 1
        ex = self.examples.setdefault(err.kind, [])
        if len(ex) < keep:
            ex.append(str(err))

    @property
    def errors(self) -> int:
        return sum(v for k, v in self.counts.items() if k not in WARNING_KINDS)

    @property
    def warnings(self) -> int:
        return sum(v for k, v in self.counts.items() if k in WARNING_KINDS)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "lines": self.lines, "valid": self.valid, "errors": self.errors, "warnings": self.warnings,
                "counts": dict(self.counts), "examples": self.examples, "checks": self.checks, "skipped_checks": self.skipped_checks}

    def render(self) -> str:
        out = [f"{self.path}: {self.lines} samples, {self.valid} valid, {self.errors} with errors, {self.warnings} with warnings",
               f"checks: {', '.join(self.checks)}"]
        if self.skipped_checks:
            out.append(f"not checked: {'; '.join(self.skipped_checks)}")
        for kind, n in sorted(self.counts.items(), key=lambda kv: (kv[0] in WARNING_KINDS, -kv[1])):
            label = "warning" if kind in WARNING_KINDS else "error"
            out.append(f"  {kind}: {n} ({label})")
            out += [f"    {e}" for e in self.examples.get(kind, [])]
            if n > len(self.examples.get(kind, [])):
                out.append(f"    ... and {n - len(self.examples[kind])} more")
        return "\n".join(out)


def count_lines(path: str | Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for n, raw in enumerate(f) if not is_blank(raw[3:] if n == 0 and raw.startswith(BOM) else raw))


def check_sample(conv: Conversation, render=None, stage: str | None = None) -> None:
    """The per-sample checks after parsing: images decode and have a size the processor accepts, the
    rendered length fits (``render``: the MLLM's renderer, or None), a stage-2 target exists."""
    loaded = load_images(conv)
    if render is not None:
        render(loaded)
    if stage == "align" and not loaded.num_target_images():
        raise DataError("no assistant image to learn from (stage 2 skips it)", conv.source, conv.line, kind="no_target")
    if stage != "align" and not loaded.has_assistant_turn():
        raise DataError("no assistant turn to learn from (stage 1 skips it)", conv.source, conv.line, kind="no_assistant_turn")


def validate_file(path: str | Path, image_root: str | Path | None = None, allow_outside_root: bool = False,
                  render=None, stage: str | None = None, progress: bool = False, fmt: str = "unifuse") -> ValidationReport:
    """Run every check over ``path`` (``fmt``: ``data.format``); never raises for a bad sample (each one is counted by kind)."""
    from fusion.formats import count_samples, read_conversations

    if not (Path(path).is_file() or (fmt == "hf" and Path(path).is_dir())):
        raise DataError("data file not found", str(path), kind="missing_file")
    report = ValidationReport(str(path))
    report.checks = ["json", "schema", "image path policy", "image exists", "image decodes", "image size/aspect"]
    if render is not None:
        report.checks.append("rendered length")
    else:
        report.skipped_checks.append("rendered length (no MLLM processor given: mllm.path)")
    if stage == "align":
        report.checks.append("stage-2 target present")
    report.lines = count_samples(path, fmt)

    it = read_conversations(path, fmt, image_root, "skip", report, allow_outside_root=allow_outside_root)  # each bad line: into the report
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="validate", unit="sample", dynamic_ncols=True)
    for conv in it:
        try:
            check_sample(conv, render, stage)
            report.valid += 1
        except DataError as e:
            report.add(e)
            if e.kind in WARNING_KINDS:
                report.valid += 1
    return report
