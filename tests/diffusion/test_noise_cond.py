"""Specification of textdiff.diffusion.noise_cond: forward-noising of the low-res image."""

import math

import pytest
import torch

from textdiff.config import ModelConfig
from textdiff.diffusion.noise_cond import (noise_cond_alphas_cumprod, noise_cond_step_limit, noise_low_res,
                                            sample_noise_cond_steps, sampling_low_res)


def test_training_steps_are_uniform_on_0_to_max_step_exclusive():
    steps = sample_noise_cond_steps(60000, 6, torch.Generator().manual_seed(0))
    counts = torch.bincount(steps)
    assert len(counts) == 6 and steps.max().item() == 5  # max_step itself is never drawn
    # each step has p = 1/6: 10000 expected, sd sqrt(60000 p (1 - p)) = 91, so +-500 is over 5 sd
    assert counts.min().item() > 9500 and counts.max().item() < 10500


def test_max_step_minus_one_means_all_1000_steps_and_600_means_0_to_599():
    assert noise_cond_step_limit(-1) == 1000
    steps = sample_noise_cond_steps(200000, -1, torch.Generator().manual_seed(1))
    assert steps.min().item() == 0 and steps.max().item() == 999
    # step 0 has p = 1/1000: 200 expected, sd 14; +-60 is over 4 sd
    assert 140 < int((steps == 0).sum()) < 260
    seed = sample_noise_cond_steps(200000, 600, torch.Generator().manual_seed(2))
    assert seed.max().item() == 599 and 273 < int((seed == 0).sum()) < 393  # p = 1/600: 333 expected, sd 18


def test_step_0_at_sampling_leaves_the_low_res_image_un_noised():
    low_res = torch.full((2, 3, 4, 4), 0.6)
    noise = torch.randn(low_res.shape, generator=torch.Generator().manual_seed(0))
    clean, steps = sampling_low_res(low_res, 0, noise)
    assert torch.equal(clean, low_res) and steps.tolist() == [0, 0]
    noisy, steps = sampling_low_res(low_res, 1, noise)
    abar = noise_cond_alphas_cumprod()[1].item()
    assert torch.allclose(noisy, math.sqrt(abar) * low_res + math.sqrt(1 - abar) * noise, atol=1e-6)
    assert steps.tolist() == [1, 1]


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
    for bad in (0, 1001, -2):
        with pytest.raises(ValueError, match="model.noise_cond_max_step"):
            sample_noise_cond_steps(2, bad)
    ModelConfig(image_size=64, low_res_size=16, noise_cond=True, noise_cond_max_step=1000).validate()
