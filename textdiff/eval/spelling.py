"""Spelling evaluation: OCR images made for prompts and score the readings, per prompt and in aggregate.

:func:`evaluate_images` scores images that already exist; :func:`evaluate_spelling` is the training-time
hook that first asks the trainer's ``sample_fn`` for the images. :func:`ocr_engine` is the one place that
builds an OCR engine from the eval section (``eval.ocr_engine`` and that engine's keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from textdiff.config import ConfigError, EvalConfig
from textdiff.eval.metrics import Score, aggregate, score, shows_text
from textdiff.eval.prompts import render_prompts
from textdiff.ocr import ImageLike, OcrEngine, OcrMissingError, Reading, check_engine, engine_names, make_engine
from textdiff.sampling.prompts import Prompt, expand

# sample_fn(txts, capts, seed) -> uint8 [N, H, W, 3] (array or CPU tensor) or a list of N PIL images
SampleFn = Callable[[list[str], list[str], int], object]


# the eval section's keys that are Tesseract's settings, under the same names (textdiff.ocr.TesseractEngine)
TESSERACT_KEYS = ("tesseract_cmd", "ocr_lang", "psm", "ocr_retry_psm", "ocr_height", "ocr_glyph_height", "whitelist",
                  "ocr_binarize", "ocr_timeout_s")
# the text metrics of a per-prompt row (a text-free prompt's row has false_text_rate alone)
TEXT_METRICS = ("cer", "exact_match", "word_accuracy", "ned", "sentence_accuracy", "mario_word_accuracy",
                "mario_precision", "mario_recall", "mario_f_measure")


def engine_settings(cfg: EvalConfig, name: str) -> dict:
    """The keyword settings the eval section gives OCR engine ``name``: :data:`TESSERACT_KEYS` for
    ``tesseract``; none for the others, which read with their own defaults."""
    return {key: getattr(cfg, key) for key in TESSERACT_KEYS} if name == "tesseract" else {}


def _engine_name(cfg: EvalConfig, name: Optional[str]) -> str:
    name = name or cfg.ocr_engine
    if name not in engine_names():
        raise ConfigError(f"eval.ocr_engine (--engine) is {name!r}; the OCR engines are {', '.join(engine_names())} "
                          "(register another with textdiff.ocr.register_engine)")
    return name


def check_ocr_engine(cfg: EvalConfig, name: Optional[str] = None) -> None:
    """Raise, before any work, when OCR engine ``name`` (default ``cfg.ocr_engine``) cannot run: ConfigError
    for an unknown name, OcrMissingError naming what to install (the Tesseract program, the rapidocr
    package)."""
    name = _engine_name(cfg, name)
    check_engine(name, **engine_settings(cfg, name))


def ocr_engine(cfg: EvalConfig, name: Optional[str] = None) -> OcrEngine:
    """OCR engine ``name`` (default ``cfg.ocr_engine``) with the eval section's settings for it."""
    name = _engine_name(cfg, name)
    return make_engine(name, **engine_settings(cfg, name))


def installed_engines(cfg: EvalConfig) -> list[str]:
    """The registered OCR engines that can run here, ``cfg.ocr_engine`` first; OcrMissingError, with what
    to install for each, when none can."""
    found, missing = [], []
    for name in [cfg.ocr_engine] + [n for n in engine_names() if n != cfg.ocr_engine]:
        try:
            check_ocr_engine(cfg, name)
            found.append(name)
        except OcrMissingError as e:
            missing.append(str(e))
    if not found:
        raise OcrMissingError("no OCR engine can run here: " + "; ".join(missing))
    return found


@dataclass(frozen=True)
class SpellingReport:
    """Aggregate metrics (see :func:`textdiff.eval.metrics.aggregate`), one row per distinct prompt, whether
    case and whitespace were normalised before comparing, and the OCR engine that read the images."""

    metrics: dict[str, float]
    per_prompt: list[dict]
    normalize: bool
    engine: str
    engine_version: str

    def to_dict(self) -> dict:
        """JSON-able form: the metrics at the top level, then ``normalize``, ``engine``, ``engine_version``
        and ``prompts``."""
        return {**{k: _jsonable(v) for k, v in self.metrics.items()}, "normalize": self.normalize,
                "engine": self.engine, "engine_version": self.engine_version, "prompts": self.per_prompt}


def _jsonable(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def _per_prompt(prompts: Sequence[Prompt], readings: Sequence[Reading], scores: Sequence[Score]) -> list[dict]:
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.txt, p.capt), []).append(i)
    rows = []
    for (txt, capt), idx in groups.items():
        metrics = aggregate([scores[i] for i in idx])
        keep = TEXT_METRICS if txt.strip() else ("false_text_rate",)
        rows.append({"txt": txt, "capt": capt, "n": len(idx),
                     **{k: _jsonable(metrics[k]) for k in keep},
                     "readings": [readings[i].text for i in idx]})
    return rows


