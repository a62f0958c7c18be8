"""The evaluator on images whose truth is known: the synthetic generator's own renders (the OCR ceiling),
pure noise, and text-free renders. Thresholds hold a margin over docs/eval.md's measurements on 600 renders
at 64 px (CER 0.029, exact match 0.925, false text 0.025)."""

import random

import numpy as np
import pytest

from textdiff.config import EvalConfig
from textdiff.data.synthetic import HELDOUT_WORDS, TRAIN_WORDS, render_sample
from textdiff.eval.prompts import heldout_prompts, render_prompts
from textdiff.sampling.prompts import Prompt
from textdiff.eval.spelling import evaluate_images


@pytest.fixture(scope="module")
def renders():
    prompts = [p for p in heldout_prompts(40, seed=0, size=64) if p.txt]
    return prompts, render_prompts(prompts, 64)


def test_cer_on_the_generators_own_renders_is_below_the_ocr_ceiling(renders):
    prompts, images = renders
    m = evaluate_images(images, prompts, EvalConfig(), workers=2, progress=False).metrics
    assert m["n_text"] == 32
    assert m["cer"] < 0.12
    assert m["exact_match"] >= 0.8


def test_cer_on_noise_images_is_near_one(renders):
    prompts, _ = renders
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(12)]
    m = evaluate_images(noise, prompts[:12], EvalConfig(), workers=2, progress=False).metrics
    assert m["cer"] >= 0.9
    assert m["exact_match"] == 0.0


def test_false_text_rate_on_text_free_renders_is_low():
    images = [render_sample("", random.Random(f"text-free-{i}"), 64).image for i in range(24)]
    m = evaluate_images(images, [Prompt("")] * 24, EvalConfig(), workers=2, progress=False).metrics
    assert m["n_empty"] == 24
    assert m["false_text_rate"] <= 0.125  # at most 3 of 24


def test_heldout_prompts_use_only_heldout_words_with_every_fifth_text_free():
    prompts = heldout_prompts(50, seed=0, size=64)
    assert [i for i, p in enumerate(prompts) if not p.txt] == list(range(4, 50, 5))
    words = {w.lower() for p in prompts for w in p.txt.split()}
    assert words <= set(HELDOUT_WORDS) and not words & set(TRAIN_WORDS)


def test_heldout_prompts_are_deterministic_and_captioned_from_their_render():
    first, again = heldout_prompts(6, seed=3), heldout_prompts(6, seed=3)
    assert first == again and first != heldout_prompts(6, seed=4)
    assert f'"{first[0].txt}"' in first[0].capt and first[4].capt.endswith("no text")
    a, b = render_prompts(first[:2], 64), render_prompts(first[:2], 64)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b] and a[0].size == (64, 64)
