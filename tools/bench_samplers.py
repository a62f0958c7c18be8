"""Sampler benchmark on Gaussian mixtures whose optimal eps is known in closed form.

For each case (``smooth``; ``stiff``: two components of std 0.05; ``blobs8``: 8 dimensions, stds 0.05-0.3) and
each sampler and step count, prints the error, the model evaluations (NFE) and the wall time. Error definitions:

- deterministic samplers: ``ode_rms`` = RMS over the start points of the Euclidean distance to the exact
  probability-flow ODE solution from the same start noise at the grid's first step (RK4 reference on
  ``--ref-steps`` Karras steps down to clean data, ``sigma = 0``);
- ddpm (stochastic): ``sw2`` = sliced 2-Wasserstein distance to fresh draws from the mixture.

Every row also carries ``sw2`` and the case's ``floor`` (sliced W2 between two independent draws, the
distance's own noise). Exits 1 when PRK or PLMS at 20 and 50 steps is worse than DDIM at 4x the steps.

    python tools/bench_samplers.py                # table
    python tools/bench_samplers.py --json         # one JSON object per line
    python tools/bench_samplers.py --peer         # textdiff next to diffusers' schedulers (needs '.[bench]')
    python tools/bench_samplers.py --family       # the default sampler per budget, by the worst case (needs '.[bench]')

``--peer`` runs each method (``PEERS``) on textdiff's default grid for it (``default_grid``) and the same
method in diffusers with its default timestep spacing, from the same start noise, with the same 1000-step
cosine betas (diffusers' ``trained_betas``), the exact mixture eps as the model, and ``set_alpha_to_one``
so every sampler ends at clean data (DEIS, which has no such option, ends at the process's first level and is
measured against the ODE solution there). diffusers' leading spacing starts below the top (t = 900 at 10
steps); each row's error is measured against the ODE solution from its own start, which the table shows.

``--family`` runs every deterministic sampler on every candidate grid at NFE budgets 5, 10, 20, 50 on every
problem of the family (``textdiff.bench.mixture.FAMILY``), all from t = 999, and chooses per budget the
one-call-per-step (sampler, grid) whose largest ratio to the best textdiff error over the problems is smallest
(``textdiff.bench.sampler_choice``); diffusers' schedulers as their users set them up
(``DIFFUSERS_SETTINGS``) run at the same step counts for the comparison. It prints the worst ratio of every
candidate, each sampler's own grid, and per problem the choice next to the best textdiff and diffusers rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from textdiff.bench import sampler_choice
from textdiff.bench.mixture import CASES, FAMILY, make_case, pf_ode_reference, pf_ode_solution, sliced_wasserstein
from textdiff.diffusion.schedules import alpha_bar_at, alphas_cumprod, betas_for
from textdiff.sampling.samplers import SAMPLERS, default_grid, default_sampler, sample, sampling_timesteps

# method -> (textdiff sampler, diffusers scheduler class, its options); diffusers' PNDM without PRK steps is
# PLMS with lower-order warm-up, textdiff's ipndm; with them it is the research code's PRK + PLMS, textdiff's plms
PEERS = {
    "DDIM": ("ddim", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "PLMS": ("ipndm", "PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True}),
    "PRK+PLMS": ("plms", "PNDMScheduler", {"skip_prk_steps": False, "set_alpha_to_one": True}),
    "DPM-Solver++ 2M": ("dpmpp_2m", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    "DPM-Solver++ 3M": ("dpmpp_3m", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    "UniPC": ("unipc", "UniPCMultistepScheduler", {}),
    "DEIS": ("deis", "DEISMultistepScheduler", {}),
}
PEER_STEPS = (10, 20, 50, 80, 200)

ORDER_CHECK = ((20, 80), (50, 200))  # (PRK/PLMS steps, DDIM steps)


def _spec(name: str, steps: int, spacing: str) -> str:
    if spacing == "default":
        return default_grid(name, str(steps))
    return str(steps) if spacing == "uniform" else f"{spacing}{steps}"


class References:
    """Exact PF-ODE solutions from one case's start noise, one per start level and end level (cached)."""

    def __init__(self, case, abar: torch.Tensor, ref_steps: int):
        self.case, self.abar, self.ref_steps = case, abar, ref_steps
        self.cache = {(float(len(abar) - 1), 0.0): case.reference}  # make_case solved from the top

    def at(self, t_start: float, sigma_end: float = 0.0) -> torch.Tensor:
        """The solution from step ``t_start`` to clean data, or to noise level ``sigma_end`` (x there)."""
        if (t_start, sigma_end) not in self.cache:
            abar_start = float(alpha_bar_at(self.abar, torch.tensor(float(t_start))))
            mixture, x = self.case.mixture, self.case.x
            self.cache[t_start, sigma_end] = (
                pf_ode_reference(mixture, x, abar_start, 1.0, self.ref_steps) if sigma_end == 0 else
                pf_ode_solution(mixture, x, abar_start, 1 / (1 + sigma_end ** 2), self.ref_steps))
        return self.cache[t_start, sigma_end]


