"""Specification of textdiff.sampling.samplers on a Gaussian mixture whose optimal eps is known exactly.

Error = RMS over points of the distance to the exact probability-flow ODE solution from the same start
(``pf_ode_reference``); distribution distance = sliced 2-Wasserstein to fresh draws from the mixture.
"""

import math

import pytest
import torch

from textdiff.diffusion.gaussian import GaussianDiffusion
from textdiff.diffusion.mixture import CASES, pf_ode_reference, sliced_wasserstein
from textdiff.diffusion.respace import respace, space_timesteps
from textdiff.diffusion.schedules import alphas_cumprod, cosine_betas
from textdiff.sampling.samplers import SAMPLERS, sample, sampling_timesteps

ABAR = alphas_cumprod(cosine_betas(1000))
DETERMINISTIC = ("ddim", "prk", "plms", "dpmpp_2m")


@pytest.fixture(scope="module")
def starts():
    """Per case: 32 start points and their exact PF-ODE solutions (RK4, 150 Karras steps: error < 1e-4)."""
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {case: (x, pf_ode_reference(mix, x, float(ABAR[-1]), float(ABAR[0]), num_steps=150))
            for case, mix in CASES.items()}


def _error(case, name, steps, starts):
    x, ref = starts[case]
    out = sample(name, CASES[case].model_fn(ABAR), x, ABAR, sampling_timesteps(1000, f"logsnr{steps}", ABAR))
    return (out - ref).norm(dim=1).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("case", ["smooth", "stiff"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_pf_ode_solution(case, name, starts):
    errors = [_error(case, name, steps, starts) for steps in (8, 32, 128)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < errors[0] / 5
    assert errors[2] < {"ddim": 0.05, "prk": 1e-3, "plms": 1e-3, "dpmpp_2m": 2e-3}[name]


@pytest.mark.parametrize("case", ["smooth", "stiff"])
def test_plms_and_prk_at_20_and_50_steps_are_no_worse_than_ddim_at_4x(case, starts):
    for steps in (20, 50):
        ddim = _error(case, "ddim", 4 * steps, starts)
        assert _error(case, "prk", steps, starts) <= ddim
        assert _error(case, "plms", steps, starts) <= ddim


@pytest.mark.filterwarnings("ignore:.*multiplies abar")  # the 4-step run is meant to be too coarse
@pytest.mark.parametrize("name,steps", [("ddim", 100), ("prk", 25), ("plms", 50), ("dpmpp_2m", 50), ("ddpm", 200)])
def test_samplers_reach_the_target_distribution(name, steps):
    mix = CASES["stiff"]
    target = mix.sample(1500, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(mix.sample(1500, torch.Generator().manual_seed(2)), target,
                               generator=torch.Generator().manual_seed(3))
    x = torch.randn(1500, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def distance(s):
        out = sample(name, mix.model_fn(ABAR), x, ABAR, sampling_timesteps(1000, f"logsnr{s}", ABAR),
                     generator=torch.Generator().manual_seed(5))
        return sliced_wasserstein(out, target, generator=torch.Generator().manual_seed(3))

    coarse, fine = distance(4), distance(steps)
    assert fine < coarse
    assert fine < floor + 0.02  # finite-sample floor is ~0.03 for 1500 points


def test_ddpm_is_reproducible_under_a_seeded_generator():
    fn = CASES["smooth"].model_fn(ABAR)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = sampling_timesteps(1000, "10")
    runs = [sample("ddpm", fn, x, ABAR, ts, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - runs[2]).abs().max().item() > 1e-3


def test_ddpm_on_a_respaced_process_equals_ddpm_at_its_kept_steps():
    """Learned variance included: a constant v = 0.3 interpolates the same betas either way."""
    mix = CASES["smooth"]
    kept = space_timesteps(1000, "25")
    short = respace(GaussianDiffusion(cosine_betas(1000), learn_sigma=True), kept)

    def with_v(fn):
        return lambda x, t: torch.cat([fn(x, t), torch.full_like(x, 0.3)], dim=1)

    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = sample("ddpm", with_v(mix.model_fn(ABAR)), x, ABAR, torch.tensor(kept[::-1], dtype=torch.float64),
                  generator=torch.Generator().manual_seed(1))
    spaced = sample("ddpm", with_v(mix.model_fn(short.alphas_cumprod)), x, short.alphas_cumprod,
                    torch.arange(24, -1, -1, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(full, spaced, atol=1e-9)


@pytest.mark.parametrize("name,nfe", [("ddpm", 12), ("ddim", 12), ("prk", 45), ("plms", 21), ("dpmpp_2m", 12)])
def test_model_evaluations_per_sampler_at_12_steps(name, nfe):
    calls = []
    fn = CASES["smooth"].model_fn(ABAR)

    def counted(x, t):
        calls.append(1)
        return fn(x, t)

    x = torch.zeros(2, 2, dtype=torch.float64)
    steps = []
    sample(name, counted, x, ABAR, sampling_timesteps(1000, "logsnr12", ABAR), callback=lambda d: steps.append(d["i"]))
    assert len(calls) == nfe
    assert steps == list(range(12))


def test_logsnr_timesteps_shrink_the_noise_by_a_constant_factor():
    ts = sampling_timesteps(1000, "logsnr6", ABAR)
    assert ts[0].item() == 999 and ts[-1].item() == 0
    from textdiff.diffusion.schedules import alpha_bar_at
    abar = alpha_bar_at(ABAR, ts)
    gaps = (abar / (1 - abar)).log().diff()
    assert gaps.max().item() == pytest.approx(gaps.min().item(), rel=0.02)


def test_unknown_sampler_and_bad_step_specs_are_named():
    with pytest.raises(ValueError, match="ddim, prk"):
        sample("euler", None, torch.zeros(1, 2), ABAR, torch.zeros(1))
    with pytest.raises(ValueError, match="logsnrN"):
        sampling_timesteps(1000, "logsnr0", ABAR)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sampling_timesteps(1000, "logsnr20")


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_samplers.py"
    spec = importlib.util.spec_from_file_location("bench_samplers", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_tool_prints_json_rows_and_passes_the_ordering_check(capsys):
    import json

    rc = _bench_module().main(["--json", "--n", "16", "--ref-steps", "100", "--steps", "20,50", "--cases", "stiff",
                               "--samplers", "ddim,prk,plms"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert len(rows) == 12  # 3 samplers x steps 20, 50, 80, 200
    assert {"sampler", "steps", "error", "nfe", "seconds", "case"} <= set(rows[0])
    assert {(r["sampler"], r["steps"], r["nfe"]) for r in rows if r["steps"] == 20} == {
        ("ddim", 20, 20), ("prk", 20, 77), ("plms", 20, 29)}


def test_bench_ordering_check_reports_a_loss_to_ddim():
    rows = [{"case": "c", "sampler": "ddim", "steps": 80, "error": 0.01},
            {"case": "c", "sampler": "prk", "steps": 20, "error": 0.005},
            {"case": "c", "sampler": "plms", "steps": 20, "error": 0.02}]
    assert _bench_module().ordering_failures(rows) == [
        "c: plms at 20 steps has error 0.02, worse than ddim at 80 steps (0.01)"]


def test_ddim_with_eta_1_is_ddpm_with_the_posterior_variance():
    fn = CASES["stiff"].model_fn(ABAR)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = sampling_timesteps(1000, "20")
    ddim = sample("ddim", fn, x, ABAR, ts, eta=1.0, generator=torch.Generator().manual_seed(9))
    ddpm = sample("ddpm", fn, x, ABAR, ts, fixed_variance="small", generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ddim, ddpm, atol=1e-9)


def test_pseudo_methods_warn_on_the_cosine_schedules_steep_first_integer_step():
    fn = CASES["smooth"].model_fn(ABAR)
    x = torch.zeros(2, 2, dtype=torch.float64)
    for name in ("prk", "plms"):
        with pytest.warns(UserWarning, match="logsnrN"):
            sample(name, fn, x, ABAR, sampling_timesteps(1000, "20"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample("plms", fn, x, ABAR, sampling_timesteps(1000, "logsnr20", ABAR))
