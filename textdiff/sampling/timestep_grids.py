"""Step grids: the decreasing (fractional) indices into ``alphas_cumprod`` that a sampler visits.

A grid is named by a spec: a respacing spec (``"50"``, ``"ddim50"``, ``"10,10,10"``) or a named grid with a
count (``"quad20"``, ``"pow1.5_20"``, ``"trailing20"``, ``"leading20"``, ``"karras20"``, ``"logsnr20"``). Fractional indices are
fine: samplers interpolate ``log abar`` between integer steps (``alpha_bar_at``).
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch

from textdiff.config.respacing import space_timesteps


GRIDS = ("logsnr", "karras", "trailing", "leading", "quad", "pow")
_POW_SPEC = re.compile(r"pow(\d+(?:\.\d+)?)_(\d+)")


def sampling_timesteps(num_timesteps: int, spec: str | int,
                       alphas_cumprod: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decreasing step indices ``[S]`` float64 for a step spec, from about ``num_timesteps - 1`` down to 0.

    ``spec`` is a respacing spec (``50``, ``"ddim50"``, ``"10,10,10"``: integer steps, see
    ``textdiff.diffusion.respace``, first step at ``num_timesteps - 1``) or a grid by name and count:

    - ``"logsnrN"``: N steps evenly spaced in log-SNR ``log(abar / (1 - abar))`` at fractional indices, so
      every step shrinks the noise by the same factor;
    - ``"karrasN"``: N noise levels ``sigma = sqrt((1 - abar) / abar)`` spaced as Karras et al. (2022)
      (rho 7) between the process's first and last step, at fractional indices;
    - ``"trailingN"``: integer steps ``round(K - i K / N) - 1``, from ``K - 1`` (diffusers' "trailing");
    - ``"leadingN"``: integer steps ``(N - 1 - i) (K // N)``, from ``K - K // N`` (diffusers' "leading":
      it skips the top of the schedule, so its start is not pure noise);
    - ``"quadN"``: fractional ``(K - 1) (1 - i / N)^2``: trailing's ends, steps shrinking quadratically towards
      clean data (the DDIM paper's "quad" spacing, from the top instead of from 0);
    - ``"powP_N"``: fractional ``(K - 1) (1 - i / N)^P`` for an exponent P > 0 (``"pow1.5_20"``); ``"quadN"`` is
      ``"pow2_N"``, P = 1 spaces the indices evenly.

    The named grids need ``alphas_cumprod`` (``[num_timesteps]``) only for logsnr and karras.
    """
    spec = str(spec).strip()
    name = next((g for g in GRIDS if spec.startswith(g)), None)
    if name is None:
        return torch.tensor(space_timesteps(num_timesteps, spec)[::-1], dtype=torch.float64)
    if name == "pow":
        return _pow_timesteps(num_timesteps, spec)
    count = spec[len(name):]
    if not count.isdigit() or not 1 <= int(count) <= num_timesteps:
        raise ValueError(f"sampling steps {spec!r}: write {name}N with N in [1, {num_timesteps}], e.g. {name}20")
    count = int(count)
    if name == "trailing":
        return (torch.arange(num_timesteps, 0, -num_timesteps / count, dtype=torch.float64).round() - 1)[:count]
    if name == "leading":
        return torch.arange(count - 1, -1, -1, dtype=torch.float64) * (num_timesteps // count)
    if name == "quad":
        return power_timesteps(num_timesteps, count, 2.0)
    if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
        raise ValueError(f"sampling steps {spec!r} need the process's alphas_cumprod ([{num_timesteps}])")
    return logsnr_timesteps(alphas_cumprod, count) if name == "logsnr" else karras_timesteps(alphas_cumprod, count)


def power_timesteps(num_timesteps: int, steps: int, power: float) -> torch.Tensor:
    """``(K - 1) (1 - i / steps)^power`` for ``i < steps``: ``[steps]`` float64 from the top down to near 0."""
    return (num_timesteps - 1) * (1 - torch.arange(steps, dtype=torch.float64) / steps) ** power


def _pow_timesteps(num_timesteps: int, spec: str) -> torch.Tensor:
    match = _POW_SPEC.fullmatch(spec)
    if match is None or float(match[1]) <= 0 or not 1 <= int(match[2]) <= num_timesteps:
        raise ValueError(f"sampling steps {spec!r}: write powP_N with an exponent P > 0 and N in [1, {num_timesteps}], "
                         "e.g. pow1.5_20")
    return power_timesteps(num_timesteps, int(match[2]), float(match[1]))


def timesteps_at_log_snr(alphas_cumprod: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
    """Fractional indices ``[M]`` where the process's log-SNR equals ``log_snr`` ``[M]`` (clamped to its range).

    Inverts the log-SNR of :func:`alpha_bar_at` (log abar interpolated linearly between integer steps).
    """
    abar = alphas_cumprod.to(torch.float64)
    table = (abar / (1 - abar)).log()  # [K], decreasing in t
    wanted = log_snr.to(torch.float64).clamp(float(table[-1]), float(table[0]))
    hi = torch.searchsorted(-table, -wanted).clamp(1, len(table) - 1)
    lo = hi - 1
    t = torch.empty_like(wanted)
    for j in range(len(wanted)):  # solve log-SNR(lo + f) = wanted for f in [0, 1], by bisection
        a, b = 0.0, 1.0
        la, lb = float(abar[lo[j]].log()), float(abar[hi[j]].log())
        for _ in range(60):
            f = (a + b) / 2
            log_a = la + f * (lb - la)
            if log_a - math.log(-math.expm1(log_a)) > float(wanted[j]):
                a = f
            else:
                b = f
        t[j] = float(lo[j]) + (a + b) / 2
    return t


def _pin_ends(t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    t[0] = num_timesteps - 1
    if len(t) > 1:
        t[-1] = 0.0
    return t


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` fractional indices ``[steps]`` from ``K - 1`` to 0, evenly spaced in log-SNR."""
    abar = alphas_cumprod.to(torch.float64)
    ends = (abar[[-1, 0]] / (1 - abar[[-1, 0]])).log()
    wanted = torch.linspace(float(ends[0]), float(ends[1]), steps, dtype=torch.float64)
    return _pin_ends(timesteps_at_log_snr(abar, wanted), len(abar))


# The karras grid's top level, chosen by measurement (docs/samplers.md): above sigma ~ 2 N, eps is constant
# along the ODE up to a term in 1/sigma^2, so one step from pure noise to there costs O(1 / (2 N)), the same
# order as the rest of an N-step grid, and the remaining N - 1 levels all go where the data's scales are.
KARRAS_SIGMA_MAX_PER_STEP, KARRAS_RHO = 2.0, 7.0


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, sigma_max: Optional[float] = None,
                     rho: float = KARRAS_RHO) -> torch.Tensor:
    """``steps`` fractional indices ``[steps]``: ``K - 1`` (pure noise), then ``steps - 1`` noise levels
    ``sigma = sqrt((1 - abar) / abar)`` from ``sigma_max`` (default ``2 steps``) down to the process's last
    step, spaced as Karras et al. (2022): ``(s_max^(1/rho) + r (s_min^(1/rho) - s_max^(1/rho)))^rho``, r in [0, 1].
    """
    abar = alphas_cumprod.to(torch.float64)
    top, bottom = float(((1 - abar[-1]) / abar[-1]).sqrt()), float(((1 - abar[0]) / abar[0]).sqrt())
    hi = min(KARRAS_SIGMA_MAX_PER_STEP * steps if sigma_max is None else sigma_max, top)
    ramp = torch.linspace(0, 1, steps - 1, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + ramp * (bottom ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = timesteps_at_log_snr(abar, -2 * sigmas.log())
    if len(t):
        t[-1] = 0.0
    return torch.cat([torch.tensor([len(abar) - 1.0], dtype=torch.float64), t])