def _ode_rms(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).norm(dim=1).pow(2).mean().sqrt())


def run_row(case, name: str, steps: int, abar: torch.Tensor, spacing: str, refs: References) -> dict:
    """One sampler at one step count on one case, as the JSON row this tool prints."""
    calls = [0]
    fn = case.mixture.model_fn(abar)

    def counted(x, t):
        calls[0] += 1
        return fn(x, t)

    spec = _spec(name, steps, spacing)
    timesteps = sampling_timesteps(len(abar), spec, abar)
    start = time.perf_counter()
    out = sample(name, counted, case.x, abar, timesteps, generator=torch.Generator().manual_seed(11), disable=True)
    seconds = time.perf_counter() - start
    sw2 = sliced_wasserstein(out, case.target, generator=torch.Generator().manual_seed(3))
    ode_rms = _ode_rms(out, refs.at(float(timesteps[0])))
    stochastic = name == "ddpm"
    return {"case": case.name, "sampler": name, "steps": steps, "error": sw2 if stochastic else ode_rms,
            "error_kind": "sw2" if stochastic else "ode_rms", "nfe": calls[0], "seconds": round(seconds, 4),
            "seconds_per_step": round(seconds / steps, 6), "sw2": sw2, "floor": case.floor, "spacing": spacing,
            "grid": spec, "t_start": float(timesteps[0])}


def run_peer(case, scheduler_name: str, options: dict, steps: int, betas: torch.Tensor, abar: torch.Tensor,
             refs: References) -> dict:
    """diffusers' scheduler ``scheduler_name`` on ``case`` with the exact eps: error, NFE and start step."""
    import diffusers

    scheduler = getattr(diffusers, scheduler_name)(num_train_timesteps=len(betas), trained_betas=betas.tolist(),
                                                   **options)
    scheduler.set_timesteps(steps)
    x, calls = case.x.clone(), 0
    for t in scheduler.timesteps:
        eps = case.mixture.eps(x, abar[int(t)])
        calls += 1
        x = scheduler.step(eps, t, x).prev_sample
    t_start = float(scheduler.timesteps[0])
    sigma_end = float(getattr(scheduler, "sigmas", torch.zeros(1))[-1])  # DEIS ends at the first level, not 0
    return {"error": _ode_rms(x, refs.at(t_start, sigma_end)), "nfe": calls, "t_start": t_start}


def peer_rows(case, abar: torch.Tensor, betas: torch.Tensor, methods: list[str], steps: list[int],
              refs: References) -> list[dict]:
    """One row per method and step count: textdiff on its default grid next to diffusers' same method."""
    rows = []
    for method in methods:
        name, scheduler_name, options = PEERS[method]
        for s in steps:
            mine = run_row(case, name, s, abar, "default", refs)
            peer = run_peer(case, scheduler_name, options, s, betas, abar, refs)
            rows.append({"case": case.name, "method": method, "sampler": name, "steps": s, "grid": mine["grid"],
                         "error": mine["error"], "nfe": mine["nfe"], "t_start": mine["t_start"],
                         "peer": scheduler_name, "peer_error": peer["error"], "peer_nfe": peer["nfe"],
                         "peer_t_start": peer["t_start"],
                         "no_worse": mine["error"] <= peer["error"] and mine["nfe"] <= peer["nfe"]})
    return rows


def print_peer_table(rows: list[dict]) -> None:
    """The side-by-side markdown table of :func:`peer_rows`, then the best error at <= 10 NFE per case."""
    print("| case | method | steps | textdiff grid | textdiff error (NFE) | diffusers error (NFE) | start t (td / dif) "
          "| textdiff no worse |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['method']} | {r['steps']} | {r['grid']} | {r['error']:.3e} ({r['nfe']}) | "
              f"{r['peer_error']:.3e} ({r['peer_nfe']}) | {r['t_start']:.0f} / {r['peer_t_start']:.0f} | "
              f"{'yes' if r['no_worse'] else 'NO'} |")


def ordering_failures(rows: list[dict]) -> list[str]:
    """Messages for each case where PRK/PLMS at 20 (50) steps is worse than DDIM at 80 (200)."""
    error = {(r["case"], r["sampler"], r["steps"]): r["error"] for r in rows}
    failures = []
    for case in sorted({r["case"] for r in rows}):
        for steps, ddim_steps in ORDER_CHECK:
            ddim = error.get((case, "ddim", ddim_steps))
            for name in ("prk", "plms"):
                mine = error.get((case, name, steps))
                if ddim is not None and mine is not None and not mine <= ddim:
                    failures.append(f"{case}: {name} at {steps} steps has error {mine:.3g}, worse than ddim at "
                                    f"{ddim_steps} steps ({ddim:.3g})")
    return failures


