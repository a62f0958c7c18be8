"""Thresholding of the x_0 prediction, as wrappers of a sampler's ``model_fn(x, t)``.

The wrapper turns the model's eps into x_0, thresholds it, and turns it back into eps, so every sampler
and every step count gets it unchanged; a learned-variance half passes through untouched.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from textdiff.diffusion.schedules import alpha_bar_at, per_row

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding of ``x0`` ``[N, ...]``, per sample.

    ``s`` = the ``percentile`` quantile of ``|x0|`` in each sample, at least 1; ``x0`` is clipped to
    ``[-s, s]`` and divided by ``s``. With ``s = 1`` this is plain clipping to [-1, 1].
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic thresholding percentile is {percentile}; it must lie in (0, 1]")
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = per_row(s, x0)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def clip(x0: torch.Tensor) -> torch.Tensor:
    """Plain clipping of ``x0`` to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


def threshold_model(model_fn: ModelFn, alphas_cumprod: torch.Tensor,
                    threshold: Callable[[torch.Tensor], torch.Tensor]) -> ModelFn:
    """Wrap ``model_fn(x, t) -> eps[, v]`` so the x_0 it implies is passed through ``threshold``.

    ``alphas_cumprod`` ``[K]`` is the schedule ``t`` indexes (fractional ``t`` interpolated as the
    samplers do).
    """
    def wrapped(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(x, t)
        channels = x.shape[1]
        abar = per_row(alpha_bar_at(alphas_cumprod, t).to(x.device, x.dtype, non_blocking=True), x)
        x0 = threshold((x - (1 - abar).sqrt() * out[:, :channels]) / abar.sqrt())
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, out[:, channels:]], dim=1)
    return wrapped


def dynamic_thresholding(model_fn: ModelFn, alphas_cumprod: torch.Tensor, percentile: float = 0.995) -> ModelFn:
    """``model_fn`` with Imagen's dynamic thresholding at ``percentile`` applied to its x_0."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic thresholding percentile is {percentile}; it must lie in (0, 1]")
    return threshold_model(model_fn, alphas_cumprod, lambda x0: dynamic_threshold(x0, percentile))


def clipping(model_fn: ModelFn, alphas_cumprod: torch.Tensor) -> ModelFn:
    """``model_fn`` with its x_0 clipped to [-1, 1]."""
    return threshold_model(model_fn, alphas_cumprod, clip)
