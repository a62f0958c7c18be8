"""What a training run shows while it trains (textdiff/train/monitor.py's seam): the sample grid of
``train.sample_prompts`` every ``train.sample_every`` steps, and the spelling evaluation every ``eval.every``.

Both sample the EMA weights the trainer hands over (``train.sample_ema_rate``, else the first of
``ema.rates``) with the run's guidance and thresholding, in the run's compute dtype; the evaluation also
scores the weights of ``eval.averages`` (the raw weights, other EMAs) on the same prompts and seeds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from textdiff.config import TextdiffConfig
from textdiff.data.augment import to_tensor
from textdiff.data.preview import png_bytes, to_uint8
from textdiff.data.synthetic import render_sample
from textdiff.diffusion import build_diffusion
from textdiff.eval.prompts import eval_prompts, render_rng
from textdiff.eval.spelling import (EvalCondition, ceiling_report, check_ocr_engine, eval_conditions, evaluate_spelling,
                                    finite, ocr_engine)
from textdiff.files import atomic_write_bytes
from textdiff.formats.checkpoint import rate_key
from textdiff.ocr import OcrEngine, OcrError, OcrMissingError
from textdiff.sampling.cascade import StageSettings, sample_stage
from textdiff.sampling.loading import LoadedModel
from textdiff.sampling.prompts import Prompt, expand
from textdiff.sampling.samplers import default_grid
from textdiff.train.ema import average_decays
from textdiff.train.engine import compute_dtype
from textdiff.train.logging import EVAL_GRID_COLUMNS, append_jsonl, eval_scalars, image_grid, save_png
from textdiff.train.monitor import MonitorView

log = logging.getLogger(__name__)

PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TrainingMonitor:
    """The sample grid and the spelling evaluation of one run (rank 0 of it)."""

    def __init__(self, cfg: TextdiffConfig, run_dir: str | Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.diffusion = build_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
        self.precision = PRECISION_NAMES[compute_dtype(cfg.deepspeed)]
        self.ema_rate = cfg.train.sample_ema_rate if cfg.train.sample_ema_rate is not None else cfg.ema.rates[0]
        self.averages = [rate_key(self.ema_rate), *cfg.eval.averages]
        self.eval_prompts: list[Prompt] = []
        self.engine: Optional[OcrEngine] = None
        self.engine_version = ""
        self.ceiling: Optional[dict] = None  # the engine's figures on renders of the prompts, from the first eval

    def setup_error(self) -> Optional[str]:
        """Check that the OCR engine ``eval.ocr_engine`` is known and installed (the Tesseract program, the
        rapidocr package), build it and read the evaluation prompts (with ``eval.every``); the error, or None."""
        if not self.cfg.eval.every:
            return None
        kept = ["raw", *average_decays(self.cfg.ema)]
        unknown = [name for name in self.cfg.eval.averages if name not in kept]
        if unknown:
            return (f"eval.averages names {', '.join(unknown)}, which this run does not keep; choose from "
                    f"{', '.join(kept)} (ema.rates, ema.tracked, ema.power_sigma_rels)")
        size = self.cfg.model.low_res_size or self.cfg.model.image_size  # upsamplers are given renders of it
        try:
            check_ocr_engine(self.cfg.eval)
            self.eval_prompts = eval_prompts(self.cfg.eval, size=size)
            self.engine = ocr_engine(self.cfg.eval)
            self.engine_version = self.engine.version()
        except (OcrMissingError, OcrError, ValueError) as e:  # ConfigError and PromptFileError are ValueErrors
            return f"eval.every is {self.cfg.eval.every} but {e}; or set eval.every=0 to train without it"
        return None

    def grid_due(self, step: int, last: bool) -> bool:
        every = self.cfg.train.sample_every
        return bool(every) and (step % every == 0 or last)

    def eval_due(self, step: int, last: bool, stopping: bool) -> bool:
        """Skipped when stopping: the launcher kills a rank 30 s after SIGTERM."""
        every = self.cfg.eval.every
        return bool(every) and (step % every == 0 or last) and not stopping

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        return self.grid_due(step, last) or self.eval_due(step, last, stopping)

    def observe(self, view: MonitorView) -> None:
        if self.grid_due(view.step, view.last):
            self.sample_grid(view)
        if self.eval_due(view.step, view.last, view.stopping):
            self.evaluate(view)

    def _sample(self, model: torch.nn.Module, txt: list[Optional[str]], capt: list[str], seeds: list[int],
                steps: int, low_res: Optional[torch.Tensor], guidance_txt: Optional[float] = None,
                sampler: str = "ddim") -> torch.Tensor:
        """Sample ``model`` with the run's guidance (or ``guidance_txt``) and thresholding.

        txt (None: the null transcription), capt, seeds: N each; low_res: [N, C, s, s] in [-1, 1] for
        upsamplers. Returns [N, C, S, S] in [-1, 1].
        """
        cfg = self.cfg.train
        settings = StageSettings(sampler=sampler, steps=default_grid(sampler, str(steps)),
                                 guidance_txt=cfg.sample_guidance_scale_txt if guidance_txt is None else guidance_txt,
                                 guidance_capt=cfg.sample_guidance_scale_capt,
                                 dynamic_threshold=cfg.sample_dynamic_threshold)
        loaded = LoadedModel(model, self.diffusion, self.cfg, str(self.run_dir), "monitor")
        with torch.no_grad():
            return sample_stage(loaded, settings, txt, capt, seeds, low_res=low_res, precision=self.precision,
                                progress=False)

    def sample_grid(self, view: MonitorView) -> torch.Tensor:
        """Sample ``train.sample_prompts``; write the grid to TensorBoard (``samples/ema``) and
        ``RUN_DIR/samples/step_N.png``. Returns it ([3, H, W]). Upsamplers take their low-res inputs from the
        first training batch (the same images every time)."""
        cfg = self.cfg.train
        n = len(cfg.sample_prompts)
        captions = list(cfg.sample_captions) or [""] * n
        low_res = None
        if self.cfg.model.low_res_size:
            repeats = -(-n // view.first_batch["low_res"].shape[0])
            low_res = view.first_batch["low_res"].repeat(repeats, 1, 1, 1)[:n]
        images = self._sample(view.model, list(cfg.sample_prompts), captions, list(range(n)), cfg.sample_steps,
                              low_res)
        grid = image_grid(images, nrow=n)
        view.logger.image("samples/ema", view.step, grid)
        save_png(grid, self.run_dir / "samples" / f"step_{view.step:08d}.png")
        return grid

    def evaluate(self, view: MonitorView) -> Optional[dict]:
        """Spelling evaluation: sample the evaluation prompts (``eval.sampler`` at ``eval.steps``) under each
        condition of :func:`eval_conditions` (guidance scales, and the null transcription with
        ``eval.null_control``), read them with the OCR engine ``eval.ocr_engine``, log ``eval/*`` scalars (the
        first condition as ``eval/cer`` ..., each as ``eval/<condition>/cer`` ..., the null control as
        ``eval/cer_null``, the engine's ceiling on renders of the prompts at ``model.image_size`` as
        ``eval/ceiling/cer`` ...) and the ``eval/samples`` grid (one row block per condition), write the
        images under ``RUN_DIR/eval/step_N/`` with ``eval.save_images``, and append one line to
        ``RUN_DIR/eval.jsonl`` (naming the engine and its version). Returns that line's dict, or None when
        OCR failed (a warning is logged and training goes on: one OCR timeout on a busy machine must not end
        a run).
        """
        started = time.perf_counter()
        conditions = eval_conditions(self.cfg.eval, self.cfg.train.sample_guidance_scale_txt)
        shown: dict[str, list[torch.Tensor]] = {c.name: [] for c in conditions}
        try:
            results = {c.name: evaluate_spelling(
                lambda txt, capt, seed, c=c: self._eval_sample_fn(view.model, txt, capt, seed, shown[c.name], c),
                self.eval_prompts, self.cfg.eval, engine=self.engine) for c in conditions}
            if self.ceiling is None:
                self.ceiling = self._ceiling()
        except (OcrError, OcrMissingError) as e:
            log.warning("spelling evaluation at step %d failed, training goes on: %s", view.step, e)
            return None
        averages = self._score_averages(view, conditions[0])
        view.load(self.averages[0])  # the sampled EMA back in the model, for the grid of a later step
        first = results[conditions[0].name]
        record = {"step": view.step, "samples_seen": view.samples_seen, "time": round(time.time(), 3), **first,
                  "engine": self.engine.name, "engine_version": self.engine_version, "ceiling": self.ceiling,
                  "conditions": results, **({"averages": averages} if averages else {})}
        if "null" in results:
            record["cer_null"] = results["null"].get("cer")
        record["seconds"] = round(time.perf_counter() - started, 3)
        scalars = eval_scalars(first)
        for name, metrics in results.items():
            scalars.update({k.replace("eval/", f"eval/{name}/", 1): v for k, v in eval_scalars(metrics).items()})
        if "null" in results and "cer" in results["null"]:
            scalars["eval/cer_null"] = float(results["null"]["cer"])
        scalars.update({k.replace("eval/", "eval/ceiling/", 1): v for k, v in eval_scalars(self.ceiling).items()})
        for name, metrics in averages.items():
            scalars.update({k.replace("eval/", f"eval/avg/{name}/", 1): v for k, v in eval_scalars(metrics).items()})
        view.logger.scalars(view.step, scalars)
        images = torch.cat([torch.cat(shown[c.name]) for c in conditions])
        per_condition = len(images) // len(conditions)  # one row per condition up to 2 x 8 images
        columns = per_condition if per_condition <= 2 * EVAL_GRID_COLUMNS else EVAL_GRID_COLUMNS
        grid = image_grid(images, columns)
        view.logger.image("eval/samples", view.step, grid)
        if self.cfg.eval.save_images:
            self._save_eval_images(view.step, grid, shown)
        append_jsonl(self.run_dir / "eval.jsonl", record)
        log.info("eval at step %d (%.1f s): %s", view.step, record["seconds"],
                 ", ".join(f"{k} {v:.3f}" for k, v in scalars.items() if k.count("/") == 1))
        return record

    def _score_averages(self, view: MonitorView, condition: EvalCondition) -> dict[str, dict]:
        """Each of ``eval.averages`` scored as the first condition scores the sampled EMA: same prompts, seeds
        and engine (its images are not kept)."""
        out = {}
        for name in self.averages[1:]:
            model = view.load(name)
            out[name] = evaluate_spelling(lambda txt, capt, seed: self._eval_sample_fn(model, txt, capt, seed, [],
                                                                                       condition),
                                          self.eval_prompts, self.cfg.eval, engine=self.engine)
        return out

    def _ceiling(self) -> dict:
        """The engine's metrics on synthetic renders of the evaluation prompts at ``model.image_size``; empty,
        with a warning, when a prompt of ``eval.prompts_file`` is too long to render at that size."""
        try:
            report = ceiling_report(expand(self.eval_prompts), self.cfg.model.image_size, self.cfg.eval,
                                    engine=self.engine)
        except ValueError as e:
            log.warning("no OCR ceiling beside the spelling evaluation: %s", e)
            return {}
        return finite(report.metrics)

    def _save_eval_images(self, step: int, grid: torch.Tensor, shown: dict[str, list[torch.Tensor]]) -> None:
        """RUN_DIR/eval/step_N/grid.png and <condition>/NNN.png (prompt order of expand(eval prompts))."""
        out = self.run_dir / "eval" / f"step_{step:08d}"
        save_png(grid, out / "grid.png")
        for name, batches in shown.items():
            for i, array in enumerate(to_uint8(torch.cat(batches))):
                (out / name).mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out / name / f"{i:03d}.png", png_bytes(array))

    def _eval_sample_fn(self, model: torch.nn.Module, txt: list[str], capt: list[str], seed: int,
                        shown: list[torch.Tensor], condition: EvalCondition) -> np.ndarray:
        """evaluate_spelling's sample_fn under one eval condition: image j gets seed ``seed + j`` (as
        tools/sample.py numbers a prompt's images); the null control samples the null transcription in place
        of each prompt's; upsamplers upscale the synthetic render of each transcription. Returns uint8
        [N, S, S, 3]."""
        seeds = [seed + j for j in range(len(txt))]
        low_res = None
        if self.cfg.model.low_res_size:
            size = self.cfg.model.low_res_size
            low_res = torch.stack([to_tensor(np.asarray(render_sample(t, render_rng(s, 0), size).image.convert("RGB")))
                                   for t, s in zip(txt, seeds)])
        asked = [None] * len(txt) if condition.null_txt else list(txt)
        images = self._sample(model, asked, capt, seeds, self.cfg.eval.steps, low_res, condition.guidance_txt,
                              self.cfg.eval.sampler)
        shown.append(images.cpu())
        return to_uint8(images)
