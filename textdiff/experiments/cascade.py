"""The cascade experiment of tools/prove_cascade.py: does a 32 -> 64 px upsampler trained on 2 CPU cores turn the
spelling model's samples into legible 64 px text?

1. data: the spelling task's training strings rendered at 64 px and sharded (the same split as the base
   model's: held-out strings are never in a shard); the upsampler learns from their 32 px versions, made by
   the training stream's own downsampling (``augment.antialias``/``bicubic_down``);
2. training: ``ds_configs/up64_cpu.json`` (the research upsampler's design at a size that trains on 2 cores)
   through the DeepSpeed launcher for the minutes the budget leaves; a rerun resumes;
3. evaluation, on the held-out strings and seeds of the base experiment (``--base``: its saved 32 px samples):
   OCR of the base samples (``cer_base32``), of them upscaled by bicubic interpolation (``cer_bicubic64``) and
   through the upsampler at each noise-conditioning level (``cer_cascade64``); and of the upsampler on real
   32 px renders downsampled as in its training (``cer_up_real``), with PSNR and SSIM of its output and of
   bicubic's against the real 64 px renders. Each CER comes with the engine's ceiling at that size (real
   renders of the same strings).

Everything it writes lies under ``--out``: ``data/``, ``run/``, ``eval/`` (the images, ``grid.png``) and
``result.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from textdiff.config import load_config
from textdiff.data.augment import downsample, to_tensor
from textdiff.data.preview import png_bytes, to_uint8
from textdiff.eval.spelling import ocr_engine
from textdiff.experiments import spelling_set
from textdiff.experiments.spelling import (REPO, Design, ExperimentError, cer_of, eval_targets, experiment_engines,
                                           heldout_strings, prepare_data, train_model)
from textdiff.files import atomic_write_bytes, atomic_write_json
from textdiff.formats.checkpoint import complete_checkpoints
from textdiff.sampling.cascade import StageSettings, sample_stage
from textdiff.sampling.loading import load_for_sampling
from textdiff.sampling.samplers import default_grid

RESULT_KEYS = ("engine", "cer_base32", "cer_bicubic64", "cer_cascade64", "cer_up_real", "cer_bicubic_real",
               "psnr_up", "psnr_bicubic", "ssim_up", "ssim_bicubic", "ceiling32", "ceiling64", "level", "steps",
               "samples_seen", "minutes", "n_eval")


def eval_minutes(n: int, levels: int, steps: int) -> float:
    """Minutes reserved for the evaluation of ``n`` held-out images: the upsampler at ``levels`` noise levels and
    once on real renders, ``steps`` sampling steps each, and OCR of 6 + levels image sets. Measured on the
    2-core machine with up64_cpu.json: 0.012 s per image and step of upsampling, 0.03 s per image of OCR;
    1.25x that, plus a minute to load and write."""
    return 1.0 + 1.25 * (n * (levels + 1) * steps * 0.012 + n * (6 + levels) * 0.03) / 60


@dataclass(frozen=True)
class CascadeDesign:
    """The upsampler's experiment (recorded in result.json)."""

    base: str  # a finished spelling experiment's --out: its saved held-out samples are the cascade's input
    recipe: str = "ds_configs/up64_cpu.json"
    overrides: tuple[str, ...] = field(default_factory=tuple)
    size: int = 64
    renders: int = 16
    sampler: str = "ipndm"
    steps: int = 20
    levels: tuple[int, ...] = (0, 100, 200, 400)  # noise-conditioning levels sampled (only 0 without it)
    engine: str = ""  # OCR engine; "" the recipe's eval.ocr_engine


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images [H, W, 3] (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004) of two uint8 images [H, W, 3]: an 11-tap Gaussian window of
    sigma 1.5, constants (0.01 L)^2 and (0.03 L)^2 with L = 255, averaged over pixels and channels."""
    x = torch.tensor(a, dtype=torch.float64).permute(2, 0, 1)[:, None]  # [3, 1, H, W]
    y = torch.tensor(b, dtype=torch.float64).permute(2, 0, 1)[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def bicubic(images: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """Each uint8 image resized to ``size`` px by bicubic interpolation (what a user gets without an upsampler)."""
    return [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images]


def upsample(loaded, low: Sequence[np.ndarray], targets: Sequence[str], seeds: Sequence[int],
             design: CascadeDesign, level: int, batch: int = 64) -> list[np.ndarray]:
    """The upsampler ``loaded`` on 32 px uint8 images ``low`` with their transcriptions: uint8 64 px images."""
    settings = StageSettings(sampler=design.sampler, steps=default_grid(design.sampler, str(design.steps)),
                             noise_cond_level=level)
    out: list[np.ndarray] = []
    for i in range(0, len(low), batch):
        x = torch.stack([to_tensor(im) for im in low[i:i + batch]])
        with torch.no_grad():
            images = sample_stage(loaded, settings, list(targets[i:i + batch]), [""] * len(x), list(seeds[i:i + batch]),
                                  stage=1, low_res=x, progress=False)
        out.extend(to_uint8(images))
    return out


def base_samples(base: Path, targets: Sequence[str]) -> list[np.ndarray]:
    """The base experiment's saved held-out samples with the transcription (``eval/samples.jsonl``), in the
    order of ``targets``, which must be the ones it sampled."""
    try:
        records = [json.loads(line) for line in (base / "eval" / "samples.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        raise ExperimentError(f"--base {base} holds no eval/samples.jsonl; give a finished tools/prove_spelling.py "
                              "--out") from None
    txt = [r for r in records if r["condition"] == "txt"]
    if [r["target"] for r in txt] != list(targets):
        raise ExperimentError(f"--base {base} sampled other held-out strings than this design's (another --seed or "
                              "--eval-per-string?); use the base experiment's settings")
    return [np.asarray(Image.open(base / "eval" / r["image"]).convert("RGB")) for r in txt]


def real_low_res(real: Sequence[np.ndarray], cfg) -> list[np.ndarray]:
    """Real 64 px renders brought to ``model.low_res_size`` as the upsampler's training stream does
    (``augment.antialias``, ``bicubic_down``, ``low_res_clamp``; no blur): uint8."""
    size, aug = cfg.model.low_res_size, cfg.augment
    return [to_uint8(downsample(to_tensor(im), size, aug.antialias, aug.bicubic_down, aug.low_res_clamp)[None])[0]
            for im in real]


def cascade_grid(rows: Sequence[tuple[str, list[np.ndarray], list[str]]], n: int = 12, size: int = 64) -> Image.Image:
    """Columns ``(title, images, labels)`` side by side for the first ``n`` strings, every image shown at
    ``size`` px (nearest neighbour), each labelled ``asked>read``."""
    font = ImageFont.load_default(size=11)
    gap, label = 6, 13
    grid = Image.new("RGB", (len(rows) * (size + gap) + gap, 18 + n * (size + label + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, (title, images, labels) in enumerate(rows):
        x = gap + c * (size + gap)
        draw.text((x, 3), title, fill=(0, 0, 0), font=font)
        for r in range(min(n, len(images))):
            y = 18 + r * (size + label + 4)
            grid.paste(Image.fromarray(images[r]).resize((size, size), Image.NEAREST), (x, y))
            draw.text((x, y + size + 1), labels[r], fill=(0, 0, 0), font=font)
    return grid


def evaluate(out: Path, design: CascadeDesign, spelling: Design, cfg) -> dict:
    """Score the base samples, their bicubic and cascaded upscalings, and the upsampler on real low-res
    renders (see the module docstring); writes ``out/eval/``; returns result.json's figures."""
    targets, seeds = eval_targets(spelling, heldout_strings(spelling))
    engine = ocr_engine(cfg.eval, experiment_engines(cfg.eval, [design.engine] if design.engine else [])[0])
    up = load_for_sampling(out / "run", "ema")
    low = base_samples(Path(design.base), targets)
    real64 = [np.asarray(spelling_set.render_string(t, spelling_set.render_rng(spelling.seed + 7919, t, i), 64)[0])
              for i, t in enumerate(targets)]
    real32 = [np.asarray(spelling_set.render_string(t, spelling_set.render_rng(spelling.seed + 7919, t, i), 32)[0])
              for i, t in enumerate(targets)]
    real_low = real_low_res(real64, cfg)
    levels = design.levels if cfg.model.noise_cond else (0,)
    images = {"base32": low, "bicubic64": bicubic(low, design.size), "real64": real64, "real32": real32,
              "bicubic_real": bicubic(real_low, design.size), "up_real": upsample(up, real_low, targets, seeds, design, 0)}
    for level in levels:
        images[f"cascade64@{level}"] = upsample(up, low, targets, seeds, design, level)

    readings, figures = {}, {}
    for name, ims in images.items():
        readings[name] = [r.text for r in engine.read(ims, workers=2, progress=False)]
        figures[name] = cer_of(readings[name], targets, cfg.eval)
    by_level = {level: figures[f"cascade64@{level}"][0] for level in levels}
    ev = out / "eval"
    for name, ims in images.items():
        for i, im in enumerate(ims[:32]):
            (ev / name.replace("@", "_")).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(ev / name.replace("@", "_") / f"{i:04d}.png", png_bytes(im))
    shown = ["base32", "bicubic64", f"cascade64@{levels[0]}", "real64"]
    grid = cascade_grid([(k.replace("@0", ""), images[k], [f"{t}>{r or '-'}" for t, r in zip(targets, readings[k])])
                         for k in shown])
    atomic_write_bytes(ev / "grid.png", png_bytes(np.asarray(grid)))
    pairs = list(zip(images["up_real"], images["bicubic_real"], real64))
    return {"engine": engine.name, "engine_version": engine.version(), "n_eval": len(targets),
            "cer_base32": figures["base32"][0], "cer_bicubic64": figures["bicubic64"][0],
            "cer_cascade64": by_level[levels[0]], "level": levels[0], "cer_cascade64_by_level": by_level,
            "cer_up_real": figures["up_real"][0], "cer_bicubic_real": figures["bicubic_real"][0],
            "ceiling32": figures["real32"][0], "ceiling64": figures["real64"][0],
            "exact": {k: v[1] for k, v in figures.items()},
            "psnr_up": float(np.mean([psnr(u, r) for u, _, r in pairs])),
            "psnr_bicubic": float(np.mean([psnr(b, r) for _, b, r in pairs])),
            "ssim_up": float(np.mean([ssim(u, r) for u, _, r in pairs])),
            "ssim_bicubic": float(np.mean([ssim(b, r) for _, b, r in pairs]))}


