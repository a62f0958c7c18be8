"""Gaussian diffusion: forward noising, the true posterior, the model's reverse step and the training loss.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with
``abar_t = alphas_cumprod[t]``; indices ``t`` run over the K steps of this (possibly respaced) process, and
``timestep_map[t]`` is the step of the original training process that index stands for.

The network's raw output is ``[N, C, ...]`` (eps; x_0 with ``predict_xstart``; or the velocity
``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` with ``predict_v``, Salimans & Ho 2022) or, with ``learn_sigma``,
``[N, 2C, ...]`` whose second half in [-1, 1] interpolates the log variance between the posterior variance
(-1) and beta_t (+1).

The simple loss is the MSE of that prediction, times a weight per step (``loss_weighting``): none (the
seed's), min-SNR-gamma (Hang et al. 2023: the x_0 error weighted by ``min(SNR, gamma)``), ``snr_plus_one``
(the research code's eps MSE times ``max(1 - abar, 0.01)``, normalised to mean 1 over the steps, i.e.
``1 / (SNR + 1)`` clipped) and ``v`` (the research code's eps MSE measured in v units: the x_0 error weighted by
``SNR + 1``). Each weight is stated for the x_0 error and converted to the network's own target, so a
weighting means the same objective for every parameterisation.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from textdiff.diffusion.schedules import alphas_cumprod as cumprod_of
from textdiff.diffusion.schedules import alpha_bar_at, interp_at, per_row

ModelFn = Callable[..., torch.Tensor]


def per_sample(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``arr[t]`` as ``[N, 1, 1, ...]`` broadcastable against ``like``, in ``like``'s dtype and device.

    Looked up where ``t`` is: with ``t`` on the host (as the training loop and the samplers keep it) the
    tables stay there and only the ``N`` values travel to the device, without waiting for it."""
    out = arr.to(t.device)[t.long()].to(like.device, like.dtype, non_blocking=True)
    return per_row(out, like)


