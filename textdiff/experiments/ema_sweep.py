"""Which EMA spells best: every average a finished spelling experiment kept, and EMAs of a range of widths
rebuilt after training from its power-function snapshots (EDM2's post-hoc EMA), each scored on the held-out
strings with the experiment's seeds, guidance and OCR engine (``tools/prove_spelling.py --ema-sweep OUT``).

The experiment must have trained with ``ema.power_sigma_rels`` and ``ema.snapshot_every`` (a snapshot is also
written at a run's last step, so the rebuilt EMAs and the tracked ones stand at the same step: the same
training budget). Writes ``OUT/ema_sweep.json`` and ``OUT/ema_sweep.png`` (CER against sigma_rel, the kept
averages as levels).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from textdiff.config import load_config
from textdiff.config.deepspeed_keys import zero_stage
from textdiff.data.preview import png_bytes
from textdiff.eval.spelling import ocr_engine
from textdiff.experiments.spelling import (REPO, Design, ExperimentError, cer_of, eval_targets, experiment_engines,
                                           heldout_strings, sample_strings)
from textdiff.files import atomic_write_bytes, atomic_write_json
from textdiff.formats.checkpoint import TEXTDIFF_STATE, complete_checkpoints, latest_checkpoint, load_untrusted
from textdiff.formats.weights import ema_state_dict, load_weights, raw_state_dict
from textdiff.sampling.loading import load_for_sampling
from textdiff.train.posthoc_ema import reconstruct

SIGMA_RELS = (0.02, 0.03, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)


def saved_design(out: Path) -> Design:
    """The design a finished experiment recorded in ``out/result.json``."""
    try:
        saved = json.loads((out / "result.json").read_text())["design"]
    except FileNotFoundError:
        raise ExperimentError(f"{out} holds no result.json; run tools/prove_spelling.py --out {out} first") from None
    return Design(**{**saved, "lengths": tuple(saved["lengths"]), "overrides": tuple(saved["overrides"]),
                     "engines": tuple(saved.get("engines", ()))})


def _scorer(out: Path, engine: str | None, eval_per_string: int | None = None):
    """(design, config, engine name, score(weights, label) -> {"cer", "exact"}) for ``out``'s experiment: the
    weights sample its held-out strings with its seeds, guidance and sampler, and the engine reads them."""
    design = saved_design(out)
    if eval_per_string is not None:
        design = replace(design, eval_per_string=eval_per_string)
    cfg = load_config(REPO / design.recipe, list(design.overrides))
    name = experiment_engines(cfg.eval, [engine] if engine else design.engines[:1])[0]
    targets, seeds = eval_targets(design, heldout_strings(design))
    loaded = load_for_sampling(out / "run", "ema")
    reader = ocr_engine(cfg.eval, name)

    def score(weights: dict, label: str) -> dict:
        load_weights(loaded.model, weights, label)
        images = sample_strings(loaded, targets, seeds, design, design.guidance, f"sample {label}")
        cer, exact, _ = cer_of([r.text for r in reader.read(images, workers=2, progress=False)], targets, cfg.eval)
        return {"cer": cer, "exact": exact}
    return design, cfg, name, score


def _kept_rows(ckpt: Path, cfg, score, averages: Sequence[str] = ()) -> list[dict]:
    """Every average checkpoint ``ckpt`` keeps, and its raw weights, scored (only those named in ``averages``,
    "raw" for the raw weights, when given; ExperimentError naming the checkpoint for a name it lacks)."""
    kept = list(load_untrusted(ckpt / TEXTDIFF_STATE)["ema"]["averages"])
    missing = [a for a in averages if a not in kept and a != "raw"]
    if missing:
        raise ExperimentError(f"{ckpt} keeps no average {', '.join(missing)}; it keeps {', '.join(kept)} and raw")
    rows = [{"average": key, **score(ema_state_dict(ckpt, key)[0], key)} for key in kept
            if not averages or key in averages]
    if averages and "raw" not in averages:
        return rows
    return rows + [{"average": "raw", **score(raw_state_dict(ckpt, zero_stage(cfg.deepspeed)), "raw")}]


def ema_curve(out: str | Path, engine: str | None = None, eval_per_string: int = 1, every: int = 0,
              averages: Sequence[str] = ()) -> dict:
    """Every average (and the raw weights) of every complete checkpoint ``out``'s run kept (with ``every``,
    only those at a multiple of ``every`` steps and the last), scored on the held-out strings
    (``eval_per_string`` images each; the experiment's seeds, guidance and engine): CER against samples seen
    per average (train with ``checkpoint.keep_every`` to keep the checkpoints); with ``averages``, only the
    averages of those names ("raw": the raw weights). Writes ``out/ema_curve.json``."""
    out = Path(out)
    design, cfg, name, score = _scorer(out, engine, eval_per_string)
    per_step = cfg.deepspeed["train_micro_batch_size_per_gpu"] * cfg.deepspeed.get("gradient_accumulation_steps", 1)
    found = complete_checkpoints(out / "run" / "checkpoints")
    if not found:
        raise ExperimentError(f"{out / 'run' / 'checkpoints'} holds no complete checkpoint")
    if every:
        found = [(step, ckpt) for step, ckpt in found if step % every == 0 or step == found[-1][0]]
    rows = [{"step": step, "samples_seen": step * per_step, **row} for step, ckpt in found
            for row in _kept_rows(ckpt, cfg, score, averages)]
    result = {"engine": name, "n_eval": len(heldout_strings(design)) * eval_per_string, "rows": rows}
    atomic_write_json(out / "ema_curve.json", result, indent=1)
    return result


def ema_sweep(out: str | Path, sigma_rels: Sequence[float] = SIGMA_RELS, engine: str | None = None) -> dict:
    """Score every average kept in ``out``'s last checkpoint (and the raw weights) and the power-function EMA
    of each of ``sigma_rels`` rebuilt at that step, with the experiment's first OCR engine (or ``engine``);
    returns and writes the table, the best rebuilt width and the best kept average."""
    out = Path(out)
    design, cfg, name, score = _scorer(out, engine)
    ckpt = latest_checkpoint(out / "run" / "checkpoints")
    if ckpt is None:
        raise ExperimentError(f"{out / 'run' / 'checkpoints'} holds no complete checkpoint")
    step = int(ckpt.name.removeprefix("step_"))
    targets, _ = eval_targets(design, heldout_strings(design))
    rows = [{**row, "kind": "kept"} for row in _kept_rows(ckpt, cfg, score)]
    for sigma_rel in sigma_rels:
        rec = reconstruct(out / "run", sigma_rel, step)
        rows.append({"average": f"posthoc:{sigma_rel:g}", "kind": "rebuilt", "sigma_rel": sigma_rel,
                     "fit": rec.fit, **score(rec.weights, f"rebuilt sigma_rel {sigma_rel:g}")})
    rebuilt = [r for r in rows if r["kind"] == "rebuilt"]
    result = {"step": step, "engine": name, "n_eval": len(targets), "rows": rows,
              "best_rebuilt": min(rebuilt, key=lambda r: r["cer"]),
              "best_kept": min((r for r in rows if r["kind"] == "kept"), key=lambda r: r["cer"])}
    atomic_write_json(out / "ema_sweep.json", result, indent=1)
    atomic_write_bytes(out / "ema_sweep.png", png_bytes(sweep_chart(rows, step, name)))
    return result


def sweep_chart(rows: Sequence[dict], step: int, engine: str, width: int = 560, height: int = 300) -> np.ndarray:
    """CER against sigma_rel for the rebuilt EMAs (points joined), each kept average as a labelled level:
    uint8 [height, width, 3]. The scale reaches 1.5x the worst rebuilt CER (at least 0.05); kept averages
    above it are named, with their CER, under the chart instead."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=11)
    left, right, top, bottom = 50, width - 150, 24, height - 48
    rebuilt = sorted((r for r in rows if r["kind"] == "rebuilt"), key=lambda r: r["sigma_rel"])
    lo, hi = 0.0, max(0.05, 1.5 * max(r["cer"] for r in rebuilt))
    s_lo, s_hi = rebuilt[0]["sigma_rel"], rebuilt[-1]["sigma_rel"]

    def xy(sigma: float, cer: float) -> tuple[float, float]:
        x = left + (sigma - s_lo) / max(s_hi - s_lo, 1e-9) * (right - left)
        return x, bottom - (cer - lo) / (hi - lo) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text((left, 4), f"held-out CER ({engine}) at step {step}: rebuilt EMA by sigma_rel; kept averages", fill=0,
              font=font)
    for frac in (0.0, 0.5, 1.0):
        cer = lo + frac * (hi - lo)
        draw.text((4, xy(s_lo, cer)[1] - 6), f"{cer:.3f}", fill=(0, 0, 0), font=font)
    for r in rebuilt:
        draw.text((xy(r["sigma_rel"], lo)[0] - 10, bottom + 4), f"{r['sigma_rel']:g}", fill=(0, 0, 0), font=font)
    draw.line([xy(r["sigma_rel"], r["cer"]) for r in rebuilt], fill=(200, 40, 40), width=2)
    for r in rebuilt:
        x, y = xy(r["sigma_rel"], r["cer"])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(200, 40, 40))
    kept = [r for r in rows if r["kind"] == "kept"]
    shown = sorted((r for r in kept if r["cer"] <= hi), key=lambda r: -r["cer"])  # top of the chart first
    label_y = top - 12.0
    for i, r in enumerate(shown):
        y = xy(s_lo, r["cer"])[1]
        colour = tuple(int(c) for c in (40 + 50 * i % 200, 90, 200 - 30 * i % 150))
        draw.line((left, y, right, y), fill=colour, width=1)
        label_y = max(y - 6, label_y + 12)  # labels stacked 12 px apart where levels crowd
        draw.text((right + 6, label_y), f"{r['average']} {r['cer']:.3f}", fill=colour, font=font)
    off = [f"{r['average']} {r['cer']:.3f}" for r in kept if r["cer"] > hi]
    if off:
        draw.text((left, height - 28), "off scale: " + ", ".join(off), fill=(0, 0, 0), font=font)
    draw.text((left, height - 14), "sigma_rel", fill=(0, 0, 0), font=font)
    return np.asarray(image)
