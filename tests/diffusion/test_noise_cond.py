"""Specification of textdiff.diffusion.noise_cond: forward-noising of the low-res image."""

import math

import pytest
import torch

from textdiff.diffusion.noise_cond import noise_cond_alphas_cumprod, noise_low_res, sample_noise_cond_steps


def test_training_steps_are_uniform_on_0_to_max_step():
    steps = sample_noise_cond_steps(60000, 5, torch.Generator().manual_seed(0))
    counts = torch.bincount(steps)
    assert len(counts) == 6
    assert counts.min().item() > 9500 and counts.max().item() < 10500


def test_noised_low_res_has_the_forward_process_mean_and_variance():
    low_res = torch.full((4000, 3, 2, 2), 0.6)
    steps = torch.full((4000,), 300)
    noised = noise_low_res(low_res, steps, torch.Generator().manual_seed(0))
    abar = noise_cond_alphas_cumprod()[300].item()
    assert noised.mean().item() == pytest.approx(math.sqrt(abar) * 0.6, abs=0.01)
    assert noised.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_noise_cond_schedule_is_the_1000_step_cosine():
    abar = noise_cond_alphas_cumprod()
    assert len(abar) == 1000
    assert abar[599].item() == pytest.approx(math.cos(0.608 / 1.008 * math.pi / 2) ** 2
                                             / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rel=1e-9)


def test_steps_beyond_the_schedule_are_refused():
    with pytest.raises(ValueError, match="noise-conditioning steps"):
        noise_low_res(torch.zeros(2, 3, 2, 2), torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="model.noise_cond_max_step"):
        sample_noise_cond_steps(2, 1000)
