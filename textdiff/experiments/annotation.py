"""How well tools/annotate.py annotates: each OCR engine run through the whole annotation on a scene-text
set with exact ground truth (textdiff.data.scene_text_set, tools/make_scene_text.py) and scored
(tools/bench_annotate.py; the results in docs/annotate.md and docs/annotate.json).

Per engine, over the images the annotation kept (a skipped image is counted apart, in ``skip_rate``):

- ``cer``: character error rate of the transcription (all lines joined by "\\n") against the ground truth,
  Levenshtein distance / ground-truth length, averaged over images with text (a miss scores 1.0);
- ``exact_line_match``: the share of ground-truth lines that the annotation read exactly (as a multiset of
  lines per image, so order does not count here);
- ``iou_median``, ``iou_p10``: the safebox's intersection over union with the true safebox (the union of
  the lines' ink boxes), over images with text (no safebox: 0), median and 10th percentile;
- ``false_text_rate``: the share of text-free images annotated with text;
- ``miss_rate``: the share of images with text annotated as text-free;
- ``images_per_s``: images read per second of the annotation run, on the machine and workers given.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

from textdiff.data.annotate import annotate
from textdiff.data.annotate_filters import make_filters
from textdiff.data.annotate_sources import SourceSpec
from textdiff.files import atomic_write_json

# The targets of the default engine at 256 px with 20% text-free images on >= 500 images (docs/annotate.md).
GOALS = {"cer": ("<=", 0.05), "iou_median": (">=", 0.88), "iou_p10": (">=", 0.70), "false_text_rate": ("<=", 0.03),
         "miss_rate": ("<=", 0.03), "images_per_s": (">=", 6.0)}
METRICS = ("cer", "exact_line_match", "iou_median", "iou_p10", "false_text_rate", "miss_rate", "skip_rate",
           "images_per_s")


class BenchmarkError(ValueError):
    """The ground-truth folder or an engine cannot be used; the message names it."""


def cer(prediction: str, truth: str) -> float:
    """Levenshtein distance of ``prediction`` from ``truth`` over the length of ``truth`` (at least 1)."""
    return Levenshtein.distance(prediction, truth) / max(len(truth), 1)


def exact_lines(prediction: str, truth: str) -> int:
    """How many lines of ``truth`` appear in ``prediction`` (lines split at "\\n", each matched once)."""
    return sum((Counter(prediction.split("\n")) & Counter(truth.split("\n"))).values()) if truth else 0


def box_iou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """Intersection over union of boxes [l, t, r, b]; 0 when either is None."""
    if a is None or b is None:
        return 0.0
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(truth: dict[str, str], true_boxes: dict[str, Sequence[float]], annotated: dict[str, dict]) -> dict:
    """The metrics (module docstring) of ``annotated`` {key: {"transcription": str or None (skipped),
    "safebox": box or None}} against ``truth`` {key: text} and ``true_boxes`` {key: safebox}."""
    missing = sorted(set(truth) - set(annotated))
    if missing:
        raise BenchmarkError(f"the annotation has no record of {len(missing)} ground-truth images ({missing[0]} ...)")
    kept = {k: v for k, v in annotated.items() if k in truth and v["transcription"] is not None}
    with_text = [k for k in truth if truth[k] and k in kept]
    text_free = [k for k in truth if not truth[k] and k in kept]
    ious = [box_iou(kept[k]["safebox"], true_boxes.get(k)) for k in with_text]
    lines = sum(len(truth[k].split("\n")) for k in with_text)
    return {
        "images": len(truth), "with_text": sum(1 for t in truth.values() if t), "kept": len(kept),
        "skip_rate": 1 - len(kept) / len(truth) if truth else 0.0,
        "cer": float(np.mean([cer(kept[k]["transcription"], truth[k]) for k in with_text])) if with_text else None,
        "exact_line_match": sum(exact_lines(kept[k]["transcription"], truth[k]) for k in with_text) / lines
        if lines else None,
        "iou_median": float(np.median(ious)) if ious else None,
        "iou_p10": float(np.percentile(ious, 10)) if ious else None,
        "false_text_rate": sum(1 for k in text_free if kept[k]["transcription"]) / len(text_free)
        if text_free else None,
        "miss_rate": sum(1 for k in with_text if not kept[k]["transcription"]) / len(with_text) if with_text else None,
    }


def read_ground_truth(gt_dir: Path) -> tuple[dict[str, str], dict[str, list]]:
    """The transcriptions and safeboxes of a scene-text set; BenchmarkError names a missing file."""
    files = [gt_dir / "transcriptions.json", gt_dir / "safeboxes.json", gt_dir / "images"]
    absent = [str(f) for f in files if not f.exists()]
    if absent:
        raise BenchmarkError(f"{gt_dir} is not a scene-text set (no {absent[0]}); make one with "
                             "python tools/make_scene_text.py GT_DIR --n 500")
    return (json.loads(files[0].read_text(encoding="utf-8")), json.loads(files[1].read_text(encoding="utf-8")))


def read_annotation(out_dir: Path) -> dict[str, dict]:
    """{key: {"transcription", "safebox", "outcome"}} from an annotation's ocr.jsonl."""
    rows = [json.loads(line) for line in (out_dir / "ocr.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return {r["key"]: {"transcription": r["transcription"], "safebox": r["safebox"], "outcome": r["outcome"]}
            for r in rows}


def benchmark_engine(gt_dir: str | Path, out_dir: str | Path, engine: str, settings: Optional[dict] = None,
                     preset: str = "default", workers: int = 0, progress: bool = True) -> dict:
    """Annotate the images of scene-text set ``gt_dir`` with ``engine`` into ``out_dir`` (started over) and
    score them; returns the metrics with the engine's version, settings and skip counts."""
    gt_dir, out_dir = Path(gt_dir), Path(out_dir)
    truth, boxes = read_ground_truth(gt_dir)
    summary = annotate(SourceSpec(str(gt_dir / "images"), "folder"), out_dir, engine, settings or {},
                       make_filters(preset), preset, workers=workers, overwrite=True, progress=progress,
                       command=f"bench_annotate {gt_dir} --engine {engine}")
    metrics = score(truth, boxes, read_annotation(out_dir))
    return {**metrics, "images_per_s": summary["images_per_s"], "engine": engine,
            "engine_version": summary["engine_version"], "engine_settings": summary["engine_settings"],
            "preset": preset, "workers": workers, "skipped_by_kind": summary["skipped_by_kind"],
            "noise_boxes": summary["noise_boxes"], "seconds": summary["seconds"]}


def goal_misses(metrics: dict) -> list[str]:
    """The :data:`GOALS` that ``metrics`` do not reach, as readable lines (empty: all reached)."""
    misses = []
    for name, (op, target) in GOALS.items():
        value = metrics.get(name)
        if value is None or (value > target if op == "<=" else value < target):
            misses.append(f"{name} {value} (goal {op} {target})")
    return misses


def run_benchmark(gt_dir: str | Path, out_root: str | Path, engines: Sequence[tuple[str, dict]],
                  preset: str = "default", workers: int = 0, progress: bool = True,
                  record: Optional[str | Path] = None, command: str = "") -> dict:
    """:func:`benchmark_engine` for each (name, settings) of ``engines``, each into ``out_root/NAME``;
    returns (and with ``record`` writes as JSON) the set's description and each engine's metrics."""
    gt_dir = Path(gt_dir)
    truth, _ = read_ground_truth(gt_dir)
    summary_path = gt_dir / "summary.json"
    made = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    result = {"ground_truth": {"dir": str(gt_dir), "images": len(truth),
                               "text_free": sum(1 for t in truth.values() if not t),
                               **{k: made.get(k) for k in ("size", "seed", "text_free_share")}},
              "cpus": os.cpu_count(), "command": command, "goals": {k: f"{op} {v}" for k, (op, v) in GOALS.items()},
              "engines": {}}
    labels = Counter()
    for name, settings in engines:
        labels[name] += 1
        label = name if labels[name] == 1 else f"{name}-{labels[name]}"
        result["engines"][label] = benchmark_engine(gt_dir, Path(out_root) / label, name, settings, preset, workers,
                                                    progress)
    if record is not None:
        atomic_write_json(record, result)
    return result


def markdown_table(result: dict) -> str:
    """The engines' metrics as a Markdown table (docs/annotate.md)."""
    head = "| engine | " + " | ".join(METRICS) + " |"
    rows = [head, "|" + "---|" * (len(METRICS) + 1)]
    for label, m in result["engines"].items():
        cells = ["-" if m.get(k) is None else f"{m[k]:.1f}" if k == "images_per_s" else f"{m[k]:.3f}" for k in METRICS]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
