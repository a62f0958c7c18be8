"""From the OCR records of an annotation run to its outcome per image: noise dropped, boxes grouped into
lines, the filters applied (textdiff.data.annotate_filters), the transcription and safebox made.

A record is what a worker wrote for one image (textdiff.data.annotate: ``progress.jsonl``): its key, source,
size, captions and every box the engine returned with its ink box; or, for an image that could not be read,
its skip kind and reason. :func:`outcome` is a pure function of a record and the filters, so a rerun with
other filters re-uses the OCR.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from textdiff.data.annotate_filters import AnnotationFilters, LineFacts, box_kind, image_skip
from textdiff.data.annotate_lines import Box, group_lines, union_box

READ = "read"  # a record's status when the image was read (else a skip kind: bad_image, too_many_pixels)
UNREADABLE = "unreadable_text"


@dataclass(frozen=True)
class Outcome:
    """One image's annotation: ``kind`` "text", "text_free" or a skip kind; ``transcription`` (lines in
    reading order joined by newlines), ``safebox`` [l, t, r, b] (None without text), ``lines`` as written
    to ocr.jsonl, ``noise`` the boxes dropped as noise, ``unreadable_kept`` whether unreadable lines were
    kept as read, ``unreadable`` the ink boxes [l, t, r, b] of the unreadable lines left out of the
    transcription for the loss to mask (``--unreadable mask``), and the skip ``reason``."""

    kind: str
    transcription: str = ""
    safebox: Optional[list[int]] = None
    lines: tuple[dict, ...] = ()
    noise: tuple[dict, ...] = ()
    unreadable_kept: bool = False
    reason: Optional[str] = None
    unreadable: tuple[list[int], ...] = ()

    @property
    def kept(self) -> bool:
        return self.kind in ("text", "text_free")


def _ink_box(box: dict, width: int, height: int) -> list[float]:
    """A box's ink box, or (no ink found) its polygon's bounds clipped to the image."""
    if box.get("ink"):
        return list(box["ink"])
    xs, ys = [p[0] for p in box["polygon"]], [p[1] for p in box["polygon"]]
    return [max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys))]


def outcome(record: dict, filters: AnnotationFilters) -> Outcome:
    """The annotation of one record under ``filters`` (module docstring)."""
    if record["status"] != READ:
        return Outcome(record["status"], reason=record["reason"])
    width, height = record["width"], record["height"]
    kinds = [box_kind(b["text"], b["confidence"], filters) for b in record["boxes"]]
    noise = tuple({**b, "kind": "noise"} for b, k in zip(record["boxes"], kinds) if k == "noise")
    kept = [(b, k) for b, k in zip(record["boxes"], kinds) if k != "noise"]
    boxes = [Box(b["text"], b["confidence"], np.asarray(b["polygon"], dtype=np.float64), i)
             for i, (b, _) in enumerate(kept)]
    lines, unreadable_lines = [], []
    for line in group_lines(boxes):
        members = [kept[b.index] for b in line.boxes]
        ink = union_box([_ink_box(raw, width, height) for raw, _ in members])
        ink = [max(0, ink[0]), max(0, ink[1]), min(width, ink[2]), min(height, ink[3])]
        lines.append({"text": line.text, "confidence": round(line.confidence, 4),
                      "polygon": [[round(float(x), 2), round(float(y), 2)] for x, y in line.polygon], "box": ink,
                      "boxes": [{**raw, "kind": kind} for raw, kind in members]})
        unreadable_lines.append(any(kind == "unreadable" for _, kind in members))
    safebox = union_box([line["box"] for line in lines])  # every line, masked ones too: crops keep all text
    common = dict(lines=tuple(lines), noise=noise)
    unreadable = any(unreadable_lines)
    masked = filters.unreadable == "mask"
    if unreadable and (filters.unreadable == "drop" or (masked and all(unreadable_lines))):
        worst = min(lines, key=lambda line: line["confidence"])
        why = ("--unreadable keep keeps it as read" if not masked else
               "no line is readable, and --unreadable mask keeps an image only with a transcription to train on")
        return Outcome(UNREADABLE, reason=f"line {worst['text']!r} read at confidence {worst['confidence']:.2f}, below "
                       f"--min-confidence {filters.min_confidence:g} ({why})", **common)
    written = [line for line, bad in zip(lines, unreadable_lines) if not (masked and bad)]
    facts = [LineFacts(line["text"], line["box"]) for line in written]
    skip = image_skip(facts, width, height, safebox, filters)
    if skip is not None:
        return Outcome(skip[0], reason=skip[1], **common)
    transcription = "\n".join(line["text"] for line in written)
    boxes_masked = tuple(line["box"] for line, bad in zip(lines, unreadable_lines) if masked and bad)
    return Outcome("text" if lines else "text_free", transcription, safebox, unreadable_kept=unreadable and not masked,
                   unreadable=boxes_masked, **common)


def ocr_line(record: dict, result: Outcome, engine: str) -> dict:
    """The ocr.jsonl object of one image."""
    return {"key": record["key"], "source": record["source"], "engine": engine, "outcome": result.kind,
            "reason": result.reason, "width": record.get("width"), "height": record.get("height"),
            "transcription": result.transcription if result.kept else None, "safebox": result.safebox,
            "unreadable": list(result.unreadable), "lines": list(result.lines), "noise": list(result.noise)}


@dataclass
class Tally:
    """Counts over the outcomes of a run (summary.json)."""

    with_text: int = 0
    text_free: int = 0
    lines: int = 0
    noise_boxes: int = 0
    unreadable_kept: int = 0
    unreadable_masked: int = 0  # images kept with unreadable lines masked (--unreadable mask)
    masked_lines: int = 0
    skipped: Counter = field(default_factory=Counter)

    def add(self, result: Outcome) -> None:
        """Count one image's outcome."""
        self.noise_boxes += len(result.noise)
        if result.kind == "text":
            self.with_text += 1
            self.lines += len(result.lines)
            self.unreadable_kept += result.unreadable_kept
            self.unreadable_masked += bool(result.unreadable)
            self.masked_lines += len(result.unreadable)
        elif result.kind == "text_free":
            self.text_free += 1
        else:
            self.skipped[result.kind] += 1

    def add_skips(self, kinds: Iterable[str]) -> None:
        """Count inputs skipped before any record (found while listing the source)."""
        self.skipped.update(kinds)

    def to_json(self) -> dict:
        kept = self.with_text + self.text_free
        return {"annotated": kept, "with_text": self.with_text, "text_free": self.text_free,
                "text_free_share": self.text_free / kept if kept else 0.0, "lines": self.lines,
                "noise_boxes": self.noise_boxes, "unreadable_kept": self.unreadable_kept,
                "unreadable_masked": self.unreadable_masked, "masked_lines": self.masked_lines,
                "skipped_count": sum(self.skipped.values()), "skipped_by_kind": dict(sorted(self.skipped.items()))}
