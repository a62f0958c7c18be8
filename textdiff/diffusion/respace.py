"""Timestep respacing: a shorter process that keeps ``alphas_cumprod`` at a subset of the original steps
(which subset a spec names: textdiff/config/respacing.py)."""

from __future__ import annotations

import torch

from textdiff.diffusion.gaussian import GaussianDiffusion
from textdiff.diffusion.schedules import betas_from_alphas_cumprod


def respace(diffusion: GaussianDiffusion, kept: list[int]) -> GaussianDiffusion:
    """The process over steps ``kept`` (indices of ``diffusion``), with the same ``alphas_cumprod`` there.

    The new betas are ``1 - abar[k_i] / abar[k_{i-1}]``; ``timestep_map`` points back to the original steps.
    """
    if not kept or sorted(set(kept)) != list(kept) or kept[0] < 0 or kept[-1] >= diffusion.num_timesteps:
        raise ValueError(f"kept steps must be increasing, unique and in [0, {diffusion.num_timesteps})")
    index = torch.tensor(kept, dtype=torch.long)
    return GaussianDiffusion(betas_from_alphas_cumprod(diffusion.alphas_cumprod[index]),
                             timestep_map=diffusion.timestep_map[index], num_train_steps=diffusion.num_train_steps,
                             **diffusion.options())