def run_peer_table(args, parser, cases: list[str], betas: torch.Tensor, abar: torch.Tensor) -> int:
    """``--peer``: the side-by-side table (or JSON rows); exit 0."""
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in PEERS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        parser.error("--peer needs diffusers: pip install -e '.[bench]'")
    rows = []
    for case_name in cases:
        case = make_case(case_name, abar, args.n, args.seed, args.ref_steps)
        case_rows = peer_rows(case, abar, betas, methods, list(PEER_STEPS), References(case, abar, args.ref_steps))
        rows += case_rows
        if args.json:
            for row in case_rows:
                print(json.dumps(row), flush=True)
    if not args.json:
        print_peer_table(rows)
        for case_name in cases:
            few = [r for r in rows if r["case"] == case_name and r["nfe"] <= 10]
            peer = [r for r in rows if r["case"] == case_name and r["steps"] == 10]
            if few and peer:
                best, rival = min(few, key=lambda r: r["error"]), min(peer, key=lambda r: r["peer_error"])
                print(f"{case_name}: best textdiff at <= 10 NFE {best['error']:.3e} ({best['method']}, "
                      f"{best['grid']}); best diffusers at 10 steps {rival['peer_error']:.3e} ({rival['method']}, "
                      f"{rival['peer_nfe']} NFE)")
    return 0


