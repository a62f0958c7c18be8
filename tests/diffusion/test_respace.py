"""Specification of textdiff.diffusion.respace."""

import pytest
import torch

from textdiff.diffusion.gaussian import GaussianDiffusion
from textdiff.diffusion.respace import respace, space_timesteps
from textdiff.diffusion.schedules import cosine_betas


def test_count_spec_keeps_both_ends():
    assert space_timesteps(1000, "5") == [0, 250, 500, 749, 999]


def test_ddim_spec_keeps_every_stride_from_zero():
    assert space_timesteps(1000, "ddim50")[:3] == [0, 20, 40]
    assert len(space_timesteps(1000, "ddim50")) == 50


def test_section_spec_spreads_each_section():
    assert space_timesteps(30, "2,3,1") == [0, 9, 10, 14, 19, 20]


def test_bad_specs_name_the_config_key():
    for spec in ("abc", "ddim7x", "20,20"):
        with pytest.raises(ValueError, match="diffusion.timestep_respacing"):
            space_timesteps(30, spec)


def test_respacing_keeps_alphas_cumprod_at_kept_steps():
    full = GaussianDiffusion(cosine_betas(1000), learn_sigma=True)
    kept = space_timesteps(1000, "25")
    short = respace(full, kept)
    assert short.num_timesteps == 25
    assert torch.allclose(short.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    assert short.timestep_map.tolist() == kept
