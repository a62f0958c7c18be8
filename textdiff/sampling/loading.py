"""Load a trained model and its diffusion process for sampling, from any source textdiff/formats/weights.py
reads (a run directory, a checkpoint, an export)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from textdiff.config import TextdiffConfig
from textdiff.diffusion import GaussianDiffusion, build_diffusion
from textdiff.formats.export import is_export, read_export
from textdiff.formats.weights import (WEIGHTS, checkpoint_weights, load_weights, read_source_config,
                                      resolve_checkpoint)
from textdiff.models import build_model


@dataclass
class LoadedModel:
    """A model ready to sample: the U-net (eval mode, on its device), its process and config, and where the
    weights came from (``source``: the resolved path; ``weights``: ``"ema:<rate>"``, ``"raw"`` or ``"export"``)."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    cfg: TextdiffConfig
    source: str
    weights: str


def load_for_sampling(source: str | Path, weights: str = "ema", ema_rate: Optional[float] = None,
                      device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model and diffusion of ``source`` and load its weights (textdiff/formats/weights.py).

    ``weights`` is ``"ema"`` or ``"raw"`` for checkpoints; an export holds the one set it was written with,
    so ``weights`` and ``ema_rate`` do not apply to it. The model is returned in eval mode on ``device``.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights is {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if is_export(source):
        cfg, state = read_export(source)
        where, label = str(source), "export"
    else:
        ckpt = resolve_checkpoint(source)
        cfg = read_source_config(ckpt)
        where = str(ckpt)
        state, label = checkpoint_weights(ckpt, cfg, weights, ema_rate)
    model = build_model(cfg.model)
    load_weights(model, state, where)
    diffusion = build_diffusion(cfg.diffusion, learn_sigma=cfg.model.learn_sigma)
    return LoadedModel(model=model.to(device).eval(), diffusion=diffusion, cfg=cfg, source=where, weights=label)
