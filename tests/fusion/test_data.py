"""JSONL conversations: validation with file:line messages and the error/skip policies."""

from __future__ import annotations

import json

import pytest

from fusion.data import SkipReport, load_images, parse_conversation, read_jsonl
from fusion.errors import DataError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def good(img="a.png"):
    return json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image", "image": img}]},
                                    {"role": "assistant", "content": "hello"}]})


@pytest.fixture
def folder(tmp_path, images):
    import shutil

    shutil.copy(images["square"], tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return tmp_path


def test_relative_images_resolve_against_the_file_folder(folder):
    f = write_lines(folder / "d.jsonl", [good()])
    (conv,) = list(read_jsonl(f))
    assert conv.line == 1 and conv.where == f"{f}:1"
    assert conv.messages[0]["content"][1]["image"] == str(folder / "a.png")
    assert conv.messages[1]["content"] == [{"type": "text", "text": "hello"}]  # string content normalised


@pytest.mark.parametrize(
    "line, kind, needle",
    [
        ("{not json", "json", "not valid JSON"),
        ('{"messages": []}', "schema", "non-empty list"),
        ('{"msgs": []}', "schema", '"messages"'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "schema", "messages[0].role"),
        ('{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]}', "schema", "unknown content type 'audio'"),
        ('{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "schema", "without a \\\"text\\\""),
        (good("missing.png"), "missing_image", "image file not found"),
    ],
)
def test_bad_lines_name_file_and_line(folder, line, kind, needle):
    f = write_lines(folder / "d.jsonl", [good(), line])
    with pytest.raises(DataError) as ei:
        list(read_jsonl(f))
    assert ei.value.kind == kind
    assert str(ei.value).startswith(f"{f}:2: ")
    assert needle.replace("\\", "") in str(ei.value)


def test_skip_policy_counts_every_kind(folder):
    f = write_lines(folder / "d.jsonl", [good(), "{bad", good("missing.png"), "", good()])
    report = SkipReport()
    convs = list(read_jsonl(f, on_error="skip", report=report))
    assert [c.line for c in convs] == [1, 5]
    assert report.counts == {"json": 1, "missing_image": 1}
    assert "skipped 2 samples" in report.summary()
    assert any(":2:" in e for e in report.examples)


def test_invalid_utf8_is_a_data_error(folder):
    f = folder / "d.jsonl"
    f.write_bytes(good().encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: line is not valid UTF-8"):
        list(read_jsonl(f))


def test_image_that_does_not_decode_names_file_line_and_image(folder):
    f = write_lines(folder / "d.jsonl", [good("corrupt.png")])
    (conv,) = list(read_jsonl(f))  # exists, so the schema pass accepts it
    with pytest.raises(DataError) as ei:
        load_images(conv)
    assert ei.value.kind == "bad_image"
    assert f"{f}:1:" in str(ei.value) and "corrupt.png" in str(ei.value)


def test_corrupt_image_in_render_is_a_data_error(mllm, folder):
    conv = parse_conversation(json.loads(good("corrupt.png")), str(folder / "x.jsonl"), 7)
    with pytest.raises(DataError, match=r"x.jsonl:7: image does not decode"):
        mllm.render(conv)


def test_too_long_sample_is_a_data_error(mllm, folder):
    conv = parse_conversation({"messages": [{"role": "user", "content": "word " * 3000}]}, str(folder / "x.jsonl"), 3)
    with pytest.raises(DataError) as ei:
        mllm.render(conv)
    assert ei.value.kind == "too_long" and "x.jsonl:3" in str(ei.value)


def test_missing_data_file(folder):
    with pytest.raises(DataError, match="data file not found"):
        list(read_jsonl(folder / "nope.jsonl"))


def test_text_only_lines_take_a_drawing_without_a_file_and_refuse_a_blank_anywhere_else(tmp_path):
    """stage.distill_data: an assistant's last image may be ``{"type": "image"}`` (a blank stand-in the distillation never
    reads); a user image without a file, or an image after the stand-in, is refused naming file and line."""
    from fusion.data import PLACEHOLDER_SIDE, drawings_as_placeholders, load_images, read_jsonl

    user = {"role": "user", "content": [{"type": "text", "text": "Draw a yellow circle."}]}
    drawn = {"role": "assistant", "content": [{"type": "text", "text": "Here it is."}, {"type": "image"}]}
    good = {"messages": [user, drawn]}
    lines = [good,
             {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Move it."}]}, drawn]},
             {"messages": [user, drawn, {"role": "user", "content": [{"type": "text", "text": "Again."}]}, drawn]}]
    path = tmp_path / "distill.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(DataError, match=rf"{path}:2: .*messages\[0\].content\[0\].*only an assistant's drawing"):
        list(read_jsonl(path, convert=drawings_as_placeholders))
    path.write_text("".join(json.dumps(x) + "\n" for x in (lines[0], lines[2])))
    with pytest.raises(DataError, match=rf"{path}:2: messages\[1\].content\[1\] is an image item without a file and messages\[3\]"):
        list(read_jsonl(path, convert=drawings_as_placeholders))
    path.write_text(json.dumps(good) + "\n")
    (conv,) = read_jsonl(path, convert=drawings_as_placeholders)
    assert conv.num_target_images() == 1 and conv.text_before_image(0) == "Draw a yellow circle. Here it is."
    assert load_images(conv).messages[-1]["content"][1]["image"].size == (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE)
    with pytest.raises(DataError, match=rf"{path}:1: .*without an \"image\" path"):  # the training data's reader refuses it
        list(read_jsonl(path))
