"""The eval section of the config tree: defaults are the measured OCR settings, bad values name their key."""

import pytest

from textdiff.config import ConfigError, EvalConfig, apply_overrides, config_from_dict


def test_defaults_are_the_measured_ocr_settings():
    cfg = EvalConfig()
    assert (cfg.ocr_engine, cfg.psm, cfg.ocr_height, cfg.ocr_binarize) == ("tesseract", 7, 192, True)
    assert cfg.normalize is True
    assert (cfg.false_text_min_chars, cfg.false_text_min_conf) == (2, 50.0)


@pytest.mark.parametrize("override, key", [
    ("eval.psm=14", "eval.psm"),
    ("eval.ocr_height=8", "eval.ocr_height"),
    ("eval.every=-1", "eval.every"),
    ("eval.false_text_min_conf=101", "eval.false_text_min_conf"),
    ("eval.false_text_min_chars=0", "eval.false_text_min_chars"),
    ('eval.ocr_engine=""', "eval.ocr_engine"),
    ('eval.ocr_engine="pp ocr"', "eval.ocr_engine"),
])
def test_impossible_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(apply_overrides({}, [override]))


def test_overrides_reach_the_eval_section():
    cfg = config_from_dict(apply_overrides({}, ["eval.tesseract_cmd=/opt/tess/bin/tesseract", "eval.every=200"]))
    assert (cfg.eval.tesseract_cmd, cfg.eval.every) == ("/opt/tess/bin/tesseract", 200)


def test_the_ocr_engine_is_chosen_by_name_and_an_unknown_one_named_by_its_key_when_built():
    """The registry of engines lives a floor above the config (textdiff.ocr), so the name is checked where the
    engine is built from the eval section, before any work (textdiff.eval.spelling.check_ocr_engine)."""
    from textdiff.eval.spelling import check_ocr_engine

    assert config_from_dict(apply_overrides({}, ["eval.ocr_engine=ppocr"])).eval.ocr_engine == "ppocr"
    cfg = config_from_dict(apply_overrides({}, ["eval.ocr_engine=easyocr"]))
    with pytest.raises(ConfigError, match=r"eval.ocr_engine \(--engine\) is 'easyocr'; the OCR engines are ppocr, "
                                          r"tesseract"):
        check_ocr_engine(cfg.eval)
