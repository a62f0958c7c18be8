"""Specification of textdiff.diffusion.respace (which steps a spec keeps: tests/config/test_respacing.py)."""

import torch

from textdiff.config.respacing import space_timesteps
from textdiff.diffusion.gaussian import GaussianDiffusion
from textdiff.diffusion.respace import respace
from textdiff.diffusion.schedules import cosine_betas


def test_respacing_keeps_alphas_cumprod_at_kept_steps():
    full = GaussianDiffusion(cosine_betas(1000), learn_sigma=True)
    kept = space_timesteps(1000, "25")
    short = respace(full, kept)
    assert short.num_timesteps == 25
    assert torch.allclose(short.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    assert short.timestep_map.tolist() == kept


