"""Sampler benchmark on Gaussian mixtures whose optimal eps is known in closed form.

For each case (``smooth``; ``stiff``: two components of std 0.05) and each sampler and step count, prints
the error, the model evaluations (NFE) and the wall time. Error definitions:

- deterministic samplers (ddim, prk, plms, dpmpp_2m): ``ode_rms`` = RMS over the start points of the
  Euclidean distance to the exact probability-flow ODE solution from the same start (RK4 reference on
  ``--ref-steps`` Karras steps, ending with the exact x_0 prediction at the last step, as every sampler);
- ddpm (stochastic): ``sw2`` = sliced 2-Wasserstein distance to fresh draws from the mixture.

Every row also carries ``sw2`` and the case's ``floor`` (sliced W2 between two independent draws, the
distance's own noise). Exits 1 when PRK or PLMS at 20 and 50 steps is worse than DDIM at 4x the steps.

    python tools/bench_samplers.py                # table
    python tools/bench_samplers.py --json         # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from textdiff.diffusion.mixture import CASES, make_case, sliced_wasserstein
from textdiff.diffusion.schedules import alphas_cumprod, betas_for
from textdiff.sampling.samplers import SAMPLERS, sample, sampling_timesteps

ORDER_CHECK = ((20, 80), (50, 200))  # (PRK/PLMS steps, DDIM steps)


def run_row(case, name: str, steps: int, abar: torch.Tensor, spacing: str) -> dict:
    """One sampler at one step count on one case, as the JSON row this tool prints."""
    calls = [0]
    fn = case.mixture.model_fn(abar)

    def counted(x, t):
        calls[0] += 1
        return fn(x, t)

    spec = f"logsnr{steps}" if spacing == "logsnr" else str(steps)
    timesteps = sampling_timesteps(len(abar), spec, abar)
    start = time.perf_counter()
    out = sample(name, counted, case.x, abar, timesteps, generator=torch.Generator().manual_seed(11), disable=True)
    seconds = time.perf_counter() - start
    sw2 = sliced_wasserstein(out, case.target, generator=torch.Generator().manual_seed(3))
    ode_rms = float((out - case.reference).norm(dim=1).pow(2).mean().sqrt())
    stochastic = name == "ddpm"
    return {"case": case.name, "sampler": name, "steps": steps, "error": sw2 if stochastic else ode_rms,
            "error_kind": "sw2" if stochastic else "ode_rms", "nfe": calls[0], "seconds": round(seconds, 4),
            "seconds_per_step": round(seconds / steps, 6), "sw2": sw2, "floor": case.floor, "spacing": spacing}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object per line")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma list of {', '.join(SAMPLERS)}")
    parser.add_argument("--steps", default="5,10,20,50,80,200", help="comma list of step counts "
                        "(80 and 200 are added for the DDIM comparison)")
    parser.add_argument("--spacing", choices=("logsnr", "uniform"), default="logsnr",
                        help="timestep spacing: even in log-SNR, or even integer steps (respacing)")
    parser.add_argument("--n", type=int, default=2000, help="start points per case")
    parser.add_argument("--ref-steps", type=int, default=2000, help="RK4 steps of the reference ODE solve")
    parser.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cases = [c for c in args.cases.split(",") if c]
    samplers = [s for s in args.samplers.split(",") if s]
    for flag, values, known in (("--cases", cases, CASES), ("--samplers", samplers, SAMPLERS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s} | {80, 200})
    except ValueError:
        parser.error(f"--steps {args.steps!r} must be a comma list of integers")
    abar = alphas_cumprod(betas_for(args.schedule, 1000))

    rows = []
    if not args.json:
        print(f"{'case':7} {'sampler':9} {'steps':>5} {'error':>10} {'kind':7} {'nfe':>5} {'s/step':>9} {'sw2':>7}")
    for case_name in cases:
        case = make_case(case_name, abar, args.n, args.seed, args.ref_steps)
        for name in samplers:
            for s in steps:
                row = run_row(case, name, s, abar, args.spacing)
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
