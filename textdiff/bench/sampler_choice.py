"""The default sampler and grid per step budget, chosen by the worst case over a family of problems.

On every problem of :data:`textdiff.bench.mixture.FAMILY` (Gaussian mixtures whose exact eps is known), each
deterministic textdiff sampler runs on each candidate grid at each budget of model calls (NFE), from the same
start noise at t = 999, and its error is the RMS distance to the exact probability-flow ODE solution from that
start (:func:`textdiff_rows`). At a budget, a (sampler, grid) pair's ratio on a problem is its error over the
best textdiff (sampler, grid) there, any sampler at the most steps that fit the budget; the choice is the
one-call-per-step pair whose largest ratio over the family is smallest (:func:`choose`), not the one best on
a single problem. diffusers' schedulers, set up as their users set them (:data:`DIFFUSERS_SETTINGS`), run at
the budget's step count, so at least as many model calls (:func:`diffusers_rows`), for the comparison.
tools/bench_samplers.py --family is the command line; docs/samplers.md holds the family, the run and the choice.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from textdiff.bench.mixture import BenchCase, pf_ode_solution
from textdiff.sampling.samplers import sample, sampling_timesteps

BUDGETS = (5, 10, 20, 50)
# every named grid that starts at t = 999 (leading starts lower); pow1.25_ ... pow3_ bracket quad (pow2)
CANDIDATE_GRIDS = ("trailing", "logsnr", "karras", "pow1.25_", "pow1.5_", "pow1.75_", "quad", "pow2.5_", "pow3_")
ONE_CALL_SAMPLERS = ("ddim", "ipndm", "dpmpp_2m", "dpmpp_3m", "unipc", "deis")  # NFE = steps: the candidates
SEVERAL_CALL_SAMPLERS = ("prk", "plms")  # in the best-of, at the most steps whose NFE fits the budget


def _multistep(label: str, scheduler: str, options: dict) -> list[tuple[str, str, dict]]:
    """A multistep scheduler on each of the spacings its users pick: diffusers' default (linspace), trailing
    (Lin et al. 2023, Table 2), and Karras sigmas (the "DPM++ 2M Karras" of the web UIs)."""
    return [(label, scheduler, dict(options)),
            (f"{label} trailing", scheduler, {**options, "timestep_spacing": "trailing"}),
            (f"{label} Karras", scheduler, {**options, "use_karras_sigmas": True})]


# diffusers as its users set it up, each starting at t = 999 like every textdiff row. DDIM and PNDM on trailing
# spacing: their step() assumes spacing K // N, so linspace would step to the wrong level (diffusers issue
# 12633), and leading starts at t = 1000 - K // N. set_alpha_to_one ends them at clean data. PNDM runs without
# PRK steps (PLMS, one call per step and one more) and with them (more calls than steps). solver_order: the docs
# recommend 2 for guided and 3 for unconditional sampling, so both.
DIFFUSERS_SETTINGS: tuple[tuple[str, str, dict], ...] = tuple(
    [("DDIM trailing", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True,
                                         "timestep_spacing": "trailing"}),
     ("PNDM (PLMS) trailing", "PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True,
                                                "timestep_spacing": "trailing"}),
     ("PNDM (PRK+PLMS) trailing", "PNDMScheduler", {"skip_prk_steps": False, "set_alpha_to_one": True,
                                                    "timestep_spacing": "trailing"})]
    + _multistep("DPM-Solver++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2})
    + _multistep("DPM-Solver++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3})
    + _multistep("UniPC 2", "UniPCMultistepScheduler", {"solver_order": 2})
    + _multistep("UniPC 3", "UniPCMultistepScheduler", {"solver_order": 3})
    + _multistep("DEIS 2", "DEISMultistepScheduler", {"solver_order": 2})
    + _multistep("DEIS 3", "DEISMultistepScheduler", {"solver_order": 3}))


def model_calls(sampler: str, spec: str, alphas_cumprod: torch.Tensor) -> int:
    """The model evaluations (NFE) ``sampler`` spends on step spec ``spec``, counted on a zero model."""
    calls = [0]

    def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return torch.zeros_like(x)

    timesteps = sampling_timesteps(len(alphas_cumprod), spec, alphas_cumprod)
    sample(sampler, zero, torch.zeros(1, 1, dtype=torch.float64), alphas_cumprod, timesteps, disable=True)
    return calls[0]


def steps_within(sampler: str, grid: str, budget: int, alphas_cumprod: torch.Tensor) -> Optional[int]:
    """The most steps of ``grid`` whose NFE under ``sampler`` is at most ``budget`` (None if not even 2);
    a bisection, since NFE grows with the steps."""
    lo, hi = 1, budget + 1  # NFE(lo) <= budget < NFE(hi), with NFE(1) taken as fitting
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if model_calls(sampler, f"{grid}{mid}", alphas_cumprod) <= budget else (lo, mid)
    return lo if lo >= 2 else None


def ode_rms(out: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS over points of the Euclidean distance between ``out`` and ``reference`` ``[N, D]``."""
    return float((out.double() - reference).norm(dim=1).pow(2).mean().sqrt())


