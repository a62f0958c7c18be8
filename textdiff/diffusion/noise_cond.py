"""Noise conditioning for upsamplers (Ho et al. 2021, cascaded diffusion).

The low-res image is noised with the forward process of a fixed 1000-step cosine schedule, independent of
the model's own diffusion settings: at a random step in [0, ``model.noise_cond_max_step``) in training (-1:
all 1000 steps), as the research code's ``EarlyOnlySampler``, and at a chosen step when sampling, where step 0
leaves the low-res image un-noised (the research code's ``noise_cond_ts=0``). The step is given to the model
(``noise_cond_t``), which embeds it.
"""

from __future__ import annotations

from typing import Optional

import torch

from textdiff.diffusion.gaussian import gaussian_noise, per_sample
from textdiff.diffusion.schedules import alphas_cumprod, cosine_betas

NOISE_COND_STEPS = 1000


def noise_cond_alphas_cumprod() -> torch.Tensor:
    """``alphas_cumprod`` of the 1000-step cosine schedule used for noise conditioning, ``[1000]`` float64."""
    return alphas_cumprod(cosine_betas(NOISE_COND_STEPS))


def noise_cond_step_limit(max_step: int) -> int:
    """The exclusive upper end of the training steps for ``model.noise_cond_max_step``: -1 means all
    :data:`NOISE_COND_STEPS`; otherwise 1..1000 as given. Raises ValueError naming the key."""
    if max_step == -1:
        return NOISE_COND_STEPS
    if not 1 <= max_step <= NOISE_COND_STEPS:
        raise ValueError(f"model.noise_cond_max_step is {max_step}; give -1 (all {NOISE_COND_STEPS} steps) or an "
                         f"exclusive limit in [1, {NOISE_COND_STEPS}] (the seed's 600: steps 0..599)")
    return max_step


def sample_noise_cond_steps(batch_size: int, max_step: int, generator: Optional[torch.Generator] = None,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """Training steps for noise conditioning: ``[batch_size]`` long, uniform on {0, ..., limit - 1} with
    ``limit = noise_cond_step_limit(max_step)``."""
    limit = noise_cond_step_limit(max_step)
    draw_on = generator.device if generator is not None else "cpu"
    return torch.randint(0, limit, (batch_size,), generator=generator, device=draw_on).to(device)


def noise_low_res(low_res: torch.Tensor, steps: torch.Tensor, generator: Optional[torch.Generator] = None,
                  noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward-noise ``low_res`` ``[N, C, h, w]`` to ``steps`` ``[N]`` of the noise-conditioning schedule.

    Returns ``sqrt(abar) low_res + sqrt(1 - abar) noise``; pass the same ``steps`` to the model.
    """
    steps = steps.long()
    if steps.shape != (low_res.shape[0],) or bool((steps < 0).any()) or bool((steps >= NOISE_COND_STEPS).any()):
        raise ValueError(f"noise-conditioning steps must be [N] = [{low_res.shape[0]}] integers in "
                         f"[0, {NOISE_COND_STEPS - 1}]; got shape {tuple(steps.shape)}")
    if noise is None:
        noise = gaussian_noise(low_res, generator)
    abar = per_sample(noise_cond_alphas_cumprod(), steps, low_res)
    return abar.sqrt() * low_res + (1 - abar).sqrt() * noise


def sampling_low_res(low_res: torch.Tensor, level: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The upsampler's low-res input at sampling noise ``level`` and its steps ``[N]``: level 0 leaves
    ``low_res`` ``[N, C, h, w]`` un-noised, as the research code's sampler does (training noises even step 0,
    by ``1 - abar_0`` ~ 4e-5 of variance); any other level is :func:`noise_low_res` with ``noise``."""
    steps = torch.full((low_res.shape[0],), level, dtype=torch.long)
    if level == 0:
        return low_res, steps
    return noise_low_res(low_res, steps, noise=noise), steps
