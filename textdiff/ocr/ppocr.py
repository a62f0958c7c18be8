"""PP-OCR (PaddleOCR's PP-OCRv4 detector and recogniser) as an OCR engine (``ppocr``), on onnxruntime.

The ONNX models ship inside the ``rapidocr-onnxruntime`` wheel (``models/ch_PP-OCRv4_det_infer.onnx``,
``ch_PP-OCRv4_rec_infer.onnx``, ``ch_ppocr_mobile_v2.0_cls_infer.onnx``); nothing is downloaded. textdiff
runs them itself rather than through ``RapidOCR.__call__``, for three reasons measured on 256 px scene-text
photographs (docs/annotate.md):

- scale: RapidOCR enlarges every image to a shorter side of 736 px before detection. At 256 px that costs
  2.6x the time of detecting at 384 px (3.6 against 9.4 images/s on one core) and reads no better (CER 0.034
  against 0.020 on 60 photographs); :func:`detection_size` instead brings the shorter side up to
  ``det_min_side`` and the longer side down to ``det_max_side``, and an image where nothing confident was
  found is detected once more, enlarged to ``det_retry_side`` (small words a first pass at 256 px missed);
- spaces: the recogniser was trained mostly on Chinese and lets the space win few frames between Latin words
  (``UNSOUNDWEDDING``); its output still gives the space a small probability in the gap, so
  :func:`ctc_decode` puts a space between two characters wherever the space class reaches ``space_score`` on
  a frame between them (0.01: 1 space missed and 6 made up among 3321 character pairs of 160 photographs);
- threads: onnxruntime gives each session a thread per core by default; with a worker process per core
  already, extra threads only wait on each other, so each session gets ``threads`` (default 1) and
  parallelism comes from worker processes.

Each detected box is one :class:`~textdiff.ocr.base.OcrLine` (PaddleOCR's "text line": a detector box with
its recognised text, polygon in the given image's pixels and the recogniser's confidence, the mean of its
characters' probabilities), ordered top to bottom and left to right; boxes of one visual line stay separate
(textdiff.data.annotate_lines groups them, tightens them to the ink and filters them).
"""

from __future__ import annotations

import importlib.metadata
import math
import multiprocessing
import os
import sys
from dataclasses import dataclass, fields
from functools import lru_cache, partial
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from textdiff.ocr.base import ImageLike, OcrError, OcrLine, OcrMissingError, Reading, reading_of_lines, to_pil

try:  # PP-OCR's crops and resizes are OpenCV's (what the models were trained on); installed with the extra
    import cv2
except ImportError:  # the engine refuses to start (OcrMissingError) rather than the module failing to import
    cv2 = None

PACKAGE = "rapidocr_onnxruntime"
DET_MODEL, REC_MODEL, CLS_MODEL = ("ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx",
                                   "ch_ppocr_mobile_v2.0_cls_infer.onnx")
INSTALL_HINT = "pip install -e '.[annotate]' (rapidocr-onnxruntime, which ships the PP-OCRv4 models)"
REC_HEIGHT, REC_MIN_WIDTH = 48, 320  # the recogniser's input: 48 px high, at least 320 px wide (PaddleOCR's)
CLS_SHAPE = (48, 192)  # the angle classifier's input height and width
DET_MULTIPLE = 32  # the detector's input sides are multiples of its total stride