def textdiff_rows(case: BenchCase, alphas_cumprod: torch.Tensor,
                  plan: Iterable[tuple[str, str, int, int]]) -> list[dict]:
    """Error rows of ``case`` for each ``(sampler, grid, budget, steps)`` of ``plan``; every grid starts at
    t = 999, where ``case.reference`` was solved from."""
    fn = case.mixture.model_fn(alphas_cumprod)
    rows = []
    for name, grid, budget, steps in plan:
        calls = [0]

        def counted(x, t):
            calls[0] += 1
            return fn(x, t)

        timesteps = sampling_timesteps(len(alphas_cumprod), f"{grid}{steps}", alphas_cumprod)
        if timesteps[0] != len(alphas_cumprod) - 1:
            raise ValueError(f"grid {grid}{steps} starts at t = {float(timesteps[0])}, below the top the reference "
                             "starts from")
        out = sample(name, counted, case.x, alphas_cumprod, timesteps, disable=True)
        rows.append({"problem": case.name, "sampler": name, "grid": grid, "budget": budget, "steps": steps,
                     "nfe": calls[0], "error": ode_rms(out, case.reference)})
    return rows


def family_plan(alphas_cumprod: torch.Tensor, budgets: Sequence[int] = BUDGETS,
                grids: Sequence[str] = CANDIDATE_GRIDS) -> list[tuple[str, str, int, int]]:
    """``(sampler, grid, budget, steps)`` for every deterministic sampler and grid at each budget: one-call
    samplers at ``steps = budget``, PRK and PLMS at the most steps that fit it (none where not even 2 do)."""
    plan = [(name, grid, b, b) for b in budgets for name in ONE_CALL_SAMPLERS for grid in grids]
    for b in budgets:
        for name in SEVERAL_CALL_SAMPLERS:
            for grid in grids:
                steps = steps_within(name, grid, b, alphas_cumprod)
                if steps is not None:
                    plan.append((name, grid, b, steps))
    return plan


def diffusers_rows(case: BenchCase, betas: torch.Tensor, alphas_cumprod: torch.Tensor, budgets: Sequence[int],
                   settings: Sequence[tuple[str, str, dict]] = DIFFUSERS_SETTINGS, reference_steps: int = 1000
                   ) -> list[dict]:
    """diffusers' schedulers (``settings``: label, class name, options) on ``case`` at ``steps = budget``
    with the exact eps at their integer timesteps and the same betas (``trained_betas``). Each error is
    against the exact ODE solution from the same start (t = 999) to the scheduler's own last level: clean
    data, or for DEIS, whose last sigma is the process's first, x at that level."""
    import diffusers  # deferred: the optional `bench` extra, a benchmark peer only

    top = float(alphas_cumprod[-1])
    references = {0.0: case.reference}  # by the last level's sigma
    rows = []
    for label, scheduler_name, options in settings:
        for budget in budgets:
            scheduler = getattr(diffusers, scheduler_name)(num_train_timesteps=len(betas), trained_betas=betas.tolist(),
                                                           **options)
            scheduler.set_timesteps(budget)
            if hasattr(scheduler, "set_begin_index"):
                # Karras sigmas on the cosine schedule repeat t = 999; without this, step() would take the
                # repeat for an image-to-image start and begin at the second level
                scheduler.set_begin_index(0)
            if int(scheduler.timesteps[0]) != len(betas) - 1:
                raise ValueError(f"{label} starts at t = {int(scheduler.timesteps[0])}, not at the top; every row "
                                 "starts at t = 999")
            x, calls = case.x.clone(), 0
            for t in scheduler.timesteps:
                eps = case.mixture.eps(x, alphas_cumprod[int(t)])
                calls += 1
                x = scheduler.step(eps, t, x).prev_sample
            sigma_end = float(getattr(scheduler, "sigmas", torch.zeros(1))[-1])
            if sigma_end not in references:
                references[sigma_end] = pf_ode_solution(case.mixture, case.x, top, 1 / (1 + sigma_end ** 2),
                                                        reference_steps)
            reference = references[sigma_end]
            rows.append({"problem": case.name, "peer": label, "scheduler": scheduler_name, "options": options,
                         "budget": budget, "steps": budget, "nfe": calls, "sigma_end": sigma_end,
                         "error": ode_rms(x, reference)})
    return rows


