"""Issue 19's bad-input kinds, each in a file written here: refused by name (file:line and kind) by the
loader and the validator, never a traceback; a UTF-8 byte-order mark on line 1 is accepted."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from fusion.data import SkipReport, open_image, read_jsonl, set_max_image_pixels
from fusion.errors import DataError
from fusion.validate import validate_file

GOOD = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Draw a red square."}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "Here."}, {"type": "image", "image": "a.png"}]}]}


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    yield tmp_path
    set_max_image_pixels(None)


#: (line bytes, expected kind or None for accepted, a phrase of the message)
CASES = [
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), None, ""),  # line 1: a byte-order mark, accepted
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid_utf8", "not valid UTF-8"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800 hi"}]}, GOOD["messages"][1]]}).encode(),
     "invalid_unicode", "messages[0].content[0].text holds a code point UTF-8 cannot encode"),
    (b'{"messages": [{"role": "user", "content": "a"}], "messages": [{"role": "assistant", "content": "b"}]}', "duplicate_key", "'messages' appears twice"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png", "image": "big.png"}]}]}', "duplicate_key", "'image' appears twice"),
    (b'{"messages": [{"role": "user", "content": [{"image": "a.png"}]}]}', "schema", 'messages[0].content[0] has no "type"'),
    (b"\xef\xbb\xbf" + json.dumps(GOOD).encode(), "json", "not valid JSON"),  # a byte-order mark on any other line: bad JSON
    (json.dumps({"messages": [GOOD["messages"][0], {"role": "assistant", "content": [{"type": "image", "image": "big.png"}]}]}).encode(),
     "image_too_large", "above data.max_image_pixels=2,000"),
    (json.dumps({"messages": [{"role": "user", "content": "Draw it."}]}).encode(), "no_assistant_turn", "no assistant turn"),
]


def write(folder: Path) -> Path:
    f = folder / "data.jsonl"
    f.write_bytes(b"\n".join(line for line, _, _ in CASES) + b"\n")
    return f


def test_the_validator_names_each_kind_by_file_and_line(folder):
    set_max_image_pixels(2000)  # data.max_image_pixels: big.png (64x64 = 4096) is over it, a.png (1024) is not
    f = write(folder)
    rep = validate_file(f)  # no stage: stage 1's checks
    expected = {}
    for lineno, (_, kind, phrase) in enumerate(CASES, start=1):
        if kind is None:
            continue
        expected[kind] = expected.get(kind, 0) + 1
        assert any(e.startswith(f"{f}:{lineno}: ") and phrase in e for e in rep.examples[kind]), (kind, rep.examples.get(kind))
    assert dict(rep.counts) == expected
    assert rep.valid == 2 and rep.warnings == 1  # the byte-order-mark line, and the warning (no assistant turn) counted as valid
    assert "no_assistant_turn: 1 (warning)" in rep.render()
    align = validate_file(f, stage="align")  # stage 2: a conversation with no assistant turn has no target either
    assert align.counts["no_target"] == 1 and "no_assistant_turn" not in align.counts


def test_the_loader_stops_at_the_first_bad_line_or_skips_and_counts(folder):
    set_max_image_pixels(2000)
    f = write(folder)
    with pytest.raises(DataError) as e:
        list(read_jsonl(f))
    assert (e.value.line, e.value.kind) == (2, "invalid_utf8") and str(f) in str(e.value)
    report = SkipReport()
    convs = list(read_jsonl(f, on_error="skip", report=report))
    # the loader checks what a line holds; image decoding and the stage's needs are checked per sample (validator, trainer)
    assert [c.line for c in convs] == [1, 8, 9]
    assert dict(report.counts) == {"invalid_utf8": 1, "invalid_unicode": 1, "duplicate_key": 2, "schema": 1, "json": 1}


def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    from PIL import ImageFile

    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 M pixels in a small file (PIL's limit: 89,478,485)
    assert bomb.stat().st_size < 2_000_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either: the header decides
        with pytest.raises(DataError, match="10000x10000 = 100,000,000 pixels, above data.max_image_pixels=89,478,485") as e:
            open_image(str(bomb))
    assert e.value.kind == "image_too_large" and decoded == []  # refused without decoding a pixel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Image.open(bomb).load()
    assert decoded == [(10_000, 10_000)]  # (the stand-in does see a decode when one happens)
    monkeypatch.undo()
    huge = tmp_path / "huge.png"
    Image.new("1", (15_000, 15_000)).save(huge)  # over twice PIL's limit: PIL itself refuses it on open
    with pytest.raises(DataError) as e:
        open_image(str(huge))
    assert e.value.kind == "image_too_large"