def family_rows(args, cases: list[str], budgets: list[int], grids: list[str], betas: torch.Tensor,
                abar: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """``--family``: the textdiff and diffusers error rows of every case (printed as JSON lines with --json)."""
    plan = sampler_choice.family_plan(abar, budgets, grids)
    rows, peer = [], []
    for name in cases:
        start = time.perf_counter()
        case = make_case(name, abar, args.n, args.seed, args.ref_steps)
        mine = sampler_choice.textdiff_rows(case, abar, plan)
        theirs = sampler_choice.diffusers_rows(case, betas, abar, budgets, reference_steps=args.ref_steps)
        rows, peer = rows + mine, peer + theirs
        if args.json:
            for row in mine + theirs:
                print(json.dumps(row), flush=True)
        else:
            print(f"{name}: {len(mine)} textdiff and {len(theirs)} diffusers rows in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return rows, peer


def print_family(rows: list[dict], peer: list[dict], budgets: list[int]) -> None:
    """The worst ratio of every candidate per budget, each sampler's own grid, the choice, and per problem the
    choice next to the best textdiff and diffusers rows; markdown tables."""
    ranked = {b: {(c["sampler"], c["grid"]): c for c in sampler_choice.worst_ratios(rows, b)} for b in budgets}
    print("| sampler | grid | " + " | ".join(f"worst ratio at {b} NFE (problem)" for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for key in sorted(ranked[budgets[0]], key=lambda k: ranked[budgets[0]][k]["worst_ratio"]):
        cells = [ranked[b].get(key) for b in budgets]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(
            f"{c['worst_ratio']:.3g} ({c['worst_problem']})" if c else "" for c in cells) + " |")
    print("\n| sampler | " + " | ".join(f"own grid at {b} (worst ratio)" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for name in sampler_choice.ONE_CALL_SAMPLERS:
        own = [sampler_choice.grid_for(rows, b, name) for b in budgets]
        print(f"| {name} | " + " | ".join(f"{c['grid']} ({c['worst_ratio']:.3g})" for c in own) + " |")
    print()
    for b in budgets:
        choice = sampler_choice.choose(rows, b)
        table = sampler_choice.comparison(rows, peer, b, choice["sampler"], choice["grid"])
        current = default_sampler(str(b)), default_grid(default_sampler(str(b)), str(b)).removesuffix(str(b))
        mine = ranked[b].get(current)
        print(f"{b} NFE: choice {choice['sampler']} on {choice['grid']}, worst ratio {choice['worst_ratio']:.3g} "
              f"({choice['worst_problem']}); samplers.py default {current[0]} on {current[1]}: "
              + (f"worst ratio {mine['worst_ratio']:.3g}" if mine else "not measured"))
        print(f"\n| problem | {choice['sampler']} {choice['grid']}{b} | best textdiff (NFE) | error | ratio "
              "| best diffusers (NFE) | error | ratio to it |")
        print("|---|---|---|---|---|---|---|---|")
        for r in table:
            peer_cells = (f"{r['peer']} | {r['peer_error']:.3e} | {r['ratio_to_peer']:.3g}" if r["peer"]
                          else " | | ")
            print(f"| {r['problem']} | {r['error']:.3e} | {r['best']} | {r['best_error']:.3e} | {r['ratio']:.3g} | "
                  f"{peer_cells} |")
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--cases", help=f"comma list of {', '.join(CASES)} or the family's "
                        "d<D>-<smooth|stiff>-<near|far>-<seed> (default: those three; with --family every problem "
                        "of the family)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma list of {', '.join(SAMPLERS)}")
    parser.add_argument("--steps", default="5,10,20,50,80,200", help="comma list of step counts "
                        "(80 and 200 are added for the DDIM comparison)")
    parser.add_argument("--spacing", default="default", help="timestep grid: default (each sampler's default_grid), "
                        "a named grid (quad, logsnr, karras, trailing, leading, or powP_ such as pow1.5_) or uniform "
                        "(even integer steps, respacing)")
    parser.add_argument("--peer", action="store_true", help="textdiff next to diffusers' same method at steps "
                        f"{','.join(map(str, PEER_STEPS))} (--steps is ignored); needs pip install '.[bench]'")
    parser.add_argument("--methods", default=",".join(PEERS), help=f"--peer: comma list of {', '.join(PEERS)}")
    parser.add_argument("--family", action="store_true", help="choose the default (sampler, grid) per NFE budget by "
                        "the worst ratio to the best over the family (--steps, --samplers, --spacing are ignored); "
                        "needs pip install '.[bench]'")
    parser.add_argument("--budgets", default=",".join(map(str, sampler_choice.BUDGETS)),
                        help="--family: comma list of NFE budgets")
    parser.add_argument("--grids", default=",".join(sampler_choice.CANDIDATE_GRIDS),
                        help="--family: comma list of candidate grids (named grids starting at t = 999)")
    parser.add_argument("--n", type=int, default=2000, help="start points per case")
    parser.add_argument("--ref-steps", type=int, default=2000, help="RK4 steps of the reference ODE solve")
    parser.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cases = [c for c in (args.cases or ",".join(FAMILY if args.family else CASES)).split(",") if c]
    samplers = [s for s in args.samplers.split(",") if s]
    for flag, values, known in (("--cases", cases, FAMILY), ("--samplers", samplers, SAMPLERS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s} | {80, 200})
    except ValueError:
        parser.error(f"--steps {args.steps!r} must be a comma list of integers")
    betas = betas_for(args.schedule, 1000)
    abar = alphas_cumprod(betas)
    if args.spacing not in ("default", "uniform"):
        try:
            sampling_timesteps(len(abar), f"{args.spacing}10", abar)
        except ValueError:
            parser.error(f"--spacing {args.spacing!r}: choose default, uniform, quad, logsnr, karras, trailing, "
                         "leading or powP_ (an exponent P > 0 and an underscore, e.g. pow1.5_)")
    if args.peer:
        return run_peer_table(args, parser, cases, betas, abar)
    if args.family:
        try:
            budgets = [int(b) for b in args.budgets.split(",") if b]
        except ValueError:
            parser.error(f"--budgets {args.budgets!r} must be a comma list of integers")
        grids = [g for g in args.grids.split(",") if g]
        for grid in grids:
            try:
                starts = sampling_timesteps(len(abar), f"{grid}10", abar)[0]
            except ValueError:
                parser.error(f"--grids: {grid!r} is no named grid; choose from quad, logsnr, karras, trailing, powP_")
            if starts != len(abar) - 1:
                parser.error(f"--grids: {grid} starts at t = {float(starts):.0f}; every row starts at t = 999")
        try:
            import diffusers  # noqa: F401
        except ImportError:
            parser.error("--family needs diffusers: pip install -e '.[bench]'")
        rows, peer = family_rows(args, cases, budgets, grids, betas, abar)
        if not args.json:
            print_family(rows, peer, budgets)
        return 0

    rows = []
    if not args.json:
        print(f"{'case':7} {'sampler':9} {'steps':>5} {'error':>10} {'kind':7} {'nfe':>5} {'s/step':>9} {'sw2':>7}")
    for case_name in cases:
        case = make_case(case_name, abar, args.n, args.seed, args.ref_steps)
        refs = References(case, abar, args.ref_steps)
        for name in samplers:
            for s in steps:
                row = run_row(case, name, s, abar, args.spacing, refs)
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"{row['case']:7} {name:9} {s:5d} {row['error']:10.3e} {row['error_kind']:7} "
                          f"{row['nfe']:5d} {row['seconds_per_step']:9.2e} {row['sw2']:7.4f}", flush=True)
        if not args.json:
            print(f"{case_name}: sliced-W2 floor of {args.n} points = {case.floor:.4f}")
    failures = ordering_failures(rows)
    for message in failures:
        print(f"ORDERING FAILED: {message}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
