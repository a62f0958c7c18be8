"""A Gaussian-mixture data set whose optimal denoiser is known in closed form, for testing samplers.

For data ``x_0 ~ sum_k w_k N(mu_k, s_k^2 I)`` the noised marginal at level ``abar`` is the mixture
``sum_k w_k N(sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I)``, so the exact (MSE-optimal) eps prediction is
``-sqrt(1 - abar) * grad log p_t(x)``. With it, a sampler's only error is its discretisation error, which
:func:`pf_ode_reference` measures against a high-accuracy solve of the probability-flow ODE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch

from textdiff.diffusion.schedules import alpha_bar_at


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic components: ``weights`` ``[K]`` (sum 1), ``means`` ``[K, D]``, ``stds`` ``[K]``."""

    weights: tuple[float, ...]
    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log weights [K], means [K, D], variances [K])`` as float64 tensors, built once."""
        return (torch.tensor(self.weights, dtype=torch.float64).log(), torch.tensor(self.means, dtype=torch.float64),
                torch.tensor(self.stds, dtype=torch.float64) ** 2)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` draws from the mixture, ``[n, D]`` float64."""
        log_w, means, var = self._tensors
        k = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64)
        return means[k] + var[k, None].sqrt() * noise

    def eps(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """Exact eps prediction for ``x`` ``[N, D]`` noised to ``abar`` (scalar or ``[N]``): ``[N, D]``."""
        log_w, means, var0 = self._tensors
        x = x.to(torch.float64)
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)  # [N or 1, 1]
        var = abar * var0 + (1 - abar)  # [N or 1, K]: variance of each noised component
        diff = x[:, None, :] - abar.sqrt()[:, :, None] * means  # [N, K, D]
        log_resp = log_w - 0.5 * x.shape[1] * var.log() - 0.5 * (diff ** 2).sum(-1) / var
        resp = torch.softmax(log_resp, dim=1)  # [N, K]
        score = -((resp / var)[:, :, None] * diff).sum(1)
        return -(1 - abar).sqrt() * score

    def denoise(self, x: torch.Tensor, abar: float) -> torch.Tensor:
        """Exact x_0 prediction ``E[x_0 | x_t = x]`` at level ``abar``: ``[N, D]``."""
        return (x.double() - math.sqrt(1 - abar) * self.eps(x, torch.tensor(abar))) / math.sqrt(abar)

    def model_fn(self, alphas_cumprod: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The optimal model as a sampler callable ``fn(x [N, D], t [N]) -> eps [N, D]`` over index ``t``."""
        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.eps(x, alpha_bar_at(alphas_cumprod, t)).to(x.dtype)
        return fn


# The two benchmark cases; chosen once, before any sampler was run on them.
SMOOTH = GaussianMixture(
    weights=(0.3, 0.2, 0.25, 0.25),
    means=((-0.5, -0.5), (0.5, 0.5), (0.6, -0.4), (-0.4, 0.6)),
    stds=(0.3, 0.25, 0.35, 0.3),
)
STIFF = GaussianMixture(
    weights=(0.3, 0.2, 0.25, 0.25),
    means=((-0.5, -0.5), (0.5, 0.5), (0.6, -0.4), (-0.4, 0.6)),
    stds=(0.05, 0.05, 0.3, 0.2),
)
# 8 dimensions, component stds 0.05 to 0.3 (issue 11); means are signed patterns of 0.3 to 0.6, fixed up front.
BLOBS8 = GaussianMixture(
    weights=(0.2, 0.15, 0.15, 0.2, 0.15, 0.15),
    means=((0.5, -0.5, 0.3, 0.0, -0.3, 0.5, -0.4, 0.2), (-0.5, 0.4, -0.3, 0.5, 0.2, -0.4, 0.3, 0.0),
           (0.3, 0.3, -0.6, -0.3, 0.5, 0.0, 0.4, -0.5), (-0.3, -0.4, 0.5, -0.5, 0.0, 0.3, -0.3, 0.6),
           (0.0, 0.6, 0.4, 0.3, -0.5, -0.3, -0.5, -0.3), (0.6, 0.0, 0.0, -0.6, 0.4, 0.4, 0.5, 0.4)),
    stds=(0.05, 0.1, 0.15, 0.2, 0.25, 0.3),
)
CASES = {"smooth": SMOOTH, "stiff": STIFF, "blobs8": BLOBS8}


def random_mixture(dim: int, components: int, std_ranges: tuple[tuple[float, float], ...], seed: int,
                   radius: float = 0.6, sibling_gap: tuple[float, float] = (0.1, 0.3)) -> GaussianMixture:
    """A seeded mixture of ``components`` (even) isotropic Gaussians in ``dim`` dimensions, in sibling pairs.

    Each pair's centre lies ``radius`` from the origin in a uniformly random direction; its two means sit
    either side of it along another random direction, a gap drawn uniformly from ``sibling_gap`` apart. So
    siblings merge at scales above the gap and split below it, and pairs (about ``radius`` x sqrt(2) apart)
    merge only at coarser scales: modes that overlap at some scales and not at others. Component k's std is
    drawn log-uniformly from ``std_ranges[k % len(std_ranges)]`` (two ranges: a narrow sibling next to a
    broad one); weights are uniform in [0.5, 1.5], normalised. The draws depend on ``dim``, ``components``
    and ``seed`` alone, so two families that differ only in ``std_ranges`` share means and weights.
    """
    if components < 2 or components % 2:
        raise ValueError(f"random_mixture: components is {components}; give an even number >= 2 (sibling pairs)")
    g = torch.Generator().manual_seed(seed)

    def directions(n: int) -> torch.Tensor:
        d = torch.randn(n, dim, generator=g, dtype=torch.float64)
        return d / d.norm(dim=1, keepdim=True)

    pairs = components // 2
    centres = radius * directions(pairs)  # [P, D]
    gaps = sibling_gap[0] + (sibling_gap[1] - sibling_gap[0]) * torch.rand(pairs, 1, generator=g, dtype=torch.float64)
    offsets = gaps / 2 * directions(pairs)  # [P, D]
    means = torch.stack([centres + offsets, centres - offsets], dim=1).reshape(components, dim)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    u = torch.rand(components, generator=g, dtype=torch.float64)
    lo = torch.tensor([math.log(std_ranges[k % len(std_ranges)][0]) for k in range(components)], dtype=torch.float64)
    hi = torch.tensor([math.log(std_ranges[k % len(std_ranges)][1]) for k in range(components)], dtype=torch.float64)
    stds = (lo + u * (hi - lo)).exp()
    return GaussianMixture(weights=tuple((weights / weights.sum()).tolist()),
                           means=tuple(tuple(m) for m in means.tolist()), stds=tuple(stds.tolist()))


# The family the default samplers are chosen on (docs/samplers.md): dimensions 2, 4, 8, 16 x smooth (every std
# 0.2-0.5) or stiff (in each pair a std-0.02-0.05 component next to a std-0.2-0.5 one) x near (pair centres 0.6
# from the origin, as smooth, stiff and blobs8's means) or far (sqrt(D) from it: an RMS of 1 per coordinate, the
# widest spread of data in [-1, 1]) x mixture seeds 0, 1, 2; 8 components (4 sibling pairs) each; plus smooth,
# stiff and blobs8. The near half was fixed before any sampler ran on it; the far half was added after that
# first run, which did not reproduce the failure of quad on a wide 8-D mixture (docs/samplers.md).
FAMILY_DIMS, FAMILY_SEEDS, FAMILY_COMPONENTS = (2, 4, 8, 16), (0, 1, 2), 8
FAMILY_STDS = {"smooth": ((0.2, 0.5),), "stiff": ((0.02, 0.05), (0.2, 0.5))}
FAMILY_SPREADS = ("near", "far")


def family_radius(spread: str, dim: int) -> float:
    """How far a family mixture's pair centres lie from the origin: 0.6 (``near``) or ``sqrt(dim)`` (``far``)."""
    return 0.6 if spread == "near" else math.sqrt(dim)


FAMILY = {**CASES, **{f"d{dim}-{kind}-{spread}-{seed}": random_mixture(dim, FAMILY_COMPONENTS, stds, seed,
                                                                       radius=family_radius(spread, dim))
                      for dim in FAMILY_DIMS for kind, stds in FAMILY_STDS.items() for spread in FAMILY_SPREADS
                      for seed in FAMILY_SEEDS}}


def karras_sigmas(sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """``num_steps + 1`` noise levels from ``sigma_max`` down to 0, dense near 0 (Karras et al. 2022)."""
    ramp = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    return (sigma_max ** (1 / rho) * (1 - ramp)) ** rho


@torch.no_grad()
def pf_ode_solution(mixture: GaussianMixture, x: torch.Tensor, abar_start: float, abar_end: float,
                    num_steps: int = 2000) -> torch.Tensor:
    """The probability-flow ODE solved from ``x`` ``[N, D]`` at level ``abar_start`` down to ``abar_end``:
    the noisy ``x`` there, ``[N, D]`` float64 (at ``abar_end = 1`` the clean sample).

    In ``y = x / sqrt(abar)`` and ``sigma = sqrt((1 - abar) / abar)`` the ODE is ``dy/dsigma = eps(x, abar)``
    (independent of the schedule); classical RK4 on :func:`karras_sigmas` steps.
    """
    sigma_end = math.sqrt((1 - abar_end) / abar_end)
    sigmas = (karras_sigmas(math.sqrt((1 - abar_start) / abar_start) - sigma_end, num_steps) + sigma_end).tolist()
    y = x.to(torch.float64) / math.sqrt(abar_start)

    def f(y: torch.Tensor, sigma: float) -> torch.Tensor:
        abar = 1.0 / (1.0 + sigma ** 2)
        return mixture.eps(y * math.sqrt(abar), torch.tensor(abar))

    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        h = s_next - s
        k1 = f(y, s)
        k2 = f(y + h / 2 * k1, s + h / 2)
        k3 = f(y + h / 2 * k2, s + h / 2)
        k4 = f(y + h * k3, s_next)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y * math.sqrt(abar_end)


def pf_ode_reference(mixture: GaussianMixture, x: torch.Tensor, abar_start: float, abar_end: float = 1.0,
                     num_steps: int = 2000) -> torch.Tensor:
    """The exact sampler output: the probability-flow ODE solved from ``x`` ``[N, D]`` at level
    ``abar_start`` down to ``abar_end`` (:func:`pf_ode_solution`), then the exact x_0 prediction there. The
    default ``abar_end = 1`` is the ODE's own end (clean data, ``sigma = 0``, where eps vanishes), the point
    every sampler aims at. Returns ``[N, D]`` float64.
    """
    return mixture.denoise(pf_ode_solution(mixture, x, abar_start, abar_end, num_steps), abar_end)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256,
                       generator: Optional[torch.Generator] = None) -> float:
    """Sliced 2-Wasserstein distance between equal-size point sets ``[n, D]``.

    Root mean over random unit directions of the squared W2 distance between the 1-D projections.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa = (a.double() @ directions).sort(dim=0).values
    pb = (b.double() @ directions).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


@dataclass(frozen=True)
class BenchCase:
    """One benchmark problem: start points, their exact sampler target, and target-distribution draws."""

    name: str
    mixture: GaussianMixture
    x: torch.Tensor  # [n, D] start noise at the first step
    reference: torch.Tensor  # [n, D] exact PF-ODE solution from x (pf_ode_reference)
    target: torch.Tensor  # [n, D] fresh draws from the mixture
    floor: float  # sliced W2 between two independent draws of n: the distance's own noise level


def make_case(name: str, alphas_cumprod: torch.Tensor, n: int, seed: int = 0, reference_steps: int = 2000) -> BenchCase:
    """Draw the starts and targets of case ``name`` (:data:`FAMILY`, which holds :data:`CASES`) and solve its
    reference from the top of the schedule (``alphas_cumprod[-1]``)."""
    if name not in FAMILY:
        raise ValueError(f"benchmark case {name!r} is unknown; choose one of {', '.join(FAMILY)}")
    mixture = FAMILY[name]
    x = torch.randn(n, mixture_dim(mixture), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    reference = pf_ode_reference(mixture, x, float(alphas_cumprod[-1]), 1.0, reference_steps)
    target = mixture.sample(n, torch.Generator().manual_seed(seed + 1))
    floor = sliced_wasserstein(mixture.sample(n, torch.Generator().manual_seed(seed + 2)), target,
                               generator=torch.Generator().manual_seed(seed + 3))
    return BenchCase(name, mixture, x, reference, target, floor)


def mixture_dim(mixture: GaussianMixture) -> int:
    """The data dimension D of ``mixture``."""
    return len(mixture.means[0])
