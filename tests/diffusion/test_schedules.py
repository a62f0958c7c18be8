"""Specification of textdiff.diffusion.schedules."""

import math

import pytest
import torch

from textdiff.diffusion.schedules import (alpha_bar_at, alphas_cumprod, betas_for, betas_from_alphas_cumprod,
                                          cosine_alpha_bar, cosine_betas, linear_betas, per_row)


def test_linear_betas_span_1e4_to_2e2_at_1000_steps():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)


def test_linear_betas_rescale_with_step_count():
    assert linear_betas(250)[-1].item() == pytest.approx(0.08)


def test_cosine_alphas_cumprod_follow_the_closed_form():
    abar = alphas_cumprod(cosine_betas(1000))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    expected = cosine_alpha_bar(t) / cosine_alpha_bar(torch.zeros(1, dtype=torch.float64))
    assert torch.allclose(abar[[99, 499, 899]], expected, rtol=1e-12)
    assert abar[499].item() == pytest.approx(math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) ** 2
                                             / math.cos(0.008 / 1.008 * math.pi / 2) ** 2)


def test_cosine_betas_are_clipped_at_0_999():
    assert cosine_betas(1000).max().item() == pytest.approx(0.999)


def test_unknown_schedule_names_the_config_key():
    with pytest.raises(ValueError, match="diffusion.noise_schedule"):
        betas_for("quadratic", 10)


def test_betas_round_trip_through_alphas_cumprod():
    betas = cosine_betas(100)
    assert torch.allclose(betas_from_alphas_cumprod(alphas_cumprod(betas)), betas, atol=1e-12)


def test_alpha_bar_at_is_exact_at_integers_and_log_linear_between():
    abar = alphas_cumprod(linear_betas(10))
    assert torch.equal(alpha_bar_at(abar, torch.tensor([3.0])), abar[3:4])
    mid = alpha_bar_at(abar, torch.tensor([3.5])).item()
    assert mid == pytest.approx(math.sqrt(abar[3].item() * abar[4].item()), rel=1e-12)


def test_per_row_gives_each_row_of_a_batch_its_own_value():
    x = torch.ones(3, 2, 4, 5)
    v = torch.tensor([1.0, 2.0, 3.0])
    scaled = per_row(v, x) * x
    assert per_row(v, x).shape == (3, 1, 1, 1) and per_row(v, torch.ones(3, 7)).shape == (3, 1)
    assert [float(scaled[i].min()) for i in range(3)] == [1.0, 2.0, 3.0]
    assert [float(scaled[i].max()) for i in range(3)] == [1.0, 2.0, 3.0]
