"""Bad data never fails silently or strangely: property-based tests of the JSONL loader (random bytes,
random JSON shapes, random unicode, truncated files), the lazy per-sample checks, and the validator.

The property: over any file, ``read_jsonl(on_error="error")`` either yields valid conversations or
raises the project's DataError naming the file and a line of it; with ``on_error="skip"`` it never
raises and every non-blank line is either yielded or counted."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fusion.data import Conversation, SkipReport, check_image_size, read_jsonl
from fusion.errors import DataError
from fusion.validate import validate_file

REPO = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CASES = {"n": 0}  # how many files the properties tried (printed by the last test)


@pytest.fixture(scope="module", autouse=True)
def count_cases():
    yield
    print(f"\nproperty-based loader cases: {CASES['n']} generated files, each read three ways (pytest -s shows this)")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(d / "images" / "a.png")
    (d / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return d


#: text with lone surrogates now and then (hypothesis's text never holds them): as bytes they are invalid UTF-8
#: (surrogatepass), inside JSON strings they arrive as "\\ud800" escapes that decode to text the tokenizer refuses
TEXT = st.one_of(st.text(max_size=20), st.builds(lambda a, k, b: a + chr(k) + b, st.text(max_size=8), st.integers(0xD800, 0xDFFF),
                                                 st.text(max_size=8)))


def _encodable(conv: Conversation) -> bool:
    return all(item["text"].encode("utf-8") is not None for m in conv.messages for item in m["content"] if item["type"] == "text")


def check_file(path: Path, data: bytes) -> None:
    """The loader's contract over one file's bytes."""
    CASES["n"] += 1
    path.write_bytes(data)
    raws = data.split(b"\n")
    raws[0] = raws[0].removeprefix(b"\xef\xbb\xbf")  # a byte-order mark opening the file is not part of line 1
    n_lines = sum(1 for raw in raws if raw.strip(b" \t\r\n"))  # JSON whitespace only: a form feed is not blank
    try:
        for conv in read_jsonl(path, on_error="error", allow_outside_root=False):
            assert isinstance(conv, Conversation) and _encodable(conv)  # every text it yields reaches a tokenizer intact
    except DataError as e:
        assert e.path == str(path) and isinstance(e.line, int) and 1 <= e.line <= data.count(b"\n") + 1, str(e)
    report = SkipReport()
    yielded = list(read_jsonl(path, on_error="skip", report=report, allow_outside_root=False))
    assert len(yielded) + report.total == n_lines
    v = validate_file(path)  # the validator's contract: it counts, never raises for a sample
    assert v.lines == n_lines and v.valid + v.errors == n_lines


def _file(root: Path) -> Path:
    return root / "data.jsonl"


@SETTINGS
@given(st.lists(st.binary(max_size=120), max_size=12))
def test_random_bytes(root, lines):
    check_file(_file(root), b"\n".join(lines))


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=80), TEXT), max_size=12))
def test_random_unicode(root, lines):
    check_file(_file(root), "\n".join(lines).encode("utf-8", errors="surrogatepass"))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
PATHS = st.one_of(st.sampled_from(["images/a.png", "images/broken.png", "images/none.png", "../a.png", "/etc/passwd", "", "file://images/a.png",
                                   "images/../images/a.png", "a\x00b.png", "x" * 300]), st.text(max_size=30))
ITEM = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, JSON)}),
    st.fixed_dictionaries({"type": st.just("image"), "image": st.one_of(PATHS, JSON)}),
    st.fixed_dictionaries({"image": PATHS}),
    st.dictionaries(st.sampled_from(["type", "text", "image", "other"]), JSON, max_size=3),
    JSON,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot", ""]),
                           "content": st.one_of(TEXT, st.lists(ITEM, max_size=4), JSON)}),
    JSON,
)
SAMPLE = st.one_of(st.fixed_dictionaries({"messages": st.one_of(st.lists(MESSAGE, max_size=4), JSON)}), JSON)


@SETTINGS
@given(st.lists(SAMPLE, max_size=8))
def test_random_json_shapes(root, samples):
    check_file(_file(root), "\n".join(json.dumps(s) for s in samples).encode())


@SETTINGS
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=40))
def test_truncated_and_spliced_files(root, cut, garbage):
    good = {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/a.png"}, {"type": "text", "text": "Draw it"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "Here: ü"}, {"type": "image", "image": "images/a.png"}]}]}
    data = ("\n".join(json.dumps(good, ensure_ascii=False) for _ in range(6)) + "\n").encode()
    cut = cut % (len(data) + 1)
    check_file(_file(root), data[:cut])  # a file cut anywhere, even inside a UTF-8 character
    check_file(_file(root), data[:cut] + bytes(range(garbage)) + data[cut:])  # bytes spliced in


def test_deep_nesting_is_a_data_error(root):
    check_file(_file(root), b"[" * 100_000 + b"\n" + json.dumps({"messages": "x" * 10}).encode())




# ---------------------------------------------------------------------------- lazy checks
def test_image_size_policy():
    check_image_size(Image.new("RGB", (400, 2)))  # 200:1 is the limit and passes
    with pytest.raises(DataError, match="aspect ratio 201") as e:
        check_image_size(Image.new("RGB", (201, 1)), "thin.png")
    assert e.value.kind == "image_size"


def test_path_policy(root, tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "images" / "link.png").unlink(missing_ok=True)
    (root / "images" / "link.png").symlink_to(outside)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": "x"}]}]}
            for ref in ("images/a.png", "images/../images/a.png", "../elsewhere.png", str(outside), "images/link.png")]
    f = root / "policy.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = SkipReport()
    ok = list(read_jsonl(f, on_error="skip", report=report, allow_outside_root=False))
    assert [c.line for c in ok] == [1, 2] and report.counts == {"outside_root": 3}  # "..", an absolute path, a symlink out
    assert len(list(read_jsonl(f, on_error="skip", allow_outside_root=True))) == 4  # ../elsewhere.png does not exist under root/..


def test_loader_worker_turns_any_failure_into_a_reported_sample(root, monkeypatch):
    import fusion.train as train

    conv = next(read_jsonl(_write(root, [{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/a.png"}]}]}])))

    def boom(c):
        raise RuntimeError("decoder crashed")

    monkeypatch.setattr(train, "load_images", boom)
    item = train.ConversationDataset([conv])[0]
    assert isinstance(item, DataError) and item.kind == "load_failed" and f"{conv.source}:1:" in str(item) and "decoder crashed" in str(item)


def _write(root: Path, rows: list) -> Path:
    f = root / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


# ---------------------------------------------------------------------------- tools/validate_data.py
def _validate(*overrides):
    return subprocess.run([sys.executable, str(REPO / "tools" / "validate_data.py"), *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow  # the CLI end to end; every kind is checked through validate_file in tests/fusion/test_data_intake.py
def test_validate_data_reports_every_kind(root, tiny_dir, tmp_path):
    Image.new("RGB", (1000, 3)).save(root / "images" / "thin.png")
    good = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Draw a red square."}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "Here."}, {"type": "image", "image": "images/a.png"}]}]}
    img = lambda ref: {"messages": [good["messages"][0], {"role": "assistant", "content": [{"type": "image", "image": ref}]}]}  # noqa: E731
    lines = [json.dumps(good), "{oops", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), json.dumps(img("../a.png")),
             json.dumps(img("images/none.png")), json.dumps(img("images/broken.png")), json.dumps(img("images/thin.png")),
             json.dumps({"messages": [{"role": "user", "content": "word " * 3000}, good["messages"][1]]}),
             json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})]
    f = root / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report.json"
    p = _validate(f"data.path={f}", f"tiny_dir={tiny_dir}", "stage=align", f"report={out}")
    assert p.returncode == 1, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["counts"] == {"json": 1, "schema": 1, "outside_root": 1, "missing_image": 1, "bad_image": 1, "image_size": 1,
                             "too_long": 1, "no_target": 1}
    assert rep["lines"] == 9 and rep["valid"] == 2 and rep["errors"] == 7 and rep["warnings"] == 1
    assert f"{f}:2: not valid JSON" in p.stdout and f"{f}:8: sample is" in p.stdout
    p = _validate(f"data.path={f}", f"tiny_dir={tiny_dir}", "data.on_error=skip")  # what training would skip: exit 0
    assert p.returncode == 0 and "7 with errors" in p.stdout
    p = _validate(f"data.path={root / 'absent.jsonl'}", f"tiny_dir={tiny_dir}")
    assert p.returncode == 2 and "data file not found" in p.stderr and "Traceback" not in p.stderr


def test_unreadable_paths_and_huge_numbers_are_data_errors(root):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "x" * 300 + ".png"}]}]},  # ENAMETOOLONG
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "a\x00b.png"}]}]}]
    f = _write(root, rows)
    (f.parent / "huge.jsonl").write_text('{"messages": ' + "9" * 5000 + "}\n")  # above Python's int-string limit
    for path in (f, f.parent / "huge.jsonl"):
        check_file(path, path.read_bytes())
    report = SkipReport()
    assert list(read_jsonl(f, on_error="skip", report=report)) == [] and report.counts == {"missing_image": 2}
