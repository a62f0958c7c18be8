"""Specification of the synthetic demo set (textdiff/data/synthetic.py)."""

from __future__ import annotations

import dataclasses
import random
import shutil

import numpy as np
import pytest

from textdiff.data.synthetic import (HELDOUT_WORDS, TRAIN_WORDS, draw_scene, flat_background, paint,
                                     random_transcription, render_sample, synthetic_sample, synthetic_text,
                                     text_fits, with_background)


def ink_of_text_alone(scene) -> np.ndarray:
    """[H, W] bool: pixels the scene's text covers when drawn black on a white canvas."""
    alone = dataclasses.replace(with_background(scene, flat_background((255, 255, 255))), text_colour=(0, 0, 0))
    image, _ = paint(alone)
    return (np.asarray(image) != 255).any(axis=2)


def scenes_with_text(count: int, size: int = 64):
    for i in range(count):
        rng = random.Random(f"scene-{i}")
        yield draw_scene(random_transcription(rng, TRAIN_WORDS, size), rng, size)


def test_vocabularies_are_disjoint_and_large():
    assert len(set(TRAIN_WORDS)) == len(TRAIN_WORDS) >= 350
    assert len(set(HELDOUT_WORDS)) == len(HELDOUT_WORDS) >= 100
    assert set(TRAIN_WORDS).isdisjoint(HELDOUT_WORDS)


def test_every_word_fits_a_64px_image():
    assert all(text_fits(w.upper(), 64) for w in TRAIN_WORDS + HELDOUT_WORDS)


def test_safebox_encloses_every_ink_pixel_of_the_text_drawn_alone_and_is_tight_within_2px():
    for scene in scenes_with_text(60):
        _, box = paint(scene)
        ink = ink_of_text_alone(scene)
        ys, xs = np.nonzero(ink)
        assert len(xs) > 20
        assert xs.min() >= box[0] and ys.min() >= box[1] and xs.max() < box[2] and ys.max() < box[3], scene.text
        tight = [xs.min() - box[0], ys.min() - box[1], box[2] - 1 - xs.max(), box[3] - 1 - ys.max()]
        assert max(tight) <= 2, (scene.text, box, tight)


def test_image_differs_from_its_background_only_inside_the_safebox():
    for scene in scenes_with_text(40):
        image, box = paint(scene)
        background, _ = paint(dataclasses.replace(scene, text=""))
        changed = (np.asarray(image) != np.asarray(background)).any(axis=2)
        outside = changed.copy()
        outside[box[1]:box[3], box[0]:box[2]] = False
        assert changed.sum() > 20 and not outside.any(), scene.text


def test_enlarged_images_have_px_scale_above_1_and_exact_safeboxes():
    enlarged = [s for s in scenes_with_text(80) if s.drawn_size != s.size]
    assert len(enlarged) >= 8
    for scene in enlarged[:8]:
        _, box = paint(scene)
        ys, xs = np.nonzero(ink_of_text_alone(scene))
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box
    seed = next(i for i in range(200) if draw_scene("lamp", random.Random(i), 64).drawn_size == 51)
    assert render_sample("lamp", random.Random(seed), 64).px_scale == [64 / 51, 64 / 51]


def test_render_sample_gives_rgb_image_of_the_requested_size_with_captions():
    sample = render_sample("harbor", random.Random(5), 96)
    assert sample.image.mode == "RGB" and sample.image.size == (96, 96)
    assert sample.text == "harbor"
    assert '"harbor"' in sample.captions[0] and len(sample.captions) == 2
    assert 0 <= sample.safebox[0] < sample.safebox[2] <= 96 and 0 <= sample.safebox[1] < sample.safebox[3] <= 96


def test_text_free_image_has_no_safebox_and_says_no_text():
    sample = render_sample("", random.Random(1), 64)
    assert sample.safebox is None and sample.text == ""
    assert sample.captions[0].endswith("no text")


def test_captions_name_the_text_colour():
    for i in range(20):
        rng = random.Random(i)
        scene = draw_scene("wolf", rng, 64)
        sample = render_sample("wolf", random.Random(i), 64)
        assert f"{scene.text_colour_name} text on" in sample.captions[1]


def test_same_seed_and_index_give_identical_images_and_other_seeds_differ():
    a, b = synthetic_sample(7, seed=3), synthetic_sample(7, seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.captions == b.captions and a.safebox == b.safebox
    others = [synthetic_sample(7, seed=s).image.tobytes() for s in (4, 5)]
    assert a.image.tobytes() not in others


def test_about_20_percent_of_the_demo_set_is_text_free():
    texts = [synthetic_text(i, seed=0)[0] for i in range(1000)]
    share = sum(t == "" for t in texts) / len(texts)
    assert 0.17 <= share <= 0.23


def test_demo_set_words_come_from_train_words_only():
    words = {w.lower() for i in range(300) for w in synthetic_text(i, seed=1)[0].split()}
    assert len(words) > 100
    assert words <= set(TRAIN_WORDS)


def test_text_that_cannot_fit_raises_naming_the_size():
    with pytest.raises(ValueError, match="does not fit a 32 px"):
        draw_scene("a rather long sentence", random.Random(0), 32)


@pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract not installed")
def test_tesseract_reads_most_held_out_renders_at_64px():
    from textdiff.ocr import TesseractEngine

    samples = []
    for i in range(24):
        rng = random.Random(f"legible-{i}")
        samples.append(render_sample(random_transcription(rng, HELDOUT_WORDS, 64), rng, 64))
    reads = TesseractEngine().read([s.image for s in samples], workers=2, progress=False)
    exact = sum(r.text.strip().lower() == s.text.lower() for r, s in zip(reads, samples))
    assert exact >= 18, [(r.text, s.text) for r, s in zip(reads, samples)]
