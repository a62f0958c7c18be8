"""Samplers: plain functions over a ``model_fn(x, t)`` callable and a timestep schedule.

Every sampler has the signature ``sample_x(model_fn, x, alphas_cumprod, timesteps, generator=None,
callback=None, disable=None, **options)``:

- ``model_fn(x, t)``: ``x`` ``[N, C, ...]``, ``t`` ``[N]`` float64 (fractional) indices into
  ``alphas_cumprod``, on the host (so that the schedule lookups never wait for the device) -> eps
  ``[N, C, ...]``, or ``[N, 2C, ...]`` with the learned-variance half (``GaussianDiffusion.sampling_fn``
  adapts a network; guidance and thresholding wrap it);
- ``x``: the start, pure noise at ``timesteps[0]``;
- ``alphas_cumprod``: ``[K]`` of the process the model was trained on (or a respaced one);
- ``timesteps``: ``[S]`` decreasing indices (see :func:`sampling_timesteps`, :func:`default_grid`). Each
  sampler integrates from ``timesteps[0]`` to clean data: its last step goes from ``timesteps[-1]`` to
  ``abar = 1``, at the method's own order, so S is the step count and all samplers share one target.

All samplers return the clean sample ``[N, C, ...]``; ``callback`` gets ``{"i", "t", "x", "pred_xstart"}``
after each step; noise comes from ``generator`` only, so a seeded generator makes a run reproducible.
``generator`` may also be a list of N generators, one per row (independently seeded samples in one batch).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from textdiff.diffusion.gaussian import gaussian_noise
from textdiff.diffusion.schedules import alpha_bar_at
# the step grids live in timestep_grids.py; callers take them from here, with the samplers that run on them
from textdiff.sampling.timestep_grids import GRIDS, sampling_timesteps, timesteps_at_log_snr  # noqa: F401

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[dict], None]]


# The default sampler and grid for a plain step count: rows (most steps, sampler, grid), the first row whose bound
# the count meets, the last row above them all. Chosen by tools/bench_samplers.py --family (docs/samplers.md): at
# each NFE budget, the one-call-per-step (sampler, grid) whose largest ratio of error to the best textdiff sampler
# and grid, over 51 Gaussian mixtures (2-16 dimensions, stds 0.02-0.5, modes near and far apart), is smallest.
# Worst ratios 2.0, 6.2, 16.7, 13.7: no candidate comes within the 1.5x aimed at, as iPNDM leads on the near
# mixtures and UniPC on the far ones.
DEFAULT_SAMPLING = ((5, "unipc", "pow1.75_"), (10, "unipc", "pow1.25_"), (20, "ipndm", "pow1.25_"),
                    (50, "ipndm", "pow1.5_"))

# Each sampler's grid for a plain step count, rows (most steps, grid) read as DEFAULT_SAMPLING's. The one-call
# multistep samplers' rows are their own worst-case choices on the same run (so they agree with DEFAULT_SAMPLING);
# ddim (within 3% of its best there at 5 and 10 NFE) and the PRK-started plms keep pow1.5_, prk karras, all three
# chosen against diffusers on --peer; ddpm keeps integer respacing, the process it samples ancestrally.
DEFAULT_GRIDS = {
    "ddpm": ((50, ""),), "ddim": ((50, "pow1.5_"),), "prk": ((50, "karras"),), "plms": ((50, "pow1.5_"),),
    "ipndm": ((5, "pow1.5_"), (10, "trailing"), (20, "pow1.25_"), (50, "pow1.5_")),
    "dpmpp_2m": ((5, "pow1.5_"), (10, "trailing"), (20, "pow1.75_"), (50, "pow1.5_")),
    "dpmpp_3m": ((5, "pow1.5_"), (10, "trailing"), (20, "pow1.25_"), (50, "pow1.25_")),
    "unipc": ((5, "pow1.75_"), (10, "pow1.25_"), (20, "quad"), (50, "pow1.5_")),
    "deis": ((5, "pow1.5_"), (10, "karras"), (20, "karras"), (50, "pow1.25_")),
}


def _row(table, count: int):
    """The first row of ``table`` (rows ``(most steps, ...)``, bounds increasing) whose bound ``count`` meets;
    the last row above them all."""
    return next((row for row in table if count <= row[0]), table[-1])


def step_count(steps: str) -> int:
    """The steps a step spec asks for: ``"20"``, ``"karras20"``, ``"pow1.5_20"``, ``"ddim20"`` -> 20,
    ``"10,10,10"`` -> 30."""
    digits = re.findall(r"\d+", re.sub(r"^pow\d+(?:\.\d+)?_", "", str(steps).strip()))
    if not digits:
        raise ValueError(f"step spec {steps!r} names no step count; write e.g. 20, karras20 or ddim20")
    return sum(int(d) for d in digits)


def default_sampler(steps: str) -> str:
    """The sampler a step spec ``steps`` runs when none is named: :data:`DEFAULT_SAMPLING`'s for its count."""
    return _row(DEFAULT_SAMPLING, step_count(steps))[1]


