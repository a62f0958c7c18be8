"""The OCR engine registry and what every engine returns; a fake engine registered here is used through the
spelling evaluation as any engine would be."""

import importlib.util

import numpy as np
import pytest

from textdiff.config import ConfigError, EvalConfig
from textdiff.eval.spelling import (check_ocr_engine, engine_settings, evaluate_images, evaluate_spelling,
                                    installed_engines, ocr_engine)
from textdiff.ocr import (OcrLine, OcrMissingError, Reading, TesseractEngine, base, check_engine, engine_names,
                          make_engine, reading_of_lines, register_engine)
from textdiff.sampling.prompts import Prompt

SQUARE = ((0.0, 0.0), (8.0, 0.0), (8.0, 8.0), (0.0, 8.0))
PPOCR_WRITTEN = importlib.util.find_spec("textdiff.ocr.ppocr") is not None


class FakeEngine:
    """Reads image i (every pixel = i) as ``texts[i]``, one line at confidence 0.9."""

    name = "fake"

    def __init__(self, texts=("",)):
        self.texts = texts

    def version(self) -> str:
        return "fake 1.0"

    def read(self, images, workers=1, progress=True):
        texts = [self.texts[int(np.asarray(image)[0, 0, 0])] for image in images]
        return [reading_of_lines([OcrLine(t, SQUARE, 0.9)] if t else []) for t in texts]


def image(i: int) -> np.ndarray:
    return np.full((8, 8, 3), i, np.uint8)


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))


def test_textdiff_registers_tesseract_and_ppocr():
    assert {"ppocr", "tesseract"} <= set(engine_names())
    assert isinstance(make_engine("tesseract"), TesseractEngine)


def test_an_unknown_engine_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"'easyocr' is unknown; choose one of .*ppocr, tesseract"):
        make_engine("easyocr")
    with pytest.raises(ValueError, match="register_engine"):
        check_engine("easyocr")


def test_a_registered_engine_is_built_with_its_settings_and_listed(registry):
    register_engine("fake", FakeEngine)
    engine = make_engine("fake", texts=("a", "b"))
    assert engine.texts == ("a", "b") and "fake" in engine_names()
    check_engine("fake")  # registered without a check: passes


def test_a_check_says_what_to_install_without_building_the_engine(registry):
    built = []

    def missing(**settings):
        raise OcrMissingError(f"install fakeocr (asked with {settings})")

    register_engine("fake", lambda **s: built.append(s), missing)
    with pytest.raises(OcrMissingError, match=r"install fakeocr \(asked with \{'lang': 'de'\}\)"):
        check_engine("fake", lang="de")
    assert built == []


def test_the_ppocr_check_names_the_rapidocr_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    needs = r"rapidocr_onnxruntime and cv2: pip install -e .*rapidocr-onnxruntime"
    with pytest.raises(OcrMissingError, match=needs) as err:
        check_engine("ppocr")
    assert "eval.ocr_engine" in str(err.value)


def test_reading_of_lines_joins_lines_and_gives_words_their_line_confidence():
    reading = reading_of_lines([OcrLine("big cat", SQUARE, 0.9), OcrLine("sat", SQUARE, 0.5)])
    assert reading.text == "big cat\nsat"
    assert reading.words == (("big", 90.0), ("cat", 90.0), ("sat", 50.0))
    assert [line.text for line in reading.lines] == ["big cat", "sat"]
    assert reading_of_lines([]) == Reading("")


def test_a_line_box_encloses_its_turned_polygon():
    line = OcrLine("tilted", ((10.0, 12.0), (50.0, 8.0), (51.0, 20.0), (11.0, 24.0)), 0.8)
    assert line.box == (10.0, 8.0, 51.0, 24.0)


# --- through the spelling evaluation ----------------------------------------------------------------------


def test_a_registered_engine_reads_for_the_spelling_evaluation(registry):
    register_engine("fake", lambda: FakeEngine(("ember", "embar", "", "ox")))
    prompts = [Prompt("ember"), Prompt("ember"), Prompt(""), Prompt("")]
    report = evaluate_images([image(0), image(1), image(2), image(3)], prompts, EvalConfig(ocr_engine="fake"),
                             progress=False)
    # "embar" for "ember": 1 edit of 10 characters; "ox" on a text-free prompt is text (2 letters, conf 90)
    m = report.metrics
    assert (m["cer"], m["exact_match"], m["false_text_rate"]) == (0.1, 0.5, 0.5)
    assert m["ned"] == pytest.approx((1 + 4 / 5) / 2) and m["mario_word_accuracy"] == 0.5
    assert (report.engine, report.engine_version) == ("fake", "fake 1.0")
    assert report.to_dict()["engine"] == "fake"


def test_the_training_hook_reads_with_the_engine_of_the_eval_section(registry):
    register_engine("fake", lambda: FakeEngine(("zq",)))
    metrics = evaluate_spelling(lambda txts, capts, seed: np.stack([image(0)] * len(txts)),
                                [Prompt("ab", count=2)], EvalConfig(ocr_engine="fake"))
    # "zq" for "ab": 2 substitutions per image
    assert (metrics["cer"], metrics["exact_match"], metrics["n"]) == (1.0, 0.0, 2)


def test_the_eval_section_names_an_unknown_engine_by_its_key():
    with pytest.raises(ConfigError, match=r"eval.ocr_engine \(--engine\) is 'easyocr'"):
        ocr_engine(EvalConfig(ocr_engine="easyocr"))
    with pytest.raises(ConfigError, match="eval.ocr_engine"):
        check_ocr_engine(EvalConfig(), "easyocr")


def test_the_eval_section_gives_tesseract_its_keys_and_other_engines_none():
    cfg = EvalConfig(psm=6, whitelist="0123456789", ocr_glyph_height=40)
    engine = ocr_engine(cfg)
    assert (engine.psm, engine.whitelist, engine.ocr_glyph_height, engine.ocr_retry_psm) == (6, "0123456789", 40, 0)
    assert engine_settings(cfg, "ppocr") == {}


def test_installed_engines_put_the_eval_sections_first_and_leave_out_the_missing(registry, monkeypatch):
    def missing(**settings):
        raise OcrMissingError("install fakeocr")

    register_engine("fake", FakeEngine)
    register_engine("absent", FakeEngine, missing)
    names = installed_engines(EvalConfig(ocr_engine="fake"))
    assert names[0] == "fake" and "absent" not in names and "tesseract" in names
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(base, "_ENGINES", {k: v for k, v in base._ENGINES.items() if k in ("tesseract", "absent")})
    with pytest.raises(OcrMissingError, match="no OCR engine can run here: .*tesseract-ocr.*install fakeocr"):
        installed_engines(EvalConfig())


@pytest.mark.skipif(not PPOCR_WRITTEN, reason="textdiff/ocr/ppocr.py is being written; this runs once it exists")
def test_ppocr_is_built_lazily_by_name_and_reads_for_the_spelling_evaluation():
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (128, 64), (240, 240, 240))
    ImageDraw.Draw(canvas).text((8, 20), "lantern", fill=(10, 10, 10), font=ImageFont.load_default(size=20))
    cfg = EvalConfig(ocr_engine="ppocr")
    check_ocr_engine(cfg)
    engine = ocr_engine(cfg)
    assert engine.name == "ppocr" and engine.version()
    report = evaluate_images([canvas], [Prompt("lantern")], cfg, progress=False, engine=engine)
    assert report.metrics["exact_match"] == 1.0 and report.engine == "ppocr"
    (line,) = engine.read([canvas], progress=False)[0].lines
    assert line.text == "lantern" and 0.5 <= line.confidence <= 1.0
