"""Specification of the annotation benchmark (textdiff/experiments/annotation.py, tools/bench_annotate.py): its
metrics on hand-made examples with exact numbers, and a whole run on a tiny hand-made ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from textdiff.experiments.annotation import (BenchmarkError, box_iou, cer, exact_lines, goal_misses, markdown_table,
                                             run_benchmark, score)
from textdiff.ocr import OcrLine, Reading, reading_of_lines, register_engine, to_pil

REPO = Path(__file__).resolve().parents[2]


def test_cer_is_edit_distance_over_the_truths_length():
    assert cer("HELLO", "HELLO") == 0.0
    assert cer("HELL0 W0RLD", "HELLO WORLD") == pytest.approx(2 / 11)
    assert cer("", "OPEN") == 1.0  # a miss
    assert cer("OPEN\nDAILY", "OPEN DAILY") == pytest.approx(1 / 10)  # a line break where a space was


def test_exact_lines_counts_each_true_line_read_exactly_once():
    assert exact_lines("OPEN\nDAILY", "DAILY\nOPEN") == 2  # order does not count
    assert exact_lines("OPEN\nOPEN", "OPEN\nDAILY") == 1
    assert exact_lines("OPEN DAILY", "OPEN\nDAILY") == 0
    assert exact_lines("", "") == 0


def test_box_iou_of_hand_made_boxes():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou(None, [0, 0, 1, 1]) == 0.0


def test_score_of_a_hand_made_annotation():
    truth = {"a": "OPEN\nDAILY", "b": "EXIT", "c": "", "d": "", "e": "SALE"}
    boxes = {"a": [0, 0, 10, 10], "b": [0, 0, 20, 10], "e": [0, 0, 4, 4]}
    annotated = {
        "a": {"transcription": "OPEN\nDAILY", "safebox": [0, 0, 10, 10]},  # exact: cer 0, iou 1
        "b": {"transcription": "", "safebox": None},  # a miss: cer 1, iou 0
        "c": {"transcription": "", "safebox": None},  # text-free, right
        "d": {"transcription": "x", "safebox": [0, 0, 1, 1]},  # false text
        "e": {"transcription": None, "safebox": None},  # skipped: counted apart
    }
    m = score(truth, boxes, annotated)
    assert (m["images"], m["with_text"], m["kept"], m["skip_rate"]) == (5, 3, 4, pytest.approx(0.2))
    assert m["cer"] == pytest.approx(0.5) and m["exact_line_match"] == pytest.approx(2 / 3)
    assert (m["iou_median"], m["iou_p10"]) == (pytest.approx(0.5), pytest.approx(0.1))
    assert (m["false_text_rate"], m["miss_rate"]) == (0.5, 0.5)


def test_score_refuses_an_annotation_that_lacks_images():
    with pytest.raises(BenchmarkError, match="has no record of 1 ground-truth images"):
        score({"a": "x", "b": ""}, {}, {"a": {"transcription": "x", "safebox": None}})


def test_goal_misses_name_each_goal_not_reached():
    good = {"cer": 0.01, "iou_median": 0.95, "iou_p10": 0.8, "false_text_rate": 0.0, "miss_rate": 0.0,
            "images_per_s": 9.0}
    assert goal_misses(good) == []
    assert goal_misses({**good, "cer": 0.06, "images_per_s": None}) == ["cer 0.06 (goal <= 0.05)",
                                                                        "images_per_s None (goal >= 6.0)"]


class TruthEngine:
    """Reads each image's dark block as the line its red level names (10 -> "ten"): a known answer per image."""

    name = "test-truth"
    WORDS = {10: "ten", 20: "twenty"}

    def version(self) -> str:
        return "test-truth 1"

    def read(self, images, workers=1, progress=True) -> list[Reading]:
        out = []
        for image in images:
            array = np.asarray(to_pil(image))
            dark = np.argwhere(array.sum(axis=2) < 150)
            if not len(dark):
                out.append(Reading(""))
                continue
            (t, l), (b, r) = dark.min(axis=0), dark.max(axis=0) + 1
            word = self.WORDS[int(array[t, l, 0])]
            out.append(reading_of_lines([OcrLine(word, ((l - 3.0, t - 3.0), (r + 3.0, t - 3.0), (r + 3.0, b + 3.0),
                                                        (l - 3.0, b + 3.0)), 0.97)]))
        return out


register_engine("test-truth", lambda **settings: TruthEngine())


@pytest.fixture()
def tiny_truth(tmp_path) -> Path:
    """A hand-made scene-text folder: two images with a word each (safebox exact), one text-free."""
    gt = tmp_path / "gt"
    (gt / "images").mkdir(parents=True)
    truth, boxes = {}, {}
    for key, red, box in (("000000", 10, (20, 30, 60, 44)), ("000001", 20, (8, 8, 40, 20)), ("000002", None, None)):
        image = Image.new("RGB", (64, 64), (200, 210, 220))
        if red is not None:
            ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(red, 20, 20))
            boxes[key] = list(box)
        image.save(gt / "images" / f"{key}.png")
        truth[key] = TruthEngine.WORDS.get(red, "")
    (gt / "transcriptions.json").write_text(json.dumps(truth))
    (gt / "safeboxes.json").write_text(json.dumps(boxes))
    (gt / "summary.json").write_text(json.dumps({"size": 64, "seed": 0, "text_free_share": 0.33}))
    return gt


def test_a_benchmark_run_scores_each_engine_and_records_json(tiny_truth, tmp_path):
    result = run_benchmark(tiny_truth, tmp_path / "runs", [("test-truth", {}), ("test-truth", {})], progress=False,
                           record=tmp_path / "annotate.json", command="test")
    assert list(result["engines"]) == ["test-truth", "test-truth-2"]
    m = result["engines"]["test-truth"]
    assert (m["cer"], m["exact_line_match"], m["iou_median"], m["iou_p10"]) == (0.0, 1.0, 1.0, 1.0)
    assert (m["false_text_rate"], m["miss_rate"], m["skip_rate"], m["engine_version"]) == (0.0, 0.0, 0.0,
                                                                                           "test-truth 1")
    assert result["ground_truth"] == {"dir": str(tiny_truth), "images": 3, "text_free": 1, "size": 64, "seed": 0,
                                      "text_free_share": 0.33}
    assert json.loads((tmp_path / "annotate.json").read_text())["engines"]["test-truth"]["cer"] == 0.0
    table = markdown_table(result).splitlines()
    assert table[0].startswith("| engine | cer | exact_line_match | iou_median") and table[2].startswith(
        "| test-truth | 0.000 | 1.000 | 1.000 | 1.000 | 0.000 | 0.000 | 0.000 |")


def test_a_folder_without_ground_truth_is_refused_naming_the_tool_that_makes_one(tmp_path):
    with pytest.raises(BenchmarkError, match="is not a scene-text set .*make_scene_text.py GT_DIR --n 500"):
        run_benchmark(tmp_path, tmp_path / "runs", [("test-truth", {})], progress=False)


def test_the_tool_prints_the_table_and_the_goals_of_the_first_engine(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench_annotate.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--record" in done.stdout and "make_scene_text.py" in done.stdout