def spelling_design(design: CascadeDesign) -> Design:
    """The base experiment's design (its split, seeds and evaluation), with this upsampler's recipe and size."""
    try:
        saved = json.loads((Path(design.base) / "result.json").read_text())["design"]
    except FileNotFoundError:
        raise ExperimentError(f"--base {design.base} holds no result.json; give a finished tools/prove_spelling.py "
                              "--out") from None
    base = Design(**{**saved, "lengths": tuple(saved["lengths"]), "overrides": tuple(saved["overrides"]),
                     "engines": tuple(saved.get("engines", ()))})
    return replace(base, size=design.size, renders=design.renders, recipe=design.recipe, overrides=design.overrides,
                   guidance=1.0, sampler=design.sampler, steps=design.steps)


def run_cascade_experiment(out: str | Path, minutes: float, design: CascadeDesign) -> dict:
    """Data, training within ``minutes`` (minus the evaluation's reserve), evaluation; returns result.json's
    object (also written to ``out/result.json``)."""
    started = time.monotonic()
    out = Path(out)
    spelling = spelling_design(design)
    cfg = load_config(REPO / design.recipe, list(design.overrides))
    if not cfg.model.low_res_size:
        raise ExperimentError(f"--recipe {design.recipe} is no upsampler (model.low_res_size is 0)")
    manifest, _, _ = prepare_data(out, spelling, progress=True)
    n = len(heldout_strings(spelling)) * spelling.eval_per_string
    reserve = eval_minutes(n, len(design.levels) if cfg.model.noise_cond else 1, design.steps)
    left = minutes - (time.monotonic() - started) / 60 - reserve - 0.75
    if left < 0.25:
        raise ExperimentError(f"--minutes {minutes:g} leaves {left:.2f} min for training after the data and the "
                              f"evaluation's reserve ({reserve:.1f} min); give more minutes")
    proc = train_model(out, spelling, manifest, left, design.engine or cfg.eval.ocr_engine)
    if proc.returncode != 0:
        raise ExperimentError(f"training exited with status {proc.returncode}; see its output above")
    figures = evaluate(out, design, spelling, cfg)
    step = complete_checkpoints(out / "run" / "checkpoints")[-1][0]
    result = {**figures, "steps": step, "samples_seen": step * cfg.deepspeed["train_micro_batch_size_per_gpu"]
              * cfg.deepspeed.get("gradient_accumulation_steps", 1),
              "minutes": round((time.monotonic() - started) / 60, 2),
              "design": {**asdict(design), "overrides": list(design.overrides), "levels": list(design.levels)}}
    atomic_write_json(out / "result.json", result, indent=1)
    return result


def reevaluate(out: str | Path, design: Optional[CascadeDesign] = None) -> dict:
    """Evaluate a trained upsampler in ``out`` again (no training), with its recorded design or ``design``."""
    out = Path(out)
    if design is None:
        saved = json.loads((out / "result.json").read_text())["design"]
        design = CascadeDesign(**{**saved, "overrides": tuple(saved["overrides"]), "levels": tuple(saved["levels"])})
    cfg = load_config(REPO / design.recipe, list(design.overrides))
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    result.update(evaluate(out, design, spelling_design(design), cfg))
    atomic_write_json(out / "result.json", result, indent=1)
    return result
