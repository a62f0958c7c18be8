"""Specification of textdiff.diffusion.gaussian: forward process, posterior, VLB and training losses."""

import math

import pytest
import torch

from textdiff.config import DiffusionConfig
from textdiff.diffusion import build_diffusion
from textdiff.diffusion.gaussian import GaussianDiffusion, gaussian_noise, masked_mean_flat, mean_flat
from textdiff.diffusion.schedules import cosine_betas, linear_betas


def _diffusion(learn_sigma=True, **kw):
    return GaussianDiffusion(cosine_betas(100), learn_sigma=learn_sigma, **kw)


def test_q_sample_has_mean_sqrt_abar_x0_and_variance_1_minus_abar():
    d = _diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 40)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    abar = d.alphas_cumprod[40].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_posterior_matches_the_product_of_gaussians():
    d = GaussianDiffusion(linear_betas(50), learn_sigma=False)
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-1.2]], dtype=torch.float64)
    t = 17
    beta, abar_prev = d.betas[t].item(), d.alphas_cumprod[t - 1].item()
    # q(x_{t-1} | x_0) q(x_t | x_{t-1}) as a Gaussian in x_{t-1}: precisions add
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean = (math.sqrt(1 - beta) / beta * xt.item() + math.sqrt(abar_prev) / (1 - abar_prev) * x0.item()) / precision
    got_mean, got_log_var = d.q_posterior(x0, xt, torch.tensor([t]))
    assert got_mean.item() == pytest.approx(mean, rel=1e-10)
    assert math.exp(got_log_var.item()) == pytest.approx(1 / precision, rel=1e-10)


def test_vlb_term_is_zero_for_the_true_posterior():
    d = _diffusion()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.arange(1, 100, 12)[:8]
    xt = d.q_sample(x0, t, noise)
    true_output = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # exact eps, v = -1: posterior variance
    assert d.vb_terms(true_output, x0, xt, t).abs().max().item() < 1e-9
    wrong = torch.cat([noise + 0.1, -torch.ones_like(noise)], dim=1)
    assert d.vb_terms(wrong, x0, xt, t).min().item() > 1e-6


def test_decoder_nll_at_step_0_is_the_mass_of_the_pixel_bin():
    d = _diffusion(decoder_nll_cdf="exact")
    x0 = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    noise = torch.zeros_like(x0)
    t = torch.zeros(1, dtype=torch.long)
    xt = d.q_sample(x0, t, noise)
    nll = d.vb_terms(torch.cat([noise, torch.ones_like(noise)], dim=1), x0, xt, t)  # v = +1: variance beta_0
    half_bin = (1 / 255) / math.sqrt(d.betas[0].item())
    cdf = 0.5 * (1 + math.erf(half_bin / math.sqrt(2)))
    bits = [-math.log2(cdf), -math.log2(2 * cdf - 1), -math.log2(cdf)]  # edge bins are open-ended
    assert nll.item() == pytest.approx(sum(bits) / 3, rel=1e-6)


def test_decoder_nll_defaults_to_the_research_codes_tanh_cdf():
    d = _diffusion()
    x0 = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    t = torch.zeros(1, dtype=torch.long)
    out = torch.cat([torch.zeros_like(x0), torch.ones_like(x0)], dim=1)  # eps 0, variance beta_0
    nll = d.vb_terms(out, x0, d.q_sample(x0, t, torch.zeros_like(x0)), t).item()
    # by hand: the mean is x0 (exact eps), so each bin edge sits half a bin (1/255) over sigma = sqrt(beta_0) away
    z = (1 / 255) / math.sqrt(d.betas[0].item())
    tanh_cdf = 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    bits = [-math.log2(tanh_cdf), -math.log2(2 * tanh_cdf - 1), -math.log2(tanh_cdf)]
    assert nll == pytest.approx(sum(bits) / 3, rel=1e-9)
    exact = _diffusion(decoder_nll_cdf="exact").vb_terms(out, x0, d.q_sample(x0, t, torch.zeros_like(x0)), t).item()
    # the tanh CDF is off by at most 3e-4 in probability; here (z ~ 0.17, middle bin mass ~ 0.14) that moves
    # the mean NLL by more than 1e-6 bits but less than 0.01
    assert 1e-6 < abs(nll - exact) < 0.01


