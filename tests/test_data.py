"""load_text: .txt, .jsonl and folders, and the errors a user sees for bad input."""

from __future__ import annotations

import json

import pytest

from moekit.data import load_text
from moekit.errors import MoekitError


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    assert load_text(tmp_path / "a.txt") == ["hello\nworld\n"]


def test_jsonl_reads_the_field_and_skips_blank_lines(tmp_path):
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two"}), json.dumps({"body": "x", "text": ""})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert load_text(tmp_path / "d.jsonl") == ["one", "two"]  # the empty record is dropped
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "three"}), encoding="utf-8")
    assert load_text(tmp_path / "e.jsonl", field="body") == ["three"]


def test_folder_is_read_in_sorted_order_skipping_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}),
                                      encoding="utf-8")
    (tmp_path / "c.md").write_text("fourth", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("never", encoding="utf-8")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("never", encoding="utf-8")
    assert load_text(tmp_path) == ["first", "second", "third", "fourth"]


@pytest.mark.parametrize("content, message", [
    ("{not json", r"bad\.jsonl:1: not valid JSON"),
    ('["a list"]', r"bad\.jsonl:1: expected a JSON object"),
    ('{"body": "x"}', r'bad\.jsonl:1: no "text" field \(fields: body\)'),
    ('{"text": 3}', r'bad\.jsonl:1: field "text" holds int'),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(MoekitError, match=message):
        load_text(tmp_path / "bad.jsonl")


def test_missing_empty_and_binary_inputs_are_clear_errors(tmp_path):
    with pytest.raises(MoekitError, match="not found"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoekitError, match="has no files"):
        load_text(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(MoekitError, match="contains no text"):
        load_text(tmp_path / "blank.txt")
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe")
    with pytest.raises(MoekitError, match=r"bin\.txt: not UTF-8 text \(byte 2\)"):
        load_text(tmp_path / "bin.txt")