def evaluate_images(images: Sequence[ImageLike], prompts: Sequence[Prompt], cfg: EvalConfig,
                    workers: int = 1, progress: bool = True, engine: Optional[OcrEngine] = None) -> SpellingReport:
    """OCR ``images`` (uint8 ``[H, W, 3]`` arrays or PIL) and score image i against ``prompts[i].txt``.

    ``engine`` reads them (default: :func:`ocr_engine` of ``cfg``). Images of the same (txt, capt) are pooled
    into one per-prompt row; ``cfg.normalize`` chooses whether case and whitespace are normalised.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; give one prompt per image "
                         "(expand(prompts) repeats each by its count)")
    engine = engine or ocr_engine(cfg)
    readings = engine.read(images, workers=workers, progress=progress)
    scores = [score(r.text, p.txt, cfg.normalize,
                    text_seen=shows_text(r.words, cfg.false_text_min_chars, cfg.false_text_min_conf),
                    drop_spaces=cfg.drop_spaces)
              for r, p in zip(readings, prompts)]
    return SpellingReport(aggregate(scores), _per_prompt(prompts, readings, scores), cfg.normalize, engine.name,
                          engine.version())


def ceiling_report(prompts: Sequence[Prompt], size: int, cfg: EvalConfig, workers: int = 1, progress: bool = False,
                   engine: Optional[OcrEngine] = None) -> SpellingReport:
    """The OCR ceiling of ``prompts`` (one per image, see :func:`expand`): the engine on the synthetic
    renders of exactly their text at ``size`` px (:func:`textdiff.eval.prompts.render_prompts`), no model
    involved. A model scores no better, so its figures are read against these."""
    return evaluate_images(render_prompts(list(prompts), size), prompts, cfg, workers, progress, engine)


def _as_image_list(batch: object, expected: int) -> list[ImageLike]:
    if hasattr(batch, "cpu"):  # a torch tensor, moved off the accelerator
        batch = batch.cpu().numpy()
    images = list(batch) if isinstance(batch, (list, tuple, np.ndarray)) else None
    if images is None or len(images) != expected:
        got = len(images) if images is not None else type(batch).__name__
        raise ValueError(f"sample_fn returned {got} images for {expected} prompts; it must return uint8 "
                         "[N, H, W, 3] or a list of N PIL images")
    return images


def sample_prompts(sample_fn: SampleFn, prompts: Sequence[Prompt], batch_size: int = 0) -> list[ImageLike]:
    """Call ``sample_fn(txts, capts, seed)`` once per seed (per ``batch_size`` chunk of it when > 0);
    returns the images in the order of ``expand(prompts)``."""
    wanted = expand(prompts)
    by_seed: dict[int, list[int]] = {}
    for i, p in enumerate(wanted):
        by_seed.setdefault(p.seed, []).append(i)
    images: list[ImageLike | None] = [None] * len(wanted)
    for seed, idx in by_seed.items():
        step = batch_size if batch_size > 0 else len(idx)
        for start in range(0, len(idx), step):
            chunk = idx[start:start + step]
            out = sample_fn([wanted[i].txt for i in chunk], [wanted[i].capt for i in chunk], seed)
            for i, image in zip(chunk, _as_image_list(out, len(chunk))):
                images[i] = image
    return images


def evaluate_spelling(sample_fn: SampleFn, prompts: Sequence[Prompt], cfg: EvalConfig, batch_size: int = 0,
                      workers: int = 1, engine: Optional[OcrEngine] = None) -> dict[str, float]:
    """Training-time hook: sample the prompts, OCR them (``engine``, default :func:`ocr_engine` of ``cfg``)
    and return the metrics to log.

    ``sample_fn(txts, capts, seed)`` must return uint8 ``[N, H, W, 3]`` (array or CPU tensor) or a list of
    N PIL images. Returns the metrics of :func:`textdiff.eval.metrics.aggregate` (rates that had no image to
    measure, e.g. no text-free prompt, are left out) with ``n``, ``n_text``, ``n_empty``.
    """
    images = sample_prompts(sample_fn, prompts, batch_size)
    report = evaluate_images(images, expand(prompts), cfg, workers=workers, progress=False, engine=engine)
    return finite(report.metrics)


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without the rates that had nothing to measure (NaN)."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}


@dataclass(frozen=True)
class EvalCondition:
    """How the prompts are sampled for one evaluation pass: transcription guidance ``guidance_txt``, and
    ``null_txt`` (sample the null transcription, scored against the prompt: the control)."""

    name: str
    guidance_txt: float
    null_txt: bool = False


def eval_conditions(cfg: EvalConfig, default_scale: float) -> list[EvalCondition]:
    """The passes of one evaluation: ``g<scale>`` for each of ``cfg.guidance_scales`` (or ``default_scale``
    alone when that is empty), then ``null`` with ``cfg.null_control`` (guidance is moot there: the guided
    and unguided predictions coincide)."""
    scales = list(cfg.guidance_scales) or [default_scale]
    out = [EvalCondition(f"g{s:g}", float(s)) for s in scales]
    if cfg.null_control:
        out.append(EvalCondition("null", 1.0, null_txt=True))
    return out