def default_grid(sampler: str, steps: str) -> str:
    """The step spec ``sampler`` runs on for ``steps``: a plain count ``"20"`` becomes a named grid with that
    count, :data:`DEFAULT_SAMPLING`'s for the count where it names ``sampler``, else the sampler's own
    (:data:`DEFAULT_GRIDS`); any other spec (``"logsnr20"``, ``"ddim50"``, ``"10,10"``) is returned unchanged.
    ddpm keeps integer respacing, the process it samples ancestrally."""
    steps = str(steps).strip()
    if not steps.isdigit():
        return steps
    _, chosen, grid = _row(DEFAULT_SAMPLING, int(steps))
    if chosen != sampler:
        grid = _row(DEFAULT_GRIDS[sampler], int(steps))[1] if sampler in DEFAULT_GRIDS else ""
    return f"{grid}{steps}"


def _abars(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> list[float]:
    """abar at each timestep, then 1.0 for the clean end: ``S + 1`` floats."""
    return alpha_bar_at(alphas_cumprod, timesteps.double()).tolist() + [1.0]


def _call(model_fn: ModelFn, x: torch.Tensor, t: float) -> torch.Tensor:
    return model_fn(x, torch.full((x.shape[0],), float(t), dtype=torch.float64))


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


def _sigma(abar: float) -> float:
    """The noise-to-signal ratio ``sqrt((1 - abar) / abar)``: the time variable of ``dy/dsigma = eps``."""
    return math.sqrt((1 - abar) / abar)


_GAUSS_LEGENDRE = [(0.5 + 0.5 * u, 0.5 * w) for u, w in (
    (-0.9602898564975363, 0.1012285362903763), (-0.7966664774136267, 0.2223810344533745),
    (-0.5255324099163290, 0.3137066458778873), (-0.1834346424956498, 0.3626837833783620),
    (0.1834346424956498, 0.3626837833783620), (0.5255324099163290, 0.3137066458778873),
    (0.7966664774136267, 0.2223810344533745), (0.9602898564975363, 0.1012285362903763))]  # 8 nodes on [0, 1]


def lagrange_integrals(nodes: list[float], lo: float, hi: float,
                       weight: Callable[[float], float] = lambda u: 1.0) -> list[float]:
    """``int_lo^hi weight(u) L_j(u) du`` for the Lagrange basis ``L_j`` through ``nodes`` (one per node).

    The weights of every variable-step multistep update here: integrate the polynomial through the past
    model outputs exactly (8-point Gauss-Legendre is exact for degree 15; with ``weight = exp`` over the
    steps a sampler takes it is exact to rounding).
    """
    out = [0.0] * len(nodes)
    for frac, w in _GAUSS_LEGENDRE:
        u = lo + frac * (hi - lo)
        for j, node in enumerate(nodes):
            basis = math.prod((u - other) / (node - other) for k, other in enumerate(nodes) if k != j)
            out[j] += w * (hi - lo) * weight(u) * basis
    return out


def eps_last_step(x: torch.Tensor, abar: float, sigmas: list[float], eps: list[torch.Tensor]) -> torch.Tensor:
    """The step to the clean image (``sigma = 0``) with the polynomial through ``eps`` at ``sigmas``.

    In ``y = x / sqrt(abar)`` the ODE is ``dy/dsigma = eps``, so ``y_0 = y - int_0^sigma eps``; integrating
    the interpolant of the last ``len(eps)`` outputs (newest last, ``sigmas[-1]`` = the current level) makes
    the last step as accurate as the method's other steps instead of a first-order DDIM jump.
    """
    weights = lagrange_integrals(sigmas, 0.0, sigmas[-1])
    return x / math.sqrt(abar) - sum(w * e for w, e in zip(weights, eps))


# A step whose noise level sigma falls more than this factor (the first step from the cosine schedule's
# clipped top, t = 999, sigma 2e4, on integer, trailing or karras grids) is taken as one DDIM step. Along the
# ODE eps there is constant up to a term in 1/sigma^2 concentrated at the step's low end, which the RK stages
# (at sigma midpoints) misweight by the step's length: PRK's error on such a step does not shrink with the
# step count, while DDIM's, using eps at the start, is the small integral of that term.
TOP_STEP_RATIO = 100.0


def _is_top_step(abar: float, abar_next: float) -> bool:
    return abar_next < 1.0 and _sigma(abar) > TOP_STEP_RATIO * _sigma(abar_next)


def _prk_step(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, t: float,
              t_next: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pseudo Runge-Kutta (4th order) step; returns ``(x_next, eps at (x, t), pred_xstart)``.

    The midpoint is the midpoint in noise level ``sigma``, not in index: the DDIM transfer is exact in
    ``sigma`` (``y_next = y - (sigma - sigma_next) eps``), so this is classical RK4 on ``dy/dsigma = eps`` and
    converges on any grid. The index midpoint of a step that starts at the cosine schedule's clipped top
    (``t = 999``, abar 1000x below ``t = 998``) sits where the noise has already fallen 2000x, and PRK diverged.
    """
    a, a_next = alpha_bar_at(alphas_cumprod, torch.tensor([t, t_next])).tolist()
    eps_1 = _eps(model_fn, x, t)
    if _is_top_step(a, a_next):
        x_next, pred_xstart = ddim_transfer(x, eps_1, a, a_next)
        return x_next, eps_1, pred_xstart
    s_mid = (_sigma(a) + _sigma(a_next)) / 2
    a_mid = 1 / (1 + s_mid ** 2)
    t_mid = float(timesteps_at_log_snr(alphas_cumprod, torch.tensor([math.log(a_mid / (1 - a_mid))]))[0])
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


def _final(x: torch.Tensor, a: float, sigmas: list[float], history: list[torch.Tensor], order: int) -> torch.Tensor:
    return eps_last_step(x, a, sigmas[-order:], history[-order:])


@torch.no_grad()
def sample_prk(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
               generator: Optional[torch.Generator] = None, callback: Callback = None,
               disable: Optional[bool] = None) -> torch.Tensor:
    """Pseudo Runge-Kutta (Liu et al. 2022): RK4 weights on eps, each stage moved by the DDIM transfer.

    Half steps sit at the noise-level midpoint (fractional indices). 4 model calls per step; the last step
    (to the clean image, where no midpoint can be evaluated) integrates the cubic through eps at the last
    four step starts, so NFE = 4 (S - 1) + 1. ``generator`` is unused (deterministic).
    """
    abars = _abars(alphas_cumprod, timesteps)
    ts = timesteps.tolist()
    sigmas, history = [], []
    for i, t in _steps(timesteps, disable, "prk"):
        if i + 1 < len(ts):
            x_next, eps, pred_xstart = _prk_step(model_fn, x, alphas_cumprod, t, ts[i + 1])
        else:
            eps = _eps(model_fn, x, t)
            x_next = None
        sigmas.append(_sigma(abars[i]))
        history.append(eps)
        if x_next is None:
            pred_xstart = (x - math.sqrt(1 - abars[i]) * eps) / math.sqrt(abars[i])
            x_next = _final(x, abars[i], sigmas, history, 4)
        x = x_next
        _report(callback, i, t, x, pred_xstart)
    return x


def _pseudo_multistep(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                      warmup_prk: bool, callback: Callback, disable: Optional[bool], desc: str) -> torch.Tensor:
    """PLMS (PRK warm-up) or iPNDM (lower-order Adams-Bashforth warm-up): the loop both share."""
    abars = _abars(alphas_cumprod, timesteps)
    ts = timesteps.tolist()
    sigmas, history = [], []
    for i, t in _steps(timesteps, disable, desc):
        a = abars[i]
        if warmup_prk and i + 1 < len(ts) and _is_top_step(a, abars[i + 1]):
            x_next, eps, pred_xstart = _prk_step(model_fn, x, alphas_cumprod, t, ts[i + 1])  # one DDIM step
        elif warmup_prk and len(history) < 3 and i + 1 < len(ts):
            x_next, eps, pred_xstart = _prk_step(model_fn, x, alphas_cumprod, t, ts[i + 1])
            sigmas.append(_sigma(a))
            history.append(eps)
        else:
            eps = _eps(model_fn, x, t)
            sigmas.append(_sigma(a))
            history.append(eps)
            pred_xstart = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            if i + 1 == len(ts):
                x_next = _final(x, a, sigmas, history, 4)
            else:
                x_next = ddim_transfer(x, _adams_bashforth(history), a, abars[i + 1])[0]
        history, sigmas = history[-4:], sigmas[-4:]
        x = x_next
        _report(callback, i, t, x, pred_xstart)
    return x


@torch.no_grad()
def sample_plms(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                generator: Optional[torch.Generator] = None, callback: Callback = None,
                disable: Optional[bool] = None) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022): 4th-order Adams-Bashforth on eps with the DDIM transfer.

    The first three steps are PRK steps that fill the eps history; afterwards one model call per step,
    so NFE = S + 9 for S >= 4. The last step integrates the cubic through the last four eps in ``sigma``.
    ``generator`` is unused (deterministic).
    """
    return _pseudo_multistep(model_fn, x, alphas_cumprod, timesteps, True, callback, disable, "plms")


@torch.no_grad()
def sample_ipndm(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                 generator: Optional[torch.Generator] = None, callback: Callback = None,
                 disable: Optional[bool] = None) -> torch.Tensor:
    """PLMS without the PRK warm-up (iPNDM, Zhang & Chen 2023): Adams-Bashforth of order 1, 2, 3, then 4.

    One model call per step (NFE = S), the method diffusers runs as PNDM with ``skip_prk_steps``. The last
    step integrates the cubic through the last four eps in ``sigma``. ``generator`` is unused.
    """
    return _pseudo_multistep(model_fn, x, alphas_cumprod, timesteps, False, callback, disable, "ipndm")


@torch.no_grad()
def sample_deis(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                order: int = 3, generator: Optional[torch.Generator] = None, callback: Callback = None,
                disable: Optional[bool] = None) -> torch.Tensor:
    """DEIS (Zhang & Chen 2023), rho-AB form: ``dy/dsigma = eps`` with the polynomial through the last
    ``order`` eps in ``log sigma`` integrated exactly over each step (orders 1, 2, ... up to ``order``).

    The last step (``sigma = 0``, where ``log sigma`` ends) integrates the polynomial in ``sigma`` instead.
    One model call per step. ``generator`` is unused (deterministic).
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"deis: order is {order}; choose 1, 2, 3 or 4")
    abars = _abars(alphas_cumprod, timesteps)
    sigmas, history = [], []
    for i, t in _steps(timesteps, disable, "deis"):
        a, a_next = abars[i], abars[i + 1]
        eps = _eps(model_fn, x, t)
        pred_xstart = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigmas, history = (sigmas + [_sigma(a)])[-order:], (history + [eps])[-order:]
        if a_next >= 1.0:
            x = eps_last_step(x, a, sigmas, history)
        else:
            logs = [math.log(s) for s in sigmas]
            weights = lagrange_integrals(logs, logs[-1], math.log(_sigma(a_next)), math.exp)
            x = math.sqrt(a_next) * (x / math.sqrt(a) + sum(w * e for w, e in zip(weights, history)))
        _report(callback, i, t, x, pred_xstart)
    return x


def _lambdas(abars: list[float]) -> list[float]:
    """``lambda = log(alpha / sigma) = log-SNR / 2`` at each level (``inf`` at abar = 1)."""
    return [0.5 * math.log(a / (1 - a)) if a < 1 else math.inf for a in abars]


def data_multistep_step(x: torch.Tensor, abar: float, abar_next: float, lambdas: list[float],
                        denoised: list[torch.Tensor]) -> torch.Tensor:
    """One exponential-integrator step of the PF-ODE in data prediction (DPM-Solver++ family).

    ``x_next = (sigma_next / sigma) x + alpha_next int_lambda^lambda_next e^(l - lambda_next) D(l) dl`` with ``D``
    the polynomial through ``denoised`` at ``lambdas`` (any order, variable steps, nodes may include
    ``lambda_next`` for a corrector). ``abar_next < 1``: the step to clean data is :func:`eps_last_step`.
    """
    lam = 0.5 * math.log(abar / (1 - abar))
    lam_next = 0.5 * math.log(abar_next / (1 - abar_next))
    weights = lagrange_integrals([l - lam for l in lambdas], 0.0, lam_next - lam,
                                 lambda u: math.exp(u - (lam_next - lam)))
    return (math.sqrt((1 - abar_next) / (1 - abar)) * x
            + math.sqrt(abar_next) * sum(w * d for w, d in zip(weights, denoised)))


def _data_multistep(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                    order: int, corrector: bool, callback: Callback, disable: Optional[bool], desc: str
                    ) -> torch.Tensor:
    """DPM-Solver++(kM), or UniPC when ``corrector``: the loop both share."""
    if order not in (1, 2, 3):
        raise ValueError(f"{desc}: order is {order}; choose 1, 2 or 3")
    abars = _abars(alphas_cumprod, timesteps)
    lambdas = _lambdas(abars)
    denoised: list[torch.Tensor] = []
    sigmas, history = [], []
    x_prev = None
    for i, t in _steps(timesteps, disable, desc):
        a, a_next = abars[i], abars[i + 1]
        eps = _eps(model_fn, x, t)
        pred_xstart = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigmas, history = (sigmas + [_sigma(a)])[-order:], (history + [eps])[-order:]
        if corrector and x_prev is not None:
            # UniC: redo the last step with the output just computed at its end (no extra model call)
            k = min(order, len(denoised)) + 1
            nodes = lambdas[i - k + 1:i + 1]
            x = data_multistep_step(x_prev, abars[i - 1], a, nodes, denoised[-(k - 1):] + [pred_xstart])
        denoised.append(pred_xstart)
        # at most order 2 on the step before the last: a cubic-in-log-SNR step there, from the coarse end of a
        # short grid, cost 3M a factor 2-3 at 10 steps (diffusers' lower_order_final does the same)
        k = min(order, len(denoised), len(timesteps) - i)
        x_prev = x
        if a_next >= 1.0:
            # x_0 prediction's polynomial in sigma extrapolated to 0 measured 1.3-2x worse at 10 steps than
            # integrating eps's, which is also the last step of every eps multistep here
            x = eps_last_step(x, a, sigmas, history)
        else:
            x = data_multistep_step(x, a, a_next, lambdas[i - k + 1:i + 1], denoised[-k:])
        denoised = denoised[-order:]
        _report(callback, i, t, x, pred_xstart)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                    generator: Optional[torch.Generator] = None, callback: Callback = None,
                    disable: Optional[bool] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR on the x_0 prediction.

    The first step is first order; the last (to the clean image) integrates the line through the last two
    eps in ``sigma`` (:func:`eps_last_step`). One model call per step. ``generator`` is unused (deterministic).
    """
    return _data_multistep(model_fn, x, alphas_cumprod, timesteps, 2, False, callback, disable, "dpmpp_2m")


@torch.no_grad()
def sample_dpmpp_3m(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                    generator: Optional[torch.Generator] = None, callback: Callback = None,
                    disable: Optional[bool] = None) -> torch.Tensor:
    """DPM-Solver++(3M): the quadratic through the last three x_0 predictions in log-SNR, integrated exactly.

    Orders 1, 2, then 3, order 2 on the step before the last; the last integrates the quadratic through the
    last three eps in ``sigma``. One model call per step. ``generator`` is unused (deterministic).
    """
    return _data_multistep(model_fn, x, alphas_cumprod, timesteps, 3, False, callback, disable, "dpmpp_3m")


@torch.no_grad()
def sample_unipc(model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                 order: int = 2, generator: Optional[torch.Generator] = None, callback: Callback = None,
                 disable: Optional[bool] = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): a data-prediction multistep predictor of ``order`` and a corrector of
    ``order + 1`` that reuses the model output at the predicted point, so one model call per step.

    Both integrate their Lagrange interpolant exactly (``data_multistep_step``) rather than with UniPC's
    B(h) approximation. The last step integrates the polynomial through the last ``order`` eps in ``sigma``
    and has no corrector (nothing is evaluated at the clean end).
    ``generator`` is unused (deterministic).
    """
    return _data_multistep(model_fn, x, alphas_cumprod, timesteps, order, True, callback, disable, "unipc")


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "prk": sample_prk,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "ipndm": sample_ipndm,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
    "deis": sample_deis,
}


def sample(name: str, model_fn: ModelFn, x: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
           **options) -> torch.Tensor:
    """Run the sampler called ``name`` (one of :data:`SAMPLERS`) with its ``options`` (e.g. ``eta``)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](model_fn, x, alphas_cumprod, timesteps, **options)
