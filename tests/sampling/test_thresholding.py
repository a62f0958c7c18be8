"""Specification of textdiff.sampling.thresholding."""

import pytest
import torch

from textdiff.bench.mixture import GaussianMixture
from textdiff.diffusion.schedules import alphas_cumprod, cosine_betas
from textdiff.sampling.samplers import SAMPLERS, sample, sampling_timesteps
from textdiff.sampling.thresholding import clip, clipping, dynamic_threshold, dynamic_thresholding

ABAR = alphas_cumprod(cosine_betas(1000))


def test_dynamic_threshold_divides_by_the_percentile_of_abs_x0():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.0]])
    # |x0| sorted: 0.5, 1, 2, 3; the median interpolates to s = 1.5
    assert torch.allclose(dynamic_threshold(x0, 0.5), torch.tensor([[1 / 3, -1.0, 1.0, 2 / 3]]))
    assert torch.allclose(dynamic_threshold(x0, 1.0), torch.tensor([[0.5 / 3, -1.0, 2 / 3, 1 / 3]]))


def test_dynamic_threshold_is_plain_clipping_when_the_percentile_is_below_1():
    x0 = torch.tensor([[0.2, -0.4, 0.9, 1.5]], dtype=torch.float64)  # 0.5 quantile of |x0| is 0.65 -> s = 1
    assert torch.equal(dynamic_threshold(x0, 0.5), clip(x0))
    assert clip(x0).tolist() == [[0.2, -0.4, 0.9, 1.0]]


def test_dynamic_threshold_is_per_sample():
    x0 = torch.tensor([[4.0, 2.0], [0.5, 0.25]])
    assert dynamic_threshold(x0, 1.0).tolist() == [[1.0, 0.5], [0.5, 0.25]]


def test_wrapper_thresholds_the_implied_x0_and_keeps_the_variance_half():
    abar = ABAR[500].item()
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    x0 = torch.tensor([[3.0, -1.5]], dtype=torch.float64)
    eps = (x - abar ** 0.5 * x0) / (1 - abar) ** 0.5
    model_fn = lambda x_, t: torch.cat([eps, torch.full_like(eps, 0.7)], dim=1)  # noqa: E731
    out = dynamic_thresholding(model_fn, ABAR, 1.0)(x, torch.tensor([500.0], dtype=torch.float64))
    implied = (x - (1 - abar) ** 0.5 * out[:, :2]) / abar ** 0.5
    assert torch.allclose(implied, torch.tensor([[1.0, -0.5]], dtype=torch.float64))
    assert out[:, 2:].tolist() == [[0.7, 0.7]]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_with_thresholding_stays_in_range(name):
    far = GaussianMixture(weights=(0.5, 0.5), means=((-3.0, 2.0), (2.5, -3.0)), stds=(0.3, 0.3))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = sampling_timesteps(1000, "logsnr8", ABAR)
    # DDIM and DDPM end on one thresholded x_0 prediction. The higher-order last steps extrapolate the last
    # thresholded predictions to sigma = 0 (here with weights like -0.13 and 1.13), so they may leave [-1, 1]
    # by that weight times the change between consecutive predictions near the end: measured under 1.8%.
    bound = 1.0 + (1e-9 if name in ("ddpm", "ddim") else 0.02)
    for wrap in (clipping, dynamic_thresholding):
        out = sample(name, wrap(far.model_fn(ABAR), ABAR), x, ABAR, ts, generator=torch.Generator().manual_seed(1))
        assert out.abs().max().item() <= bound
    plain = sample(name, far.model_fn(ABAR), x, ABAR, ts, generator=torch.Generator().manual_seed(1))
    assert plain.abs().max().item() > 2.0


def test_bad_percentile_is_refused():
    with pytest.raises(ValueError, match="percentile"):
        dynamic_thresholding(lambda x, t: x, ABAR, 1.5)
