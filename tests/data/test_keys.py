"""Specification of image keys and side files (textdiff/data/sources.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from textdiff.data.side_files import parse_captions, parse_px_scale, parse_safebox, read_key_values, resolve_side_file
from textdiff.data.sources import KeyIndex, SourceError, canonical_key, legacy_key, scan_images, stem_key

IMAGES = ["signs/street/0001.jpg", "signs/street/0002.png", "top.webp", "a/b.png", "a_b.png", "x.jpg", "x.png"]


@pytest.fixture()
def index() -> KeyIndex:
    return KeyIndex(IMAGES)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_canonical_and_legacy_keys_of_a_nested_path():
    assert canonical_key("signs/street/0001.jpg") == "signs/street/0001"
    assert legacy_key("signs/street/0001.jpg") == "signs_street_0001"
    assert stem_key("signs/street/0001.jpg") == "0001"


def test_canonical_legacy_and_extension_keys_name_the_same_image(index):
    for key in ("signs/street/0001", "signs_street_0001", "0001", "signs/street/0001.jpg"):
        assert index.resolve(key) == ["signs/street/0001.jpg"]


def test_a_key_matching_two_images_resolves_to_both(index):
    assert index.resolve("a_b") == ["a/b.png", "a_b.png"]
    assert index.resolve("b") == ["a/b.png"]
    assert index.resolve("x") == ["x.jpg", "x.png"]
    assert index.resolve("x.png") == ["x.png"]


def test_unknown_key_resolves_to_nothing(index):
    assert index.resolve("signs/street/0003") == []
    assert index.resolve("street/0001") == []


def test_scan_finds_nested_images_sorted_and_ignores_other_files(tmp_path):
    for rel in ("b/c/z.PNG", "a.jpg", "a.txt", "notes.md", "b/y.gif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert scan_images(tmp_path) == ["a.jpg", "b/c/z.PNG", "b/y.gif"]


def test_scan_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(SourceError, match="no_such_dir does not exist"):
        scan_images(tmp_path / "no_such_dir")


def test_side_file_as_one_json_object(tmp_path):
    path = write(tmp_path / "capts.json", json.dumps({"top": "a sign", "x.jpg": ["one", "two"]}))
    entries, problems = read_key_values(path)
    assert [(k, v) for k, v, _ in entries] == [("top", "a sign"), ("x.jpg", ["one", "two"])]
    assert problems == []


def test_side_file_as_json_lines_reports_the_malformed_line_number(tmp_path):
    lines = ['{"key": "top", "value": "a sign"}', "", '{"key": "x.jpg", "value": [1, 2', '["not", "an object"]',
             '{"key": "a/b", "value": "ok"}']
    path = write(tmp_path / "capts.jsonl", "\n".join(lines) + "\n")
    entries, problems = read_key_values(path)
    assert [(k, w) for k, _, w in entries] == [("top", f"{path}:1"), ("a/b", f"{path}:5")]
    assert [p.where for p in problems] == [f"{path}:3", f"{path}:4"]
    assert "line 3 is not valid JSON" in problems[0].reason and problems[0].kind == "bad_json_line"


def test_json_lines_with_a_malformed_first_line_is_still_read_as_lines(tmp_path):
    path = write(tmp_path / "s.jsonl", '{"key": "top", "value": [0, 0, 4\n{"key": "x.jpg", "value": [0, 0, 4, 4]}\n')
    entries, problems = read_key_values(path)
    assert len(entries) == 1 and problems[0].where.endswith(":1")


def test_a_broken_json_object_file_is_fatal_with_line_and_column(tmp_path):
    path = write(tmp_path / "capts.json", '{\n  "top": "a sign",\n  "x": \n}\n')
    with pytest.raises(SourceError, match=r"capts.json is not valid JSON: line 4 column 1"):
        read_key_values(path)


def test_a_json_array_file_is_fatal_naming_the_expected_shape(tmp_path):
    with pytest.raises(SourceError, match="holds a JSON list; expected an object"):
        read_key_values(write(tmp_path / "c.json", "[1, 2]"))


def test_missing_side_file_names_the_flags(tmp_path):
    with pytest.raises(SourceError, match="--captions/--safeboxes/--px-scales"):
        read_key_values(tmp_path / "nope.json")


def test_unknown_ambiguous_and_twice_listed_keys_are_reported(tmp_path, index):
    path = write(tmp_path / "capts.json", json.dumps(
        {"nope": "c0", "a_b": "c1", "signs/street/0001": "c2", "signs_street_0001": "c3", "top": "c4"}))
    values, problems, skip = resolve_side_file(path, index, parse_captions)
    assert values == {"top.webp": ["c4"]}
    assert [(p.kind, p.key) for p in problems] == [("unknown_key", "nope"), ("ambiguous_key", "a_b"),
                                                   ("listed_twice", "signs_street_0001")]
    assert "a/b.png, a_b.png" in problems[1].reason
    assert skip == {"signs/street/0001.jpg"}


def test_the_same_key_written_twice_in_one_object_is_listed_twice(tmp_path, index):
    path = write(tmp_path / "capts.json", '{"top": "first", "top": "second"}')
    values, problems, skip = resolve_side_file(path, index, parse_captions)
    assert values == {} and skip == {"top.webp"} and problems[0].kind == "listed_twice"


def test_bad_values_skip_the_image_with_their_kind(tmp_path, index):
    path = write(tmp_path / "boxes.json", json.dumps({"top": [10, 0, 5, 8], "x.jpg": "wide", "x.png": [0, 0, 4, 4]}))
    values, problems, skip = resolve_side_file(path, index, parse_safebox, "bad_safebox")
    assert values == {"x.png": [0, 0, 4, 4]}
    assert [p.kind for p in problems] == ["bad_safebox", "bad_safebox"]
    assert "inverted" in problems[0].reason and "not a list of 4 finite numbers" in problems[1].reason
    assert skip == {"top.webp", "x.jpg"}


@pytest.mark.parametrize("value, ok", [("one", True), (["a", "b"], True), ([], True), (3, False), (["a", 1], False)])
def test_caption_values(value, ok):
    if ok:
        assert parse_captions(value) == ([value] if isinstance(value, str) else value)
    else:
        with pytest.raises(ValueError, match="not a string or a list of strings"):
            parse_captions(value)


def test_px_scale_values_must_be_two_positive_numbers():
    assert parse_px_scale([2, 1.5]) == [2, 1.5]
    for bad in ([0, 1], [1], [1, "2"], [1, float("nan")], [True, 1]):
        with pytest.raises(ValueError):
            parse_px_scale(bad)


def test_safebox_null_means_no_box():
    assert parse_safebox(None) is None


def test_a_bare_file_name_shared_by_two_folders_is_ambiguous():
    index = KeyIndex(["day/0001.jpg", "night/0001.jpg"])
    assert index.resolve("0001") == ["day/0001.jpg", "night/0001.jpg"]
    assert index.resolve("night/0001") == ["night/0001.jpg"]
