"""Noise schedules: the betas of the forward process and their cumulative products.

All tensors are float64 so that ``alphas_cumprod`` keeps its precision near 0 and 1; callers cast to the
working dtype when they index into them.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def linear_betas(num_steps: int) -> torch.Tensor:
    """Ho et al. (2020) linear betas, scaled so any ``num_steps`` spans the same noise range as 1000 steps.

    Returns ``[num_steps]`` float64, increasing from ``1e-4 * 1000 / num_steps`` to ``0.02 * 1000 / num_steps``.
    """
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021) continuous ``alpha_bar(t)`` for ``t`` in [0, 1] (any shape, float64 out)."""
    t = t.to(torch.float64)
    return torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose cumulative product follows :func:`cosine_alpha_bar`, clipped at ``max_beta``.

    Returns ``[num_steps]`` float64; the clip keeps the last step from destroying the signal with beta = 1.
    """
    edges = cosine_alpha_bar(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)
    return (1 - edges[1:] / edges[:-1]).clamp(max=max_beta)


def betas_for(name: str, num_steps: int) -> torch.Tensor:
    """The ``[num_steps]`` betas of the schedule called ``name`` (``diffusion.noise_schedule``)."""
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"diffusion.noise_schedule is {name!r}; choose one of {', '.join(SCHEDULES)}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """``prod_{s <= t} (1 - beta_s)`` for each ``t``: ``[T]`` -> ``[T]`` float64."""
    return torch.cumprod(1 - betas.to(torch.float64), dim=0)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`alphas_cumprod`: the betas of a process with these cumulative products, ``[K]``."""
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1 - alphas_cumprod / prev


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` ``[N]`` viewed as ``[N, 1, ..., 1]``, with as many dimensions as ``like`` ``[N, ...]``, so
    that each row of ``like`` meets its own value."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def interp_at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``values[t]`` for fractional indices ``t`` (any shape, clamped to [0, K-1]).

    ``values``: ``[K]``; integer ``t`` returns the entries exactly. Result is float64, shaped like ``t``.
    """
    values = values.to(torch.float64)
    t = t.to(device=values.device, dtype=torch.float64).clamp(0, len(values) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(values) - 1)
    w = t - lo
    return values[lo] * (1 - w) + values[hi] * w


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod`` at fractional indices ``t``, interpolated in log space (exact at integers).

    ``t`` may be a float of any shape; samplers use half steps (PRK) between the kept integer steps.
    """
    return interp_at(alphas_cumprod.to(torch.float64).log(), t).exp()