def best_rows(rows: Sequence[dict], budget: int) -> dict[str, dict]:
    """Per problem, the row of lowest error among ``rows`` at ``budget``."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["budget"] == budget and (r["problem"] not in best or r["error"] < best[r["problem"]]["error"]):
            best[r["problem"]] = r
    return best


def worst_ratios(rows: Sequence[dict], budget: int, samplers: Sequence[str] = ONE_CALL_SAMPLERS) -> list[dict]:
    """Each (sampler, grid) of ``samplers`` at ``budget``: its largest ratio over the problems of its error to
    the best row there (any sampler), and that problem; lowest first. A pair missing on some problem that
    others ran on counts as infinitely worse there."""
    best = best_rows(rows, budget)
    errors: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["budget"] == budget and r["sampler"] in samplers:
            errors.setdefault((r["sampler"], r["grid"]), {})[r["problem"]] = r["error"]
    out = []
    for (name, grid), by_problem in errors.items():
        ratios = {p: by_problem.get(p, math.inf) / b["error"] for p, b in best.items()}
        problem = max(ratios, key=ratios.get)
        out.append({"sampler": name, "grid": grid, "budget": budget, "worst_ratio": ratios[problem],
                    "worst_problem": problem})
    return sorted(out, key=lambda c: (c["worst_ratio"], c["sampler"], c["grid"]))


def choose(rows: Sequence[dict], budget: int, samplers: Sequence[str] = ONE_CALL_SAMPLERS) -> dict:
    """The (sampler, grid) of ``samplers`` whose worst ratio to the best at ``budget`` is smallest
    (:func:`worst_ratios`' first entry)."""
    return worst_ratios(rows, budget, samplers)[0]


def grid_for(rows: Sequence[dict], budget: int, sampler: str) -> dict:
    """``sampler``'s own grid at ``budget``: the grid whose worst ratio to the best (any sampler) is smallest."""
    return choose(rows, budget, (sampler,))


def comparison(rows: Sequence[dict], peer: Sequence[dict], budget: int, sampler: str, grid: str) -> list[dict]:
    """Per problem at ``budget``: ``(sampler, grid)``'s error, the best textdiff row, the best diffusers row,
    the ratio to each, and whether it is within ``1.5x`` of the best and no worse than diffusers' best."""
    best, rival = best_rows(rows, budget), best_rows(peer, budget)
    mine = {r["problem"]: r for r in rows if r["budget"] == budget and (r["sampler"], r["grid"]) == (sampler, grid)}
    out = []
    for problem, b in best.items():
        m, d = mine[problem], rival.get(problem)
        out.append({"problem": problem, "budget": budget, "sampler": sampler, "grid": grid, "error": m["error"],
                    "best_error": b["error"], "best": f"{b['sampler']} {b['grid']}{b['steps']} ({b['nfe']})",
                    "ratio": m["error"] / b["error"],
                    "peer_error": d["error"] if d else None, "peer": f"{d['peer']} ({d['nfe']})" if d else None,
                    "ratio_to_peer": m["error"] / d["error"] if d else None})
    return out
