"""Prompt files (JSONL) and pairing image folders with prompts."""

import json

import pytest
from PIL import Image

from textdiff.eval.prompts import Prompt, PromptFileError, pair_images, read_prompts


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_prompts_fills_defaults_and_skips_blank_lines(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", ['{"txt": "hello", "capt": "a sign", "seed": 3, "count": 2}', "",
                                           '{"txt": ""}'])
    assert read_prompts(f) == [Prompt("hello", "a sign", 3, 2), Prompt("", "", 0, 1)]


def test_read_prompts_ignores_extra_keys_and_keeps_the_image_name(tmp_path):
    f = write_lines(tmp_path / "s.jsonl", [json.dumps({"txt": "a", "image": "0001.png", "steps": 50})])
    assert read_prompts(f)[0].image == "0001.png"


@pytest.mark.parametrize("line, message", [
    ('{"capt": "x"}', "p.jsonl:2: missing key 'txt'"),
    ('{"txt": "a", "count": 0}', "p.jsonl:2: key 'count' is 0"),
    ('{"txt": "a", "seed": "7"}', "p.jsonl:2: key 'seed' is '7'; expected an integer"),
    ('{"txt": 5}', "p.jsonl:2: key 'txt' is 5; expected a string"),
    ('{"txt": "a"', "p.jsonl:2: not valid JSON"),
    ('["a"]', "p.jsonl:2: expected a JSON object"),
])
def test_bad_prompt_lines_are_named_by_file_and_line(tmp_path, line, message):
    f = write_lines(tmp_path / "p.jsonl", ['{"txt": "ok"}', line])
    with pytest.raises(PromptFileError, match=message.replace("(", r"\(")):
        read_prompts(f)


def test_empty_or_missing_prompt_file_is_an_error(tmp_path):
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompts(write_lines(tmp_path / "e.jsonl", [""]))
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "nope.jsonl")


def make_images(folder, names):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8)).save(folder / name)


def test_pair_images_by_sorted_name_expands_counts(tmp_path):
    make_images(tmp_path / "img", ["b.png", "a.png", "c.png"])
    prompts = [Prompt("x", count=2), Prompt("y")]
    pairs = pair_images(prompts, tmp_path / "img")
    assert [(path.name, p.txt) for path, p in pairs] == [("a.png", "x"), ("b.png", "x"), ("c.png", "y")]


def test_pair_images_with_a_count_mismatch_names_both_numbers(tmp_path):
    make_images(tmp_path / "img", ["a.png", "b.png"])
    with pytest.raises(PromptFileError, match="holds 2 images but the prompts ask for 3"):
        pair_images([Prompt("x", count=3)], tmp_path / "img")


def test_pair_images_by_image_key_reports_missing_files(tmp_path):
    make_images(tmp_path / "img", ["s0.png"])
    pairs = pair_images([Prompt("x", image="s0.png")], tmp_path / "img")
    assert pairs[0][0] == tmp_path / "img" / "s0.png"
    with pytest.raises(PromptFileError, match="1 image files named in the prompt file are missing"):
        pair_images([Prompt("x", image="s0.png"), Prompt("y", image="s1.png")], tmp_path / "img")