@dataclass(frozen=True)
class PpOcrSettings:
    """The engine's keyword settings (``make_engine("ppocr", **settings)``), PaddleOCR's names where it has one.

    Detection scale: the image is resized so its shorter side is at least ``det_min_side`` and its longer side
    at most ``det_max_side`` (the cap wins); when no box reaches ``retry_score``, once more with the shorter
    side at ``det_retry_side`` (0: never). ``det_db_thresh`` binarises the text probability map,
    ``det_db_box_thresh`` is the mean probability a box needs, ``det_db_unclip_ratio`` how far a box is grown
    around its core. ``use_angle_cls`` turns upside-down lines (``cls_thresh``: the classifier's certainty
    needed). ``drop_score``: lines recognised below this confidence are not returned. ``space_score``: the
    space probability on a frame between two characters that makes a space (1.0: only argmax spaces).
    ``threads``: onnxruntime intra-op threads per session (and process); ``rec_batch_num`` lines per
    recogniser call.
    """

    det_min_side: int = 384
    det_max_side: int = 1536
    det_retry_side: int = 736
    retry_score: float = 0.5
    det_db_thresh: float = 0.3
    det_db_box_thresh: float = 0.5
    det_db_unclip_ratio: float = 1.6
    use_angle_cls: bool = False
    cls_thresh: float = 0.9
    drop_score: float = 0.5
    space_score: float = 0.01
    threads: int = 1
    rec_batch_num: int = 8

    def validate(self) -> None:
        """Raise ValueError naming the setting that is out of range."""
        checks = [("det_min_side", self.det_min_side >= DET_MULTIPLE, f">= {DET_MULTIPLE}"),
                  ("det_max_side", self.det_max_side >= self.det_min_side, ">= det_min_side"),
                  ("det_retry_side", self.det_retry_side == 0 or self.det_retry_side >= DET_MULTIPLE,
                   f"0 (no retry) or >= {DET_MULTIPLE}"),
                  ("threads", self.threads >= 1, ">= 1"), ("rec_batch_num", self.rec_batch_num >= 1, ">= 1")]
        checks += [(name, 0.0 <= getattr(self, name) <= 1.0, "in 0..1")
                   for name in ("retry_score", "det_db_thresh", "det_db_box_thresh", "cls_thresh", "drop_score",
                                "space_score")]
        checks.append(("det_db_unclip_ratio", self.det_db_unclip_ratio > 0, "> 0"))
        for name, ok, need in checks:
            if not ok:
                raise ValueError(f"ppocr setting {name}={getattr(self, name)!r} must be {need}")


