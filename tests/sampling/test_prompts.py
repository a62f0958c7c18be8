"""Prompt files (JSONL): defaults, extra keys, errors named by file and line."""

import json

import pytest

from textdiff.sampling.prompts import Prompt, PromptFileError, read_prompts


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
