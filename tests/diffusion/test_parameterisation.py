"""Specification of the prediction targets (eps, x_0, v) and the loss weightings of textdiff.diffusion.gaussian.

All in float64, so identities hold to 1e-10 (the arithmetic has no cancellation worse than 1e3 * 2**-53).
"""

import math

import pytest
import torch

from textdiff.diffusion.gaussian import GaussianDiffusion, mse_weights, xstart_and_eps
from textdiff.diffusion.respace import respace
from textdiff.diffusion.schedules import alpha_bar_at, cosine_betas

TARGETS = {"eps": {}, "x0": {"predict_xstart": True}, "v": {"predict_v": True}}
K = 100


def _case(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 20, 50, 80, 99])[:n]
    return x0, eps, t


def _targets(d: GaussianDiffusion, x0, eps, t):
    abar = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}, abar


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_converts_back_to_the_x0_and_eps_it_came_from(target):
    d = GaussianDiffusion(cosine_betas(K), learn_sigma=False, **TARGETS[target])
    x0, eps, t = _case()
    x_t = d.q_sample(x0, t, eps)
    preds, abar = _targets(d, x0, eps, t)
    got_x0, got_eps = xstart_and_eps(target, preds[target], x_t, abar)
    assert float((got_x0 - x0).abs().max()) < 1e-10 and float((got_eps - eps).abs().max()) < 1e-10


@pytest.mark.parametrize("target", TARGETS)
def test_sampling_fn_gives_the_samplers_eps_for_every_target(target):
    d = GaussianDiffusion(cosine_betas(K), learn_sigma=False, **TARGETS[target])
    x0, eps, _ = _case()
    t = torch.tensor([0.0, 3.5, 20.25, 50.0, 80.5, 99.0], dtype=torch.float64)  # fractional indices too
    abar = alpha_bar_at(d.alphas_cumprod, t).reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    exact = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[target]
    fn = d.sampling_fn(lambda x, model_t: exact)
    assert float((fn(x_t, t) - eps).abs().max()) < 1e-10


@pytest.mark.parametrize("weighting", ["none", "min_snr", "snr_plus_one", "v"])
def test_mse_weights_match_their_formulas(weighting):
    abar = GaussianDiffusion(cosine_betas(K), learn_sigma=False).alphas_cumprod
    snr = abar / (1 - abar)
    w_eps = mse_weights(abar, "eps", weighting, gamma=5.0)
    expected = {"none": torch.ones(K, dtype=torch.float64),
                "min_snr": torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr,
                "snr_plus_one": (1 - abar).clamp(min=0.01) / (1 - abar).clamp(min=0.01).mean(),
                "v": 1 / abar}[weighting]
    assert float((w_eps - expected).abs().max() / expected.abs().max()) < 1e-12
    if weighting == "snr_plus_one":  # the research code normalises its eps weights to mean 1 over the steps
        assert float(w_eps.mean()) == pytest.approx(1.0, abs=1e-12)
    if weighting == "min_snr":  # Hang et al.: v-prediction weight min(SNR, gamma) / (SNR + 1)
        w_v = mse_weights(abar, "v", "min_snr", gamma=5.0)
        assert float((w_v - torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)).abs().max()) < 1e-12


@pytest.mark.parametrize("weighting", ["min_snr", "snr_plus_one", "v"])
def test_a_weighting_is_the_same_objective_for_every_target(weighting):
    """A network whose x_0 estimate is off by delta gets the same weighted loss whichever target it predicts."""
    x0, eps, t = _case()
    delta = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    losses = {}
    for target, kw in TARGETS.items():
        d = GaussianDiffusion(cosine_betas(K), learn_sigma=False, loss_weighting=weighting, **kw)
        x_t = d.q_sample(x0, t, eps)
        abar = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        wrong_x0 = x0 + delta
        wrong_eps = (x_t - abar.sqrt() * wrong_x0) / (1 - abar).sqrt()
        pred = {"eps": wrong_eps, "x0": wrong_x0, "v": abar.sqrt() * wrong_eps - (1 - abar).sqrt() * wrong_x0}[target]
        losses[target] = d.training_losses(lambda x, tt, p=pred: p, x0, t, noise=eps)["loss"]
    assert float((losses["eps"] - losses["x0"]).abs().max() / losses["x0"].abs().max()) < 1e-8
    assert float((losses["v"] - losses["x0"]).abs().max() / losses["x0"].abs().max()) < 1e-8


def test_no_weighting_is_the_plain_mse_of_the_own_target_as_in_the_seed():
    x0, eps, t = _case()
    for target, kw in TARGETS.items():
        d = GaussianDiffusion(cosine_betas(K), learn_sigma=False, **kw)
        exact, _ = _targets(d, x0, eps, t)
        pred = exact[target] + 0.5
        loss = d.training_losses(lambda x, tt: pred, x0, t, noise=eps)["loss"]
        assert float((loss - 0.25).abs().max()) < 1e-12


@pytest.mark.parametrize("target", TARGETS)
def test_the_learned_variance_hybrid_loss_works_for_every_target(target):
    """With learn_sigma the VB term trains the variance half; an exact mean prediction leaves only the
    variance's KL, which is zero when the variance is the posterior's (v = -1) and positive otherwise."""
    x0, eps, t = _case()
    t = t.clamp(min=1)  # t = 0 is the decoder NLL, not a KL
    d = GaussianDiffusion(cosine_betas(K), learn_sigma=True, **TARGETS[target])
    exact, _ = _targets(d, x0, eps, t)
    at_posterior = torch.cat([exact[target], -torch.ones_like(x0)], dim=1)
    at_beta = torch.cat([exact[target], torch.ones_like(x0)], dim=1)
    vb_post = d.training_losses(lambda x, tt: at_posterior, x0, t, noise=eps)["vb"]
    vb_beta = d.training_losses(lambda x, tt: at_beta, x0, t, noise=eps)["vb"]
    assert float(vb_post.abs().max()) < 1e-9
    assert bool((vb_beta[t <= 50] > 1e-5).all())  # late steps have beta_t ~ posterior variance


def test_respacing_keeps_the_target_and_weighting():
    d = GaussianDiffusion(cosine_betas(K), learn_sigma=False, predict_v=True, loss_weighting="min_snr",
                          min_snr_gamma=2.0)
    r = respace(d, list(range(0, K, 10)))
    assert r.target == "v" and r.loss_weighting == "min_snr" and r.min_snr_gamma == 2.0
    snr = r.alphas_cumprod / (1 - r.alphas_cumprod)
    assert float((r.loss_weights - snr.clamp(max=2.0) / (snr + 1)).abs().max()) < 1e-12


def test_predicting_x0_and_v_at_once_is_refused():
    with pytest.raises(ValueError, match="predict_xstart and predict_v exclude each other"):
        GaussianDiffusion(cosine_betas(K), learn_sigma=False, predict_xstart=True, predict_v=True)