def settings_of(settings: dict) -> PpOcrSettings:
    """Validated :class:`PpOcrSettings` from keyword settings; a ValueError names an unknown one and the choices."""
    known = {f.name for f in fields(PpOcrSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"ppocr has no setting {unknown[0]!r}; its settings are {', '.join(sorted(known))}")
    parsed = PpOcrSettings(**settings)
    parsed.validate()
    return parsed


def model_dir() -> Path:
    """The folder of the installed wheel's ONNX models; OcrMissingError, saying what to install, without them."""
    if cv2 is None:
        raise OcrMissingError(f"the PP-OCR engine needs OpenCV (cv2); {INSTALL_HINT}")
    try:
        # deferred: rapidocr_onnxruntime is optional (the annotate extra) and imports onnxruntime
        import rapidocr_onnxruntime
    except ImportError:
        raise OcrMissingError(f"the PP-OCR engine needs the package {PACKAGE}; {INSTALL_HINT}") from None
    folder = Path(rapidocr_onnxruntime.__file__).parent / "models"
    missing = [m for m in (DET_MODEL, REC_MODEL, CLS_MODEL) if not (folder / m).is_file()]
    if missing:
        raise OcrMissingError(f"{PACKAGE} at {folder.parent} lacks the model files {', '.join(missing)}; reinstall "
                              f"it: pip install --force-reinstall rapidocr-onnxruntime")
    return folder


def detection_size(width: int, height: int, min_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) of the detector's input for a ``width`` x ``height`` image: the shorter side brought up
    to ``min_side``, the longer down to ``max_side`` (which wins), each rounded to a multiple of 32."""
    scale = max(1.0, min_side / min(width, height))
    scale = min(scale, max_side / max(width, height))
    return tuple(max(DET_MULTIPLE, int(round(v * scale / DET_MULTIPLE)) * DET_MULTIPLE) for v in (width, height))


def order_corners(points: np.ndarray) -> np.ndarray:
    """The 4 corners of a quadrilateral ``[4, 2]`` clockwise from the top left: the two leftmost are the left
    side (the upper one first), the two rightmost the right side."""
    by_x = points[np.argsort(points[:, 0], kind="stable")]
    left, right = by_x[:2], by_x[2:]
    tl, bl = left[np.argsort(left[:, 1], kind="stable")]
    tr, br = right[np.argsort(right[:, 1], kind="stable")]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def reading_order(polygons: Sequence[np.ndarray]) -> list[int]:
    """Indices of ``polygons`` (each ``[4, 2]``) top to bottom, and left to right among boxes whose vertical
    centres lie within half the lower box's height of each other (one visual row)."""
    centres = [(float(p[:, 1].mean()), float(p[:, 0].mean()), float(p[:, 1].max() - p[:, 1].min())) for p in polygons]
    order = sorted(range(len(polygons)), key=lambda i: centres[i][0])
    rows: list[list[int]] = []
    for i in order:
        if rows and abs(centres[i][0] - np.mean([centres[j][0] for j in rows[-1]])) < 0.5 * min(
                centres[i][2], min(centres[j][2] for j in rows[-1])):
            rows[-1].append(i)
        else:
            rows.append([i])
    return [i for row in rows for i in sorted(row, key=lambda j: centres[j][1])]


def ctc_decode(probs: np.ndarray, characters: Sequence[str], space_score: float) -> tuple[str, float]:
    """Text and confidence of one line from the recogniser's output ``probs`` [T, C] (per frame, the
    probability of each class; class 0 is the CTC blank, the last is the space).

    Repeated classes collapse and blanks drop (CTC); the confidence is the mean probability of the characters
    kept (PaddleOCR's). A space goes between two kept characters when the space class reaches ``space_score``
    on any frame between them (the model, trained mostly on Chinese, rarely lets a space win the argmax).
    """
    best = probs.argmax(axis=1)
    space = len(characters) - 1
    keep = [t for t in range(len(best)) if best[t] != 0 and (t == 0 or best[t] != best[t - 1])]
    if not keep:
        return "", 0.0
    text, last = [], None
    for t in keep:
        char = characters[best[t]]
        if last is not None and best[t] != space and text[-1] != " " and probs[last + 1:t, space].max(
                initial=0.0) >= space_score:
            text.append(" ")
        text.append(char)
        last = t
    confidence = float(np.mean([probs[t, best[t]] for t in keep]))
    return " ".join("".join(text).split()), confidence


def crop_line(image: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """The line under ``polygon`` ([4, 2], clockwise from top left) cut out of ``image`` [H, W, 3] and warped
    level, [h, w, 3] (h, w: its longer edges); a crop at least 1.5x taller than wide is turned a quarter."""
    width = int(max(np.linalg.norm(polygon[0] - polygon[1]), np.linalg.norm(polygon[2] - polygon[3])))
    height = int(max(np.linalg.norm(polygon[0] - polygon[3]), np.linalg.norm(polygon[1] - polygon[2])))
    width, height = max(width, 1), max(height, 1)
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    warp = cv2.getPerspectiveTransform(polygon.astype(np.float32), target)
    crop = cv2.warpPerspective(image, warp, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.rot90(crop) if height >= 1.5 * width else crop


def _normalised(image: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 [3, h, w] in [-1, 1]."""
    return (image.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def rec_batch(crops: Sequence[np.ndarray]) -> np.ndarray:
    """Line crops as one recogniser batch [N, 3, 48, W]: each resized to 48 px high keeping its aspect (at most
    W wide), left-aligned on zeros; W fits the widest aspect, at least 320."""
    ratio = max([REC_MIN_WIDTH / REC_HEIGHT] + [c.shape[1] / c.shape[0] for c in crops])
    width = int(REC_HEIGHT * ratio)
    batch = np.zeros((len(crops), 3, REC_HEIGHT, width), dtype=np.float32)
    for i, crop in enumerate(crops):
        resized_width = min(width, int(math.ceil(REC_HEIGHT * crop.shape[1] / crop.shape[0])))
        batch[i, :, :, :resized_width] = _normalised(cv2.resize(crop, (resized_width, REC_HEIGHT)))
    return batch


@dataclass
class _Models:
    """The three onnxruntime sessions and the recogniser's character list."""

    det: object
    rec: object
    cls: Optional[object]
    characters: list[str]
    postprocess: object


@lru_cache(maxsize=4)
def _load_models(settings: PpOcrSettings, pid: int) -> _Models:
    """The models under ``settings``, once per process (``pid``: a forked worker loads its own sessions)."""
    folder = model_dir()
    # deferred: onnxruntime and RapidOCR's box extraction are optional (the annotate extra) and slow to import
    import onnxruntime
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL

    def session(name: str):
        return onnxruntime.InferenceSession(str(folder / name), sess_options=options,
                                            providers=["CPUExecutionProvider"])

    rec = session(REC_MODEL)
    meta = rec.get_modelmeta().custom_metadata_map
    if "character" not in meta:
        raise OcrError(f"{folder / REC_MODEL} carries no character list; reinstall rapidocr-onnxruntime")
    characters = ["blank"] + meta["character"].splitlines() + [" "]
    postprocess = DBPostProcess(thresh=settings.det_db_thresh, box_thresh=settings.det_db_box_thresh,
                                max_candidates=1000, unclip_ratio=settings.det_db_unclip_ratio, score_mode="fast",
                                use_dilation=True)
    return _Models(session(DET_MODEL), rec, session(CLS_MODEL) if settings.use_angle_cls else None, characters,
                   postprocess)


def detect(models: _Models, image: np.ndarray, size: tuple[int, int]) -> list[np.ndarray]:
    """Text boxes of ``image`` (BGR uint8 [H, W, 3]) detected at ``size`` (width, height): polygons [4, 2]
    clockwise from the top left in the image's pixels, without slivers of 3 px or less."""
    height, width = image.shape[:2]
    resized = cv2.resize(image, size)
    prob = models.det.run(None, {models.det.get_inputs()[0].name: _normalised(resized)[None]})[0]
    boxes, _ = models.postprocess(prob, (height, width))
    found = []
    for box in boxes:
        box = order_corners(np.asarray(box, dtype=np.float32))
        box[:, 0] = np.clip(box[:, 0], 0, width - 1)
        box[:, 1] = np.clip(box[:, 1], 0, height - 1)
        if np.linalg.norm(box[0] - box[1]) > 3 and np.linalg.norm(box[0] - box[3]) > 3:
            found.append(box)
    return found


def upright_crops(models: _Models, crops: list[np.ndarray], cls_thresh: float) -> list[np.ndarray]:
    """The crops, each turned half a circle where the angle classifier is at least ``cls_thresh`` sure it is
    upside down."""
    height, width = CLS_SHAPE
    batch = np.zeros((len(crops), 3, height, width), dtype=np.float32)
    for i, crop in enumerate(crops):
        resized_width = min(width, int(math.ceil(height * crop.shape[1] / crop.shape[0])))
        batch[i, :, :, :resized_width] = _normalised(cv2.resize(crop, (resized_width, height)))
    probs = models.cls.run(None, {models.cls.get_inputs()[0].name: batch})[0]
    return [cv2.rotate(c, cv2.ROTATE_180) if p[1] > p[0] and p[1] >= cls_thresh else c for c, p in zip(crops, probs)]


def recognise(models: _Models, crops: list[np.ndarray], settings: PpOcrSettings) -> list[tuple[str, float]]:
    """(text, confidence) of each line crop, in batches of crops of similar aspect (less padding)."""
    order = sorted(range(len(crops)), key=lambda i: crops[i].shape[1] / crops[i].shape[0])
    results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
    for start in range(0, len(order), settings.rec_batch_num):
        chunk = order[start:start + settings.rec_batch_num]
        probs = models.rec.run(None, {models.rec.get_inputs()[0].name: rec_batch([crops[i] for i in chunk])})[0]
        for i, p in zip(chunk, probs):
            results[i] = ctc_decode(p, models.characters, settings.space_score)
    return results


def _read_lines(models: _Models, image: np.ndarray, settings: PpOcrSettings, size: tuple[int, int]) -> list[OcrLine]:
    polygons = detect(models, image, size)
    if not polygons:
        return []
    polygons = [polygons[i] for i in reading_order(polygons)]
    crops = [crop_line(image, p) for p in polygons]
    if models.cls is not None:
        crops = upright_crops(models, crops, settings.cls_thresh)
    lines = []
    for polygon, (text, confidence) in zip(polygons, recognise(models, crops, settings)):
        if text and confidence >= settings.drop_score:
            lines.append(OcrLine(text, tuple((float(x), float(y)) for x, y in polygon), confidence))
    return lines


def read_image(image: ImageLike, settings: PpOcrSettings) -> Reading:
    """What PP-OCR reads in one image (the models load once per process and settings)."""
    models = _load_models(settings, os.getpid())
    rgb = np.asarray(to_pil(image))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    height, width = bgr.shape[:2]
    size = detection_size(width, height, settings.det_min_side, settings.det_max_side)
    lines = _read_lines(models, bgr, settings, size)
    if settings.det_retry_side and not any(line.confidence >= settings.retry_score for line in lines):
        larger = detection_size(width, height, settings.det_retry_side, settings.det_max_side)
        if larger[0] > size[0]:
            lines = _read_lines(models, bgr, settings, larger) or lines
    return reading_of_lines(lines)


class PpOcrEngine:
    """PP-OCRv4 detection and recognition on onnxruntime; ``PpOcrEngine(**settings)`` (:class:`PpOcrSettings`)
    raises ValueError for an unknown or impossible setting and OcrMissingError when the package is absent."""

    name = "ppocr"

    def __init__(self, **settings):
        self.settings = settings_of(settings)
        self.model_dir = model_dir()

    def version(self) -> str:
        """``rapidocr-onnxruntime X, onnxruntime Y, models DET + REC (+ CLS)``: what every annotation records."""
        models = [DET_MODEL, REC_MODEL] + ([CLS_MODEL] if self.settings.use_angle_cls else [])
        return (f"rapidocr-onnxruntime {importlib.metadata.version('rapidocr-onnxruntime')}, onnxruntime "
                f"{importlib.metadata.version('onnxruntime')}, models {' + '.join(models)}")

    def read(self, images: Iterable[ImageLike], workers: int = 1, progress: bool = True) -> list[Reading]:
        """One Reading per image (uint8 ``[H, W, 3]`` RGB arrays or PIL images), in order; ``workers`` > 1
        reads in that many processes (each loads the models once)."""
        if workers < 1:
            raise ValueError(f"workers is {workers}; give at least 1 (--workers)")
        images = list(images)
        job = partial(read_image, settings=self.settings)
        with tqdm(total=len(images), desc="ppocr", unit="img", disable=not progress) as bar:
            if workers == 1 or len(images) < 2:
                return [_counted(job(image), bar) for image in images]
            # fork where the platform allows (the children inherit the imported modules, not loaded sessions:
            # each process loads its own, see _load_models)
            context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
            with context.Pool(workers) as pool:
                chunk = max(1, min(16, len(images) // (workers * 4)))
                return [_counted(r, bar) for r in pool.imap(job, images, chunksize=chunk)]


def _counted(reading: Reading, bar) -> Reading:
    bar.update(1)
    return reading