class _Constant(torch.nn.Module):
    """A 'network' whose output is a learnable tensor, so gradients can be inspected."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, x, t):
        return self.out * 1


def test_training_losses_are_per_sample_and_vb_does_not_train_the_mean():
    d = _diffusion()
    net = _Constant(torch.zeros(4, 6, 2, 2))
    terms = d.training_losses(net, torch.zeros(4, 3, 2, 2), torch.tensor([0, 10, 50, 99]),
                              generator=torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in terms.items()} == {"loss": (4,), "mse": (4,), "vb": (4,)}
    terms["vb"].sum().backward()
    assert net.out.grad[:, :3].abs().max().item() == 0.0
    assert net.out.grad[:, 3:].abs().max().item() > 0.0


def _vb_ratio(d, **kw):
    """Reported vb over the unscaled VLB term of the same draw."""
    net = _Constant(torch.randn(2, 6, 2, 2, generator=torch.Generator().manual_seed(3)))
    x0, t = torch.zeros(2, 3, 2, 2), torch.tensor([5, 60])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    terms = d.training_losses(net, x0, t, noise=noise)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    raw = d.vb_terms(net.out.detach(), x0, d.q_sample(x0, t, noise), t)
    return (terms["vb"] / raw).tolist()


def test_hybrid_loss_is_mse_plus_vb_reported_at_steps_over_1000():
    assert _vb_ratio(_diffusion(rescale_learned_sigmas=True)) == pytest.approx([0.1, 0.1], rel=1e-6)  # K = 100
    assert _vb_ratio(_diffusion(rescale_learned_sigmas=False)) == pytest.approx([1.0, 1.0], rel=1e-6)


def test_respaced_vb_is_reported_at_k_over_1000_as_the_research_code():
    cfg = DiffusionConfig(diffusion_steps=1000, timestep_respacing="250", rescale_learned_sigmas=True)
    assert _vb_ratio(build_diffusion(cfg, learn_sigma=True)) == pytest.approx([0.25, 0.25], rel=1e-6)
    cfg.vb_loss_ratio = 500.0
    assert _vb_ratio(build_diffusion(cfg, learn_sigma=True)) == pytest.approx([0.5, 0.5], rel=1e-6)
    # the research code rescales the VLB term of its SNR+1 loss always and of its v loss never
    cfg = DiffusionConfig(diffusion_steps=1000, timestep_respacing="250", rescale_learned_sigmas=False,
                          loss_weighting="snr_plus_one")
    assert _vb_ratio(build_diffusion(cfg, learn_sigma=True)) == pytest.approx([0.25, 0.25], rel=1e-6)
    cfg = DiffusionConfig(diffusion_steps=1000, timestep_respacing="250", rescale_learned_sigmas=True,
                          loss_weighting="v")
    assert _vb_ratio(build_diffusion(cfg, learn_sigma=True)) == pytest.approx([1.0, 1.0], rel=1e-6)


def test_use_kl_loss_is_vb_times_the_step_count():
    d = _diffusion(use_kl=True)
    net = _Constant(torch.randn(2, 6, 2, 2, generator=torch.Generator().manual_seed(3)))
    terms = d.training_losses(net, torch.zeros(2, 3, 2, 2), torch.tensor([5, 60]),
                              generator=torch.Generator().manual_seed(0))
    assert torch.allclose(terms["loss"], 100 * terms["vb"])


def test_fixed_variance_loss_is_the_mse_and_vb_is_only_logged():
    d = _diffusion(learn_sigma=False)
    net = _Constant(torch.zeros(2, 3, 2, 2))
    terms = d.training_losses(net, torch.zeros(2, 3, 2, 2), torch.tensor([5, 60]))
    assert torch.equal(terms["loss"], terms["mse"])
    assert not terms["vb"].requires_grad


def test_rescale_timesteps_maps_respaced_indices_onto_0_to_1000():
    d = build_diffusion(DiffusionConfig(diffusion_steps=4000, timestep_respacing="ddim40", rescale_timesteps=True),
                        learn_sigma=True)
    assert d.model_time(torch.tensor([0, 1, 39])).tolist() == [0.0, 25.0, 975.0]


def test_sampling_fn_turns_an_x0_prediction_into_eps():
    d = _diffusion(learn_sigma=False, predict_xstart=True)
    x0, noise = torch.full((1, 3), 0.5, dtype=torch.float64), torch.full((1, 3), -0.2, dtype=torch.float64)
    xt = d.q_sample(x0, torch.tensor([30]), noise)
    fn = d.sampling_fn(lambda x, t: x0.expand_as(x))
    assert torch.allclose(fn(xt, torch.tensor([30.0])), noise)


def test_build_diffusion_reads_the_diffusion_section():
    d = build_diffusion(DiffusionConfig(noise_schedule="linear", diffusion_steps=200), learn_sigma=False)
    assert (d.num_timesteps, d.learn_sigma) == (200, False)
    assert d.betas[-1].item() == pytest.approx(0.1)  # linear schedule scaled by 1000 / 200


def test_learned_variance_spans_posterior_variance_to_beta():
    d = _diffusion()
    x = torch.zeros(2, 1, dtype=torch.float64)
    t = torch.tensor([50, 50])
    out = d.p_mean_variance(torch.tensor([[0.0, -1.0], [0.0, 1.0]], dtype=torch.float64), x, t)
    assert out["log_variance"][:, 0].exp().tolist() == pytest.approx(
        [d.posterior_variance[50].item(), d.betas[50].item()], rel=1e-10)


def test_x0_prediction_trains_against_x_start():
    d = _diffusion(learn_sigma=False, predict_xstart=True)
    x_start = torch.full((2, 3, 2, 2), 0.25)
    terms = d.training_losses(lambda x, t: x_start.clone(), x_start, torch.tensor([3, 70]))
    assert terms["mse"].tolist() == [0.0, 0.0]


def test_one_generator_per_row_draws_what_a_batch_of_one_would():
    like = torch.zeros(3, 2, 4, 4)
    rows = gaussian_noise(like, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    for i, s in enumerate((5, 6, 7)):
        alone = gaussian_noise(like[:1], torch.Generator().manual_seed(s))
        assert torch.equal(rows[i:i + 1], alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        gaussian_noise(like, [torch.Generator(), torch.Generator()])


# --- the loss mask (data.mask_unreadable): means over the counted pixels only ----------------------------------


def _mask(rows):
    """A loss mask [N, 1, 2, 2] from one list of four 0/1 per sample (row-major)."""
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 2, 2)


def test_the_masked_mean_is_the_plain_mean_over_the_counted_pixels_of_every_channel():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 3, 2, 2)  # sample 0: 0..11, sample 1: 12..23
    mask = _mask([[1, 0, 0, 1], [0, 0, 1, 0]])
    # sample 0 counts pixels (0, 0) and (1, 1) of its 3 channels: 0, 3, 4, 7, 8, 11 -> 33 / 6 = 5.5;
    # sample 1 pixel (1, 0): 14, 18, 22 -> 18
    assert masked_mean_flat(x, mask).tolist() == [5.5, 18.0]
    assert masked_mean_flat(x, torch.ones(2, 1, 2, 2)).tolist() == mean_flat(x).tolist() == [5.5, 17.5]
    assert torch.equal(masked_mean_flat(x, None), mean_flat(x))


def test_a_sample_whose_every_pixel_is_masked_has_a_mean_of_zero_not_nan():
    x = torch.full((2, 3, 2, 2), 7.0, dtype=torch.float64, requires_grad=True)
    out = masked_mean_flat(x, _mask([[0, 0, 0, 0], [1, 1, 1, 1]]))
    assert out.tolist() == [0.0, 7.0]
    out.sum().backward()
    assert x.grad[0].abs().max().item() == 0.0 and x.grad[1].flatten().tolist() == [1 / 12] * 12


def _masked_terms(d, mask, seed=3):
    """Training-loss terms of a prediction [2, 6, 2, 2] held as a parameter, at steps 0 (decoder NLL) and 60."""
    net = _Constant(torch.randn(2, 6, 2, 2, generator=torch.Generator().manual_seed(seed)))
    x0 = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    return net, x0, noise, d.training_losses(net, x0, torch.tensor([0, 60]), noise=noise, loss_mask=mask)


def test_the_masked_loss_gives_exactly_zero_gradient_at_masked_pixels_of_the_prediction():
    mask = _mask([[1, 0, 1, 1], [0, 1, 0, 0]])
    net, _, _, terms = _masked_terms(_diffusion(), mask)  # learned sigma: MSE + VB, decoder NLL at t = 0
    terms["loss"].sum().backward()
    grad = net.out.grad  # [2, 6, 2, 2]: eps in channels 0-2, the variance in 3-5
    masked = (mask == 0).expand(2, 6, 2, 2)
    assert grad[masked].abs().max().item() == 0.0  # 5 masked pixels x 6 channels, both halves
    assert (grad[~masked] != 0).all()  # the other 3 pixels x 6 channels all train


def test_each_masked_term_is_the_unmasked_term_of_the_counted_pixels_alone():
    """Sample 1 counts one pixel: its MSE and VB equal those of a 1 x 1 image holding that pixel alone."""
    d = _diffusion()
    mask = _mask([[1, 1, 1, 1], [0, 0, 0, 1]])
    net, x0, noise, terms = _masked_terms(d, mask)
    alone = _Constant(net.out.detach()[1:, :, 1:, 1:])
    one = d.training_losses(alone, x0[1:, :, 1:, 1:], torch.tensor([60]), noise=noise[1:, :, 1:, 1:])
    for name in ("mse", "vb", "loss"):
        assert terms[name][1].item() == pytest.approx(one[name][0].item(), rel=1e-6), name
    whole = d.training_losses(_Constant(net.out.detach()), x0, torch.tensor([0, 60]), noise=noise)
    assert terms["loss"][0].item() == pytest.approx(whole["loss"][0].item(), rel=1e-6)  # all counted: unchanged


def test_a_wholly_masked_sample_contributes_zero_loss_and_zero_gradient():
    for d in (_diffusion(), _diffusion(use_kl=True), _diffusion(learn_sigma=False)):
        channels = 6 if d.learn_sigma else 3
        net = _Constant(torch.randn(2, channels, 2, 2, generator=torch.Generator().manual_seed(3)))
        x0 = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
        terms = d.training_losses(net, x0, torch.tensor([0, 60]), loss_mask=_mask([[0, 0, 0, 0], [1, 1, 1, 1]]),
                                  generator=torch.Generator().manual_seed(0))
        assert [terms[k][0].item() for k in ("loss", "mse", "vb")] == [0.0, 0.0, 0.0]
        assert terms["loss"][1].item() > 0.0
        terms["loss"].sum().backward()
        assert net.out.grad[0].abs().max().item() == 0.0 and torch.isfinite(net.out.grad).all()
