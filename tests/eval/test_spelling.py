"""Spelling evaluation of images and the training-time hook, with stand-in samplers that draw text with PIL."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from textdiff.config import EvalConfig
from textdiff.sampling.prompts import Prompt, expand
from textdiff.eval.spelling import ceiling_report, evaluate_images, evaluate_spelling, sample_prompts


def draw(text: str) -> np.ndarray:
    image = Image.new("RGB", (64, 64), (235, 235, 225))
    ImageDraw.Draw(image).text((3, 26), text, fill=(10, 10, 10), font=ImageFont.load_default(size=12))
    return np.asarray(image)


def perfect_sampler(txts, capts, seed):
    return np.stack([draw(t) for t in txts])


PROMPTS = [Prompt("ember", count=2), Prompt("falcon"), Prompt("", count=2)]


def test_a_sampler_that_writes_the_prompt_scores_perfectly():
    m = evaluate_spelling(perfect_sampler, PROMPTS, EvalConfig())
    assert (m["cer"], m["exact_match"], m["word_accuracy"], m["false_text_rate"]) == (0.0, 1.0, 1.0, 0.0)
    assert (m["ned"], m["sentence_accuracy"], m["mario_word_accuracy"], m["mario_f_measure"]) == (1.0, 1.0, 1.0, 1.0)
    assert (m["n"], m["n_text"], m["n_empty"]) == (5, 3, 2)


def test_a_sampler_that_writes_the_wrong_word_everywhere_scores_badly():
    def wrong(txts, capts, seed):
        return [Image.fromarray(draw("zq")) for _ in txts]
    m = evaluate_spelling(wrong, PROMPTS, EvalConfig())
    # "zq" vs "ember" (x2) and "falcon": 5 + 5 + 6 edits over 16 characters; "zq" on text-free prompts is text
    assert m["cer"] == pytest.approx(16 / 16)
    assert (m["exact_match"], m["false_text_rate"]) == (0.0, 1.0)


def test_hook_leaves_out_rates_with_nothing_to_measure():
    m = evaluate_spelling(perfect_sampler, [Prompt("ember")], EvalConfig())
    assert "false_text_rate" not in m and m["cer"] == 0.0


def test_sample_prompts_calls_the_sampler_once_per_seed_and_chunk():
    calls = []

    def record(txts, capts, seed):
        calls.append((list(txts), list(capts), seed))
        return np.zeros((len(txts), 4, 4, 3), np.uint8)

    prompts = [Prompt("a", "c1", seed=1, count=3), Prompt("b", seed=2), Prompt("d", seed=1)]
    images = sample_prompts(record, prompts, batch_size=2)
    assert len(images) == 5
    assert calls == [(["a", "a"], ["c1", "c1"], 1), (["a", "d"], ["c1", ""], 1), (["b"], [""], 2)]


def test_sampler_returning_the_wrong_number_of_images_is_an_error():
    with pytest.raises(ValueError, match="returned 1 images for 2 prompts"):
        sample_prompts(lambda t, c, s: np.zeros((1, 4, 4, 3), np.uint8), [Prompt("a", count=2)])


def test_report_has_one_row_per_prompt_with_its_readings():
    prompts = expand([Prompt("ember", count=2), Prompt("")])
    report = evaluate_images([draw("ember"), draw("embar"), draw("")], prompts, EvalConfig(), progress=False)
    rows = report.to_dict()["prompts"]
    # "embar" for "ember": 1 edit of 10 characters, NED (1 + 4/5) / 2, and one of two images right by every rule
    assert rows[0] == {"txt": "ember", "capt": "", "n": 2, "cer": pytest.approx(0.1), "exact_match": 0.5,
                       "word_accuracy": 0.5, "ned": pytest.approx(0.9), "sentence_accuracy": 0.5,
                       "mario_word_accuracy": 0.5, "mario_precision": 0.5, "mario_recall": 0.5,
                       "mario_f_measure": 0.5, "readings": ["ember", "embar"]}
    assert rows[1]["false_text_rate"] == 0.0 and "cer" not in rows[1]
    out = report.to_dict()
    assert out["normalize"] is True
    assert out["engine"] == "tesseract" and out["engine_version"].startswith("tesseract 5")


def test_the_ceiling_reads_renders_of_the_same_prompts_with_the_same_engine():
    prompts = expand([Prompt("ember", count=2), Prompt("")])
    report = ceiling_report(prompts, 64, EvalConfig())
    m = report.metrics
    assert (m["n"], m["n_text"], m["n_empty"], report.engine) == (3, 2, 1, "tesseract")
    assert m["cer"] == 0.0 and m["false_text_rate"] == 0.0  # the generator's own renders of "ember" read right


def test_normalisation_setting_decides_whether_case_counts():
    prompts = [Prompt("Ember")]
    on = evaluate_images([draw("EMBER")], prompts, EvalConfig(normalize=True), progress=False)
    off = evaluate_images([draw("EMBER")], prompts, EvalConfig(normalize=False), progress=False)
    assert (on.metrics["cer"], off.metrics["cer"]) == (0.0, pytest.approx(4 / 5))
