"""Pairing image folders with prompts."""

import pytest
from PIL import Image

from textdiff.eval.prompts import pair_images
from textdiff.sampling.prompts import Prompt, PromptFileError


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
