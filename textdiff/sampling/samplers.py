"""Samplers: plain functions over a ``model_fn(x, t)`` callable and a timestep schedule.

Every sampler has the signature ``sample_x(model_fn, x, alphas_cumprod, timesteps, generator=None,
callback=None, disable=None, **options)``:

- ``model_fn(x, t)``: ``x`` ``[N, C, ...]``, ``t`` ``[N]`` float64 (fractional) indices into
  ``alphas_cumprod`` -> eps ``[N, C, ...]``, or ``[N, 2C, ...]`` with the learned-variance half
  (``GaussianDiffusion.sampling_fn`` adapts a network; guidance and thresholding wrap it);
- ``x``: the start, pure noise at ``timesteps[0]``;
- ``alphas_cumprod``: ``[K]`` of the process the model was trained on (or a respaced one);
- ``timesteps``: ``[S]`` decreasing indices (see :func:`sampling_timesteps`), usually ending at 0. Each
  sampler integrates from ``timesteps[0]`` to ``timesteps[-1]`` and its last step returns the model's x_0
  prediction there (a step to ``abar = 1``), so S is the step count and all samplers share one target.

All samplers return the clean sample ``[N, C, ...]``; ``callback`` gets ``{"i", "t", "x", "pred_xstart"}``
after each step; noise comes from ``generator`` only, so a seeded generator makes a run reproducible.
``generator`` may also be a list of N generators, one per row (independently seeded samples in one batch).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from textdiff.diffusion.gaussian import gaussian_noise
from textdiff.diffusion.respace import space_timesteps
from textdiff.diffusion.schedules import alpha_bar_at

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[dict], None]]


def sampling_timesteps(num_timesteps: int, spec: str | int,
                       alphas_cumprod: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decreasing step indices ``[S]`` float64 for a step spec, from ``num_timesteps - 1`` down to 0.

    ``spec``: a respacing spec (``50``, ``"ddim50"``, ``"10,10,10"``: integer steps, see
    ``textdiff.diffusion.respace``) or ``"logsnrN"``: N steps evenly spaced in log-SNR
    ``log(abar / (1 - abar))`` at fractional indices (needs ``alphas_cumprod``), so every step shrinks the
    noise by the same factor. PRK and PLMS need ``logsnrN`` on the cosine schedule, whose clipped last
    step spans a 1000x change of noise level (see docs/samplers.md).
    """
    spec = str(spec).strip()
    if not spec.startswith("logsnr"):
        return torch.tensor(space_timesteps(num_timesteps, spec)[::-1], dtype=torch.float64)
    count = spec[len("logsnr"):]
    if not count.isdigit() or not 1 <= int(count) <= num_timesteps:
        raise ValueError(f"sampling steps {spec!r}: write logsnrN with N in [1, {num_timesteps}], e.g. logsnr20")
    if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
        raise ValueError(f"sampling steps {spec!r} need the process's alphas_cumprod ([{num_timesteps}])")
    return logsnr_timesteps(alphas_cumprod, int(count))


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` fractional indices ``[steps]`` from ``K - 1`` to 0, evenly spaced in log-SNR."""
    num_timesteps = len(alphas_cumprod)
    abar = alphas_cumprod.to(torch.float64)
    log_snr = (abar / (1 - abar)).log()  # [K], decreasing in t
    wanted = torch.linspace(float(log_snr[-1]), float(log_snr[0]), steps, dtype=torch.float64)
    # invert the piecewise-linear log-SNR(t) between integer steps
    hi = torch.searchsorted(-log_snr, -wanted).clamp(1, num_timesteps - 1)
    lo = hi - 1
    frac = (log_snr[lo] - wanted) / (log_snr[lo] - log_snr[hi])
    t = lo + frac.clamp(0, 1)
    t[-1] = 0.0 if steps > 1 else num_timesteps - 1
    t[0] = num_timesteps - 1
    return t


def _abars(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> list[float]:
    """abar at each timestep, then 1.0 for the clean end: ``S + 1`` floats."""
    return alpha_bar_at(alphas_cumprod, timesteps.double()).tolist() + [1.0]


def _call(model_fn: ModelFn, x: torch.Tensor, t: float) -> torch.Tensor:
    return model_fn(x, torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device))


def _eps(model_fn: ModelFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """The model's eps at ``(x, t)``, without any variance half."""
    return _call(model_fn, x, t)[:, :x.shape[1]]


def ddim_transfer(x: torch.Tensor, eps: torch.Tensor, abar: float, abar_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``x`` from noise level ``abar`` to ``abar_next`` along ``eps``; returns ``(x_next, pred_xstart)``.

    This is the deterministic DDIM update, and the transfer map of the pseudo numerical methods (PNDM).
    """
    pred_xstart = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    return math.sqrt(abar_next) * pred_xstart + math.sqrt(1 - abar_next) * eps, pred_xstart


def _steps(timesteps: torch.Tensor, disable: Optional[bool], desc: str):
    return tqdm(list(enumerate(timesteps.tolist())), disable=disable, desc=desc, leave=False)


def _report(callback: Callback, i: int, t: float, x: torch.Tensor, pred_xstart: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "pred_xstart": pred_xstart})


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                eta: float = 0.0, generator: Optional[torch.Generator] = None, callback: Callback = None,
                disable: Optional[bool] = None) -> torch.Tensor:
    """DDIM (Song et al. 2021); ``eta = 0`` is deterministic (Euler on the probability-flow ODE),
    ``eta = 1`` matches ancestral sampling with the posterior variance. One model call per step."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta is {eta}; it must lie in [0, 1]")
    abars = _abars(alphas_cumprod, timesteps)
    for i, t in _steps(timesteps, disable, "ddim"):
        a, a_next = abars[i], abars[i + 1]
        eps = _eps(model_fn, x, t)
        pred_xstart = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * pred_xstart + math.sqrt(max(0.0, 1 - a_next - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * gaussian_noise(x, generator)
        _report(callback, i, t, x, pred_xstart)
    return x


@torch.no_grad()
def sample_ddpm(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                fixed_variance: str = "large", generator: Optional[torch.Generator] = None,
                callback: Callback = None, disable: Optional[bool] = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020) through the process restricted to ``timesteps``.

    Between consecutive steps the betas are ``1 - abar_t / abar_next`` (as in a respaced process). The
    variance is the model's learned one when its output has 2C channels (Nichol & Dhariwal's
    interpolation between beta and the posterior variance), else ``fixed_variance``: ``"large"`` (beta) or
    ``"small"`` (the posterior variance). One model call per step; no noise on the last.
    """
    if fixed_variance not in ("large", "small"):
        raise ValueError(f"fixed_variance is {fixed_variance!r}; choose 'large' or 'small'")
    abars = _abars(alphas_cumprod, timesteps)
    channels = x.shape[1]
    for i, t in _steps(timesteps, disable, "ddpm"):
        a, a_next = abars[i], abars[i + 1]
        out = _call(model_fn, x, t)
        eps = out[:, :channels]
        pred_xstart = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        beta = 1 - a / a_next
        x = (beta * math.sqrt(a_next) * pred_xstart + (1 - a_next) * math.sqrt(1 - beta) * x) / (1 - a)
        if i + 1 < len(timesteps):
            posterior_variance = beta * (1 - a_next) / (1 - a)
            if out.shape[1] == 2 * channels:
                frac = (out[:, channels:] + 1) / 2
                std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(posterior_variance)))
            else:
                std = math.sqrt(beta if fixed_variance == "large" else posterior_variance)
            x = x + std * gaussian_noise(x, generator)
        _report(callback, i, t, x, pred_xstart)
    return x


def _warn_if_steep(abars: list[float], name: str) -> None:
    """Warn when a step changes abar more than 100x: the pseudo methods diverge on such steps."""
    worst = max(b / a for a, b in zip(abars[:-2], abars[1:-1])) if len(abars) > 2 else 1.0
    if worst > 100:
        warnings.warn(f"{name}: a sampling step multiplies abar by {worst:.3g}; the pseudo numerical methods "
                      "diverge on such steps (the cosine schedule's clipped last step does this with integer "
                      "steps). Use 'logsnrN' steps, e.g. logsnr25; see docs/samplers.md", stacklevel=4)


def _prk_step(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, t: float,
              t_next: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pseudo Runge-Kutta (4th order) step; returns ``(x_next, eps at (x, t), pred_xstart)``."""
    t_mid = (t + t_next) / 2
    a, a_mid, a_next = alpha_bar_at(alphas_cumprod, torch.tensor([t, t_mid, t_next])).tolist()
    eps_1 = _eps(model_fn, x, t)
    eps_2 = _eps(model_fn, ddim_transfer(x, eps_1, a, a_mid)[0], t_mid)
    eps_3 = _eps(model_fn, ddim_transfer(x, eps_2, a, a_mid)[0], t_mid)
    eps_4 = _eps(model_fn, ddim_transfer(x, eps_3, a, a_next)[0], t_next)
    x_next, pred_xstart = ddim_transfer(x, (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6, a, a_next)
    return x_next, eps_1, pred_xstart


_ADAMS_BASHFORTH = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """Linear multistep combination of the last (up to 4) eps values, newest last."""
    coefs = _ADAMS_BASHFORTH[min(len(history), 4)]
    return sum(c * e for c, e in zip(coefs, reversed(history[-4:])))


@torch.no_grad()
def sample_prk(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
               generator: Optional[torch.Generator] = None, callback: Callback = None,
               disable: Optional[bool] = None) -> torch.Tensor:
    """Pseudo Runge-Kutta (Liu et al. 2022): RK4 weights on eps, each stage moved by the DDIM transfer.

    Half steps sit at fractional indices. 4 model calls per step; the last step (to the clean image)
    has no midpoint and is a DDIM step, so NFE = 4 (S - 1) + 1. ``generator`` is unused (deterministic).
    """
    abars = _abars(alphas_cumprod, timesteps)
    _warn_if_steep(abars, "prk")
    ts = timesteps.tolist()
    for i, t in _steps(timesteps, disable, "prk"):
        if i + 1 < len(ts):
            x, _, pred_xstart = _prk_step(model_fn, x, alphas_cumprod, t, ts[i + 1])
        else:
            x, pred_xstart = ddim_transfer(x, _eps(model_fn, x, t), abars[i], 1.0)
        _report(callback, i, t, x, pred_xstart)
    return x


@torch.no_grad()
def sample_plms(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                generator: Optional[torch.Generator] = None, callback: Callback = None,
                disable: Optional[bool] = None) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022): 4th-order Adams-Bashforth on eps with the DDIM transfer.

    The first three steps are PRK steps that fill the eps history; afterwards one model call per step,
    so NFE = S + 9 for S >= 4. ``generator`` is unused (deterministic).
    """
    abars = _abars(alphas_cumprod, timesteps)
    _warn_if_steep(abars, "plms")
    ts = timesteps.tolist()
    history: list[torch.Tensor] = []
    for i, t in _steps(timesteps, disable, "plms"):
        if i + 1 == len(ts):
            x, pred_xstart = ddim_transfer(x, _eps(model_fn, x, t), abars[i], 1.0)
        elif len(history) < 3:
            x, eps, pred_xstart = _prk_step(model_fn, x, alphas_cumprod, t, ts[i + 1])
            history.append(eps)
        else:
            history = history[-3:] + [_eps(model_fn, x, t)]
            x, pred_xstart = ddim_transfer(x, _adams_bashforth(history), abars[i], abars[i + 1])
        _report(callback, i, t, x, pred_xstart)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                    generator: Optional[torch.Generator] = None, callback: Callback = None,
                    disable: Optional[bool] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR on the x_0 prediction.

    First step first order; the last step returns the x_0 prediction. One model call per step.
    ``generator`` is unused (deterministic).
    """
    abars = _abars(alphas_cumprod, timesteps)
    log_snr_half = [0.5 * math.log(a / (1 - a)) if a < 1 else math.inf for a in abars]  # lambda = log(alpha/sigma)
    previous: Optional[torch.Tensor] = None
    for i, t in _steps(timesteps, disable, "dpmpp_2m"):
        a, a_next = abars[i], abars[i + 1]
        eps = _eps(model_fn, x, t)
        pred_xstart = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if a_next == 1.0:
            x = pred_xstart
        else:
            h = log_snr_half[i + 1] - log_snr_half[i]
            denoised = pred_xstart
            if previous is not None:
                r = (log_snr_half[i] - log_snr_half[i - 1]) / h
                denoised = (1 + 1 / (2 * r)) * pred_xstart - (1 / (2 * r)) * previous
            x = math.sqrt((1 - a_next) / (1 - a)) * x - math.sqrt(a_next) * math.expm1(-h) * denoised
        previous = pred_xstart
        _report(callback, i, t, x, pred_xstart)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "prk": sample_prk,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sample(name: str, model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
           **options) -> torch.Tensor:
    """Run the sampler called ``name`` (one of :data:`SAMPLERS`) with its ``options`` (e.g. ``eta``)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](model_fn, x, alphas_cumprod, timesteps, **options)
