"""tools/eval_text.py: the command line over image folders, prompt files and the synthetic renders."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from textdiff.ocr import OcrLine, base, reading_of_lines, register_engine

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "eval_text.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("eval_text", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_word(path: Path, text: str) -> None:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(image).text((3, 26), text, fill=(0, 0, 0), font=ImageFont.load_default(size=12))
    image.save(path)


@pytest.mark.slow
def test_images_and_prompt_file_give_one_json_object(tmp_path):
    (tmp_path / "img").mkdir()
    for i, word in enumerate(["glacier", "glacier", "mosaic", ""]):
        save_word(tmp_path / "img" / f"{i:03d}.png", word)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"txt": "glacier", "count": 2}\n{"txt": "mosaik"}\n{"txt": ""}\n', encoding="utf-8")
    out = subprocess.run([sys.executable, str(TOOL), "--images", str(tmp_path / "img"), "--prompts", str(prompts),
                          "--json", "--report", str(tmp_path / "r" / "report.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    # "mosaic" read against target "mosaik": 1 edit over 7 + 7 + 6 = 20 characters
    assert summary["cer"] == 1 / 20
    assert (summary["exact_match"], summary["word_accuracy"]) == (2 / 3, 2 / 3)
    assert (summary["false_text_rate"], summary["n"], summary["normalize"]) == (0.0, 4, True)
    # NED: (1 + 1 + 5/6) / 3 lines; one line of three and one image of three wrong by every other rule
    assert summary["ned"] == pytest.approx(17 / 18)
    assert [summary[k] for k in ("sentence_accuracy", "mario_word_accuracy", "mario_precision", "mario_recall",
                                 "mario_f_measure")] == pytest.approx([2 / 3] * 5)
    assert summary["engine"] == "tesseract" and summary["engine_version"].startswith("tesseract 5")
    # the engine on 64 px renders of glacier, glacier, mosaik and "": what the images are measured against
    ceiling = summary["ceiling"]
    assert (ceiling["n"], ceiling["n_text"], ceiling["n_empty"]) == (4, 3, 1) and ceiling["cer"] <= 0.15
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["prompts"]
    assert [r["readings"] for r in rows[:2]] == [["glacier", "glacier"], ["mosaic"]]
    assert rows[2]["false_text_rate"] == 0.0


def test_images_without_prompts_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    assert load_tool().main(["--images", str(tmp_path / "img")]) == 2
    assert "--images needs --prompts" in capsys.readouterr().err


def test_missing_tesseract_exits_with_the_install_hint(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    save_word(tmp_path / "img" / "a.png", "x")
    (tmp_path / "p.jsonl").write_text('{"txt": "x"}\n', encoding="utf-8")
    code = load_tool().main(["--images", str(tmp_path / "img"), "--prompts", str(tmp_path / "p.jsonl"),
                             "--tesseract", "no-such-tesseract-binary"])
    assert code == 2
    assert "install the tesseract-ocr package" in capsys.readouterr().err


def test_renders_prints_the_ceiling_metrics_for_n_heldout_prompts(capsys):
    assert load_tool().main(["--renders", "10", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) >= {"cer", "exact_match", "word_accuracy", "false_text_rate", "n", "ned", "sentence_accuracy",
                            "mario_word_accuracy", "mario_f_measure", "engine"}
    assert (summary["n"], summary["n_text"], summary["n_empty"]) == (10, 8, 2)
    assert summary["cer"] < 0.2 and summary["false_text_rate"] <= 0.5
    assert "ceiling" not in summary  # the renders' figures are the ceiling themselves


def test_renders_of_a_prompt_file_take_its_first_n_images(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"txt": "Otter", "count": 2}\n{"txt": "walnut"}\n', encoding="utf-8")
    assert load_tool().main(["--renders", "2", "--prompts", str(tmp_path / "p.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "normalize case/whitespace: True" in out and "n_text: 2" in out


def test_renders_must_be_positive(capsys):
    assert load_tool().main(["--renders", "0"]) == 2
    assert "--renders is 0" in capsys.readouterr().err


class FirstPixelEngine:
    """Reads an image whose pixels are all i as ``TEXTS[i]``."""

    name = "firstpixel"
    TEXTS = {0: "glacier", 40: "mosaic"}

    def version(self):
        return "firstpixel 1"

    def read(self, images, workers=1, progress=True):
        texts = [self.TEXTS.get(int(np.asarray(im)[0, 0, 0]), "") for im in images]
        return [reading_of_lines([OcrLine(t, ((0, 0), (1, 0), (1, 1), (0, 1)), 0.9)] if t else []) for t in texts]


def test_engine_flag_reads_with_a_registered_engine_and_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(base, "_ENGINES", dict(base._ENGINES))
    register_engine("firstpixel", FirstPixelEngine)
    (tmp_path / "img").mkdir()
    for i, level in enumerate([0, 40]):
        Image.new("RGB", (64, 64), (level, level, level)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "p.jsonl").write_text('{"txt": "glacier"}\n{"txt": "mosaik"}\n', encoding="utf-8")
    assert load_tool().main(["--images", str(tmp_path / "img"), "--prompts", str(tmp_path / "p.jsonl"),
                             "--engine", "firstpixel", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["engine"], summary["engine_version"]) == ("firstpixel", "firstpixel 1")
    assert summary["cer"] == 1 / 13 and summary["exact_match"] == 0.5  # "mosaic" for "mosaik": 1 edit of 7 + 6
    # the renders of the prompts are not flat images: this engine reads nothing there (CER 1)
    assert summary["ceiling"]["cer"] == 1.0


def test_an_unknown_engine_names_the_key_and_the_choices(tmp_path, capsys):
    assert load_tool().main(["--renders", "2", "--engine", "easyocr"]) == 2
    assert "eval.ocr_engine (--engine) is 'easyocr'; the OCR engines are ppocr, tesseract" in capsys.readouterr().err


def test_tesseract_flags_with_another_engine_are_an_error(capsys):
    assert load_tool().main(["--renders", "2", "--engine", "ppocr", "--psm", "6", "--no-binarize"]) == 2
    assert "--psm, --binarize set Tesseract, which --engine ppocr does not use" in capsys.readouterr().err


def test_ppocr_reads_the_renders_and_names_itself(capsys):
    assert load_tool().main(["--renders", "5", "--engine", "ppocr", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["engine"] == "ppocr" and summary["engine_version"].startswith("rapidocr-onnxruntime")
    assert (summary["n"], summary["n_text"]) == (5, 4)
