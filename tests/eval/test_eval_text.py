"""tools/eval_text.py: the command line over image folders, prompt files and the synthetic renders."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

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
    assert set(summary) >= {"cer", "exact_match", "word_accuracy", "false_text_rate", "n"}
    assert (summary["n"], summary["n_text"], summary["n_empty"]) == (10, 8, 2)
    assert summary["cer"] < 0.2 and summary["false_text_rate"] <= 0.5


def test_renders_of_a_prompt_file_take_its_first_n_images(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"txt": "Otter", "count": 2}\n{"txt": "walnut"}\n', encoding="utf-8")
    assert load_tool().main(["--renders", "2", "--prompts", str(tmp_path / "p.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "normalize case/whitespace: True" in out and "n_text: 2" in out


def test_renders_must_be_positive(capsys):
    assert load_tool().main(["--renders", "0"]) == 2
    assert "--renders is 0" in capsys.readouterr().err