def gaussian_noise(like: torch.Tensor,
                   generator: Optional[torch.Generator | Sequence[torch.Generator]] = None) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` ``[N, ...]``, drawn on the generator's device, moved to ``like``'s.

    ``generator`` may be one generator for the whole batch or a sequence of N, one per row: row i then draws
    exactly what a batch of one would draw from generator i, so a batch of independently seeded chains runs
    as one batch.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
        return noise.to(like.device, non_blocking=True)
    if len(generator) != like.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}; give one per row")
    rows = [torch.randn((1, *like.shape[1:]), generator=g, device=g.device, dtype=like.dtype) for g in generator]
    return torch.cat(rows).to(like.device, non_blocking=True)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: ``[N, ...]`` -> ``[N]``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def masked_mean_flat(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``x`` ``[N, C, H, W]`` over the pixels ``mask`` counts: ``[N]``.

    ``mask``: ``[N, 1, H, W]`` (or anything broadcastable to ``x``), 1 = counted, 0 = masked out (the
    stream's ``loss_mask``); None is :func:`mean_flat`. Each sample's value is the plain mean of its counted
    elements, so the gradient at a masked element is exactly 0, and a sample whose every pixel is masked gives
    0 (its sum of weights is held at 1, never divided by 0).
    """
    if mask is None:
        return mean_flat(x)
    weights = mask.to(x.device, non_blocking=True).expand_as(x)
    dims = tuple(range(1, x.ndim))
    return (x * weights).sum(dim=dims) / weights.sum(dim=dims).clamp(min=1.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


DECODER_NLL_CDFS = ("tanh", "exact")


def tanh_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The research code's approximation of the standard normal CDF (elementwise):
    ``0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``; off by at most ~3e-4 from the exact CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        cdf: str = "tanh") -> torch.Tensor:
    """Elementwise log-likelihood of 8-bit data ``x`` in [-1, 1] under a Gaussian discretised into 256 bins.

    ``log_scale`` is the log standard deviation; the edge bins extend to -inf / +inf. Returns nats.
    ``cdf``: ``"tanh"`` (the research code's :func:`tanh_normal_cdf`, every probability clamped at 1e-12
    before the log) or ``"exact"`` (``log_ndtr``, accurate far into the tails).
    """
    inv_std = torch.exp(-log_scale)
    plus = inv_std * (x - mean + 1.0 / 255.0)
    minus = inv_std * (x - mean - 1.0 / 255.0)
    if cdf == "tanh":
        cdf_plus, cdf_minus = tanh_normal_cdf(plus), tanh_normal_cdf(minus)
        log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
        log_one_minus_cdf_minus = (1.0 - cdf_minus).clamp(min=1e-12).log()
        middle = (cdf_plus - cdf_minus).clamp(min=1e-12).log()
    elif cdf == "exact":
        log_cdf_plus = torch.special.log_ndtr(plus)
        log_one_minus_cdf_minus = torch.special.log_ndtr(-minus)
        middle = (torch.special.ndtr(plus) - torch.special.ndtr(minus)).clamp(min=1e-12).log()
    else:
        raise ValueError(f"diffusion.decoder_nll_cdf {cdf!r} is unknown; choose one of {', '.join(DECODER_NLL_CDFS)}")
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_minus, middle))


def xstart_and_eps(target: str, pred: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a prediction of ``target`` (``"eps"``, ``"x0"`` or ``"v"``) at ``x_t``.

    pred, x_t: ``[N, C, ...]``; abar: broadcastable (``[N, 1, ...]``). With
    ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps`` and ``v = sqrt(abar) eps - sqrt(1 - abar) x_0``:
    ``x_0 = sqrt(abar) x_t - sqrt(1 - abar) v`` and ``eps = sqrt(1 - abar) x_t + sqrt(abar) v``.
    """
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if target == "eps":
        return (x_t - s * pred) / a, pred
    if target == "x0":
        return pred, (x_t - a * pred) / s
    if target == "v":
        return a * x_t - s * pred, s * x_t + a * pred
    raise ValueError(f"prediction target {target!r} is unknown; choose eps, x0 or v")


LOSS_WEIGHTINGS = ("none", "min_snr", "snr_plus_one", "v")


def mse_weights(alphas_cumprod: torch.Tensor, target: str, weighting: str, gamma: float = 5.0) -> torch.Tensor:
    """Per-step factor ``[K]`` float64 on the MSE of the network's own ``target`` for a ``weighting``.

    Each weighting is a weight w_x0(SNR) on the x_0 error; since at fixed x_t the squared errors relate as
    ``|eps err|^2 = SNR |x0 err|^2`` and ``|v err|^2 = (SNR + 1) |x0 err|^2``, the factor on the own target's
    MSE is ``w_x0 / k`` with k = SNR (eps), 1 (x0), SNR + 1 (v). ``none`` is 1 for every target.
    """
    abar = alphas_cumprod.to(torch.float64)
    snr = abar / (1 - abar)
    k = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[target]
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        return snr.clamp(max=gamma) / k
    if weighting == "snr_plus_one":
        eps_weight = (1 - abar).clamp(min=1e-2)
        return eps_weight / eps_weight.mean() * snr / k
    if weighting == "v":
        return (snr + 1) / k
    raise ValueError(f"loss weighting {weighting!r} is unknown; choose one of {', '.join(LOSS_WEIGHTINGS)}")


def vb_scale(num_timesteps: int, learn_sigma_rescaled: bool, weighting: str, vb_loss_ratio: float = 1000.0) -> float:
    """Factor on the VLB term of the hybrid loss (reported as ``vb`` and added to the MSE), as the research code.

    ``K / vb_loss_ratio`` (K: this process's step count, so a respaced process of 250 steps gives 0.25) with
    ``rescale_learned_sigmas`` (its RESCALED_MSE) and always with ``snr_plus_one``; 1 otherwise, which
    includes the research code's ``v`` loss, whose VLB term it never rescales.
    """
    if weighting == "snr_plus_one" or (learn_sigma_rescaled and weighting != "v"):
        return num_timesteps / vb_loss_ratio
    return 1.0


class GaussianDiffusion:
    """A discrete Gaussian diffusion process of K steps; immutable after construction.

    ``betas``: ``[K]``; ``timestep_map``: ``[K]`` original training steps (default ``0..K-1``);
    ``num_train_steps``: length of the original process (for ``rescale_timesteps``).
    """

    def __init__(self, betas: torch.Tensor, learn_sigma: bool, predict_xstart: bool = False,
                 use_kl: bool = False, rescale_learned_sigmas: bool = False, rescale_timesteps: bool = False,
                 timestep_map: Optional[torch.Tensor] = None, num_train_steps: Optional[int] = None,
                 predict_v: bool = False, loss_weighting: str = "none", min_snr_gamma: float = 5.0,
                 decoder_nll_cdf: str = "tanh", vb_loss_ratio: float = 1000.0):
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with every entry in (0, 1]")
        if predict_xstart and predict_v:
            raise ValueError("predict_xstart and predict_v exclude each other; the network predicts one target")
        if decoder_nll_cdf not in DECODER_NLL_CDFS:
            raise ValueError(f"diffusion.decoder_nll_cdf {decoder_nll_cdf!r} is unknown; choose one of "
                             f"{', '.join(DECODER_NLL_CDFS)}")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.predict_xstart = predict_xstart
        self.predict_v = predict_v
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.decoder_nll_cdf = decoder_nll_cdf
        self.vb_loss_ratio = vb_loss_ratio
        self.use_kl = use_kl
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.rescale_timesteps = rescale_timesteps
        self.timestep_map = (torch.arange(len(betas)) if timestep_map is None else timestep_map).long()
        self.num_train_steps = num_train_steps or len(betas)

        self.alphas_cumprod = cumprod_of(betas)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0; its log is clipped to the value at t = 1
        floor = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = torch.cat([floor.reshape(1), self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)
        # fixed variance when the model does not learn it: beta_t ("fixed large"), with t = 0 as above
        self.fixed_log_variance = torch.cat([floor.reshape(1), betas[1:]]).log()
        self.loss_weights = mse_weights(self.alphas_cumprod, self.target, loss_weighting, min_snr_gamma)

    @property
    def target(self) -> str:
        """What the network predicts: ``"eps"``, ``"x0"`` or ``"v"``."""
        return "x0" if self.predict_xstart else "v" if self.predict_v else "eps"

    def options(self) -> dict:
        """The constructor's keywords besides the steps (betas, timestep_map, num_train_steps), for respacing."""
        return dict(learn_sigma=self.learn_sigma, predict_xstart=self.predict_xstart, use_kl=self.use_kl,
                    rescale_learned_sigmas=self.rescale_learned_sigmas, rescale_timesteps=self.rescale_timesteps,
                    predict_v=self.predict_v, loss_weighting=self.loss_weighting, min_snr_gamma=self.min_snr_gamma,
                    decoder_nll_cdf=self.decoder_nll_cdf, vb_loss_ratio=self.vb_loss_ratio)

    # -- forward process --------------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise ``x_start`` ``[N, ...]`` to steps ``t`` ``[N]``: ``sqrt(abar) x_0 + sqrt(1 - abar) noise``."""
        abar = per_sample(self.alphas_cumprod, t, x_start)
        return abar.sqrt() * x_start + (1 - abar).sqrt() * noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0): ``[N, ...]`` and ``[N, 1, ...]``."""
        mean = (per_sample(self.posterior_mean_coef1, t, x_t) * x_start
                + per_sample(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, per_sample(self.posterior_log_variance_clipped, t, x_t)

    # -- reverse process --------------------------------------------------------------------------------
    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees for indices ``t`` (fractional allowed): ``[N]`` float32.

        ``timestep_map[t]``, scaled to [0, 1000) with ``rescale_timesteps``.
        """
        mapped = interp_at(self.timestep_map, t)
        if self.rescale_timesteps:
            mapped = mapped * (1000.0 / self.num_train_steps)
        return mapped.float()

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's Gaussian p(x_{t-1} | x_t) from its raw output.

        ``model_output``: ``[N, C or 2C, ...]``; ``x_t``: ``[N, C, ...]``; ``t``: ``[N]`` integer indices.
        Returns ``mean``, ``log_variance`` (``[N, C, ...]`` or broadcastable), ``pred_xstart`` and ``eps``.
        """
        channels = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"learn_sigma expects {2 * channels} output channels, got {model_output.shape[1]}")
            pred, v = model_output.split(channels, dim=1)
            frac = (v + 1) / 2
            log_variance = (frac * per_sample(self.betas.log(), t, x_t)
                            + (1 - frac) * per_sample(self.posterior_log_variance_clipped, t, x_t))
        else:
            pred = model_output
            log_variance = per_sample(self.fixed_log_variance, t, x_t)
        abar = per_sample(self.alphas_cumprod, t, x_t)
        pred_xstart, eps = xstart_and_eps(self.target, pred, x_t, abar)
        mean, _ = self.q_posterior(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def vb_terms(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-sample VLB term in bits per dimension, ``[N]``.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretised decoder's negative
        log-likelihood of ``x_start`` for t = 0 (normal CDF by ``decoder_nll_cdf``), each averaged over the
        pixels ``loss_mask`` ``[N, 1, H, W]`` counts (:func:`masked_mean_flat`; None: every pixel).
        """
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = masked_mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]),
                              loss_mask) / math.log(2.0)
        log_scale = (0.5 * out["log_variance"]).expand_as(x_start)
        nll = -masked_mean_flat(discretized_gaussian_log_likelihood(x_start, out["mean"], log_scale,
                                                                    self.decoder_nll_cdf), loss_mask) / math.log(2.0)
        return torch.where(t.to(kl.device, non_blocking=True) == 0, nll, kl)

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None, noise: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None,
                        loss_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-sample loss terms for a batch: ``{"loss", "mse", "vb"}``, each ``[N]``.

        ``model(x_t, model_time(t), **model_kwargs)`` is called once. ``mse`` is the simple loss (the MSE of
        eps, x_0 or v, times ``loss_weights[t]``). ``vb`` is the VLB term in bits with the predicted mean detached, so
        its gradient only trains the variance (Nichol & Dhariwal's hybrid loss), times :func:`vb_scale` (K / 1000
        with ``rescale_learned_sigmas``), reported on that scale as the research code does. ``loss`` is
        ``mse + vb`` with learned sigmas, ``vb * K`` (``vb`` unscaled) with ``use_kl``, and ``mse`` otherwise
        (then ``vb`` is only logged). ``loss_mask`` ``[N, 1, H, W]`` (1 = counted, 0 = masked: text that OCR
        could not read, ``data.mask_unreadable``) turns every per-pixel mean into the mean over the counted
        pixels (:func:`masked_mean_flat`); None counts every pixel.
        """
        if noise is None:
            noise = gaussian_noise(x_start, generator)
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_time(t).to(x_start.device, non_blocking=True), **(model_kwargs or {}))
        channels = x_start.shape[1]
        pred = output[:, :channels]
        abar = per_sample(self.alphas_cumprod, t, x_start)
        target = {"x0": x_start, "eps": noise, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x_start}[self.target]
        weight = per_sample(self.loss_weights, t, pred).reshape(-1)  # [N]
        mse = masked_mean_flat((target - pred) ** 2, loss_mask) * weight
        if self.use_kl:
            vb = self.vb_terms(output, x_start, x_t, t, loss_mask)
            return {"loss": vb * self.num_timesteps, "mse": mse.detach(), "vb": vb}
        frozen = torch.cat([pred.detach(), output[:, channels:]], dim=1)
        scale = vb_scale(self.num_timesteps, self.rescale_learned_sigmas, self.loss_weighting, self.vb_loss_ratio)
        vb = self.vb_terms(frozen, x_start, x_t, t, loss_mask) * scale
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse, "vb": vb.detach()}
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def sampling_fn(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Adapt ``model_fn(x, model_time)`` to the samplers' ``fn(x, t)`` over this process's indices.

        ``t`` ``[N]`` may be fractional; the result always predicts eps in its first C channels (x_0 and v
        predictions are converted), with the variance half passed through unchanged.
        """
        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = model_fn(x, self.model_time(t).to(x.device, non_blocking=True))
            if self.target == "eps":
                return out
            channels = x.shape[1]
            abar = per_row(alpha_bar_at(self.alphas_cumprod, t).to(x, non_blocking=True), x)
            _, eps = xstart_and_eps(self.target, out[:, :channels], x, abar)
            return torch.cat([eps, out[:, channels:]], dim=1)
        return fn
