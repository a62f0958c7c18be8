"""The eval section of the config tree: defaults are the measured OCR settings, bad values name their key."""

import pytest

from textdiff.config import ConfigError, EvalConfig, apply_overrides, config_from_dict


def test_defaults_are_the_measured_ocr_settings():
    cfg = EvalConfig()
    assert (cfg.psm, cfg.ocr_height, cfg.ocr_binarize, cfg.normalize) == (7, 192, True, True)
    assert (cfg.false_text_min_chars, cfg.false_text_min_conf) == (2, 50.0)


@pytest.mark.parametrize("override, key", [
    ("eval.psm=14", "eval.psm"),
    ("eval.ocr_height=8", "eval.ocr_height"),
    ("eval.every=-1", "eval.every"),
    ("eval.false_text_min_conf=101", "eval.false_text_min_conf"),
    ("eval.false_text_min_chars=0", "eval.false_text_min_chars"),
])
def test_impossible_values_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        config_from_dict(apply_overrides({}, [override]))


def test_overrides_reach_the_eval_section():
    cfg = config_from_dict(apply_overrides({}, ["eval.tesseract_cmd=/opt/tess/bin/tesseract", "eval.every=200"]))
    assert (cfg.eval.tesseract_cmd, cfg.eval.every) == ("/opt/tess/bin/tesseract", 200)
