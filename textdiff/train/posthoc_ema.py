"""Power-function EMA profiles and their post-hoc reconstruction (EDM2: Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", section 3).

A power-function EMA with exponent ``gamma`` averages the weights of steps 1..t with weights proportional to
``tau^gamma``: its decay at update t (1-based) is ``(1 - 1/t)^(gamma + 1)``, so its length grows with the run
instead of being fixed in steps. Its width is given as ``sigma_rel``, the standard deviation of that profile
relative to t: ``sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3))``.

Training tracks two such profiles and saves both every ``ema.snapshot_every`` steps. Afterwards any profile
(any ``sigma_rel``, at any snapshot's step) is approximated by a linear combination of the snapshots: the
coefficients minimise the L2 distance between the profiles (continuous, normalised to integrate to 1), which
reduces to a small linear system of closed-form inner products (:func:`solve_coefficients`). The averages are
linear in the weights, so the same coefficients combine the snapshots' weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from textdiff.formats.ema_snapshots import SNAPSHOT_DIR, list_snapshots, read_snapshot


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function profile of relative width ``sigma_rel`` (0 < sigma_rel
    < 0.2887, the width of ``gamma = 0``, a uniform average): the largest real root of
    ``gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2)``."""
    if not 0.0 < sigma_rel < 1 / math.sqrt(12):
        raise ValueError(f"sigma_rel {sigma_rel} must lie in (0, {1 / math.sqrt(12):.4f}); EDM2 uses 0.05 and 0.10")
    t = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile with exponent ``gamma`` (> -1)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def power_decay(gamma: float, update: int) -> float:
    """The decay of a power-function EMA at 0-based ``update`` (t = update + 1): ``(1 - 1/t)^(gamma + 1)``;
    0 at the first update, so the average starts as the first weights."""
    t = update + 1
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """Inner products of normalised power profiles ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on
    [0, t] (broadcasting): ``int p_a p_b = (g_a + 1)(g_b + 1) min(t)^(g_a + g_b + 1) / ((g_a + g_b + 1)
    t_a^(g_a + 1) t_b^(g_b + 1))``."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    shorter = np.minimum(t_a, t_b)
    exponent = gamma_a + gamma_b + 1
    # written with ratios to stay finite for long runs (t ~ 1e6, gamma ~ 7)
    return ((gamma_a + 1) * (gamma_b + 1) / exponent * (shorter / t_a) ** (gamma_a + 1)
            * (shorter / t_b) ** (gamma_b + 1) / shorter)


def solve_coefficients(times: Sequence[float], gammas: Sequence[float], target_time: float,
                       target_gamma: float) -> tuple[np.ndarray, float]:
    """Coefficients ``x`` [M] of the snapshots (profile i: ``gammas[i]`` at ``times[i]``) whose combination
    comes closest in L2 to the target profile, and the fit: ``||sum x_i p_i - p_target|| / ||p_target||``
    (0: exact). Least squares through the Gram matrix; ``lstsq`` copes with snapshots that are nearly
    alike."""
    times, gammas = np.asarray(times, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    if len(times) == 0:
        raise ValueError("no snapshots to reconstruct from; train with ema.snapshot_every > 0 and "
                         "ema.power_sigma_rels set")
    gram = profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])  # [M, M]
    rhs = profile_inner(times, gammas, target_time, target_gamma)  # [M]
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    own = float(profile_inner(target_time, target_gamma, target_time, target_gamma))
    residual = max(0.0, float(x @ gram @ x - 2 * x @ rhs + own))
    return x, math.sqrt(residual / own)


@dataclass(frozen=True)
class Reconstruction:
    """An EMA rebuilt from snapshots: ``weights`` {parameter name: fp32 tensor}, the ``step`` and EMA update
    count ``updates`` it stands at, its ``sigma_rel``, the ``fit`` of :func:`solve_coefficients`, and each
    snapshot average used with its coefficient."""

    weights: dict[str, torch.Tensor]
    step: int
    updates: int
    sigma_rel: float
    fit: float
    terms: list[tuple[int, str, float]]  # (snapshot step, average name, coefficient)


def reconstruct(run_dir: str | Path, sigma_rel: float, step: Optional[int] = None) -> Reconstruction:
    """The power-function EMA of relative width ``sigma_rel`` at snapshot ``step`` (default: the last) of the
    run in ``run_dir``, from every snapshot up to it. Raises ValueError naming the snapshot steps there are
    when ``step`` is not one of them."""
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise ValueError(f"{Path(run_dir) / SNAPSHOT_DIR} holds no EMA snapshots; train with ema.power_sigma_rels "
                         "(e.g. [0.05, 0.10]) and ema.snapshot_every > 0")
    steps = [s.step for s in snapshots]
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"--step {step} is not a snapshot step; this run has snapshots at {steps}")
    used = [s for s in snapshots if s.step <= step]
    target = used[-1]
    pairs = [(s, key, rel) for s in used for key, rel in sorted(s.sigma_rels.items())]
    x, fit = solve_coefficients([s.updates for s, _, _ in pairs], [sigma_rel_to_gamma(r) for _, _, r in pairs],
                                target.updates, sigma_rel_to_gamma(sigma_rel))
    weights: dict[str, torch.Tensor] = {}
    for info in used:
        averages = read_snapshot(info)
        for (s, key, _), coefficient in zip(pairs, x):
            if s is info:
                for name, t in averages[key].items():
                    t64 = t.double() * float(coefficient)
                    weights[name] = weights[name] + t64 if name in weights else t64
    return Reconstruction({n: t.float() for n, t in weights.items()}, step, target.updates, sigma_rel, fit,
                          [(s.step, key, float(c)) for (s, key, _), c in zip(pairs, x)])
