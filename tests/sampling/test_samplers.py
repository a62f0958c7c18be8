"""Specification of textdiff.sampling.samplers on a Gaussian mixture whose optimal eps is known exactly.

Error = RMS over points of the distance to the exact probability-flow ODE solution from the same start
(``pf_ode_reference``); distribution distance = sliced 2-Wasserstein to fresh draws from the mixture.
"""

import math

import pytest
import torch

from textdiff.diffusion.gaussian import GaussianDiffusion
from textdiff.bench.mixture import CASES, pf_ode_reference, sliced_wasserstein
from textdiff.config.respacing import space_timesteps
from textdiff.diffusion.respace import respace
from textdiff.diffusion.schedules import alphas_cumprod, cosine_betas
from textdiff.sampling.samplers import (DEFAULT_GRIDS, DEFAULT_SAMPLING, SAMPLERS, data_multistep_step, default_grid,
                                        default_sampler, eps_last_step, sample, sampling_timesteps)

ABAR = alphas_cumprod(cosine_betas(1000))
DETERMINISTIC = ("ddim", "prk", "plms", "ipndm", "dpmpp_2m", "dpmpp_3m", "unipc", "deis")


@pytest.fixture(scope="module")
def starts():
    """Per 2-D case: 32 start points and their exact PF-ODE solutions down to clean data (RK4, 300 Karras
    steps: within 1e-5 of a 2000-step solve)."""
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {case: (x, pf_ode_reference(CASES[case], x, float(ABAR[-1]), 1.0, num_steps=300))
            for case in ("smooth", "stiff")}


def _error(case, name, steps, starts, grid="logsnr"):
    x, ref = starts[case]
    spec = f"{grid}{steps}" if grid != "uniform" else str(steps)
    ts = sampling_timesteps(1000, spec, ABAR)
    if ts[0] != 999:  # leading grids start lower: the exact solution from that start
        ref = pf_ode_reference(CASES[case], x, float(ABAR[int(ts[0])]), 1.0, num_steps=300)
    out = sample(name, CASES[case].model_fn(ABAR), x, ABAR, ts)
    return (out - ref).norm(dim=1).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("case", ["smooth", "stiff"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_pf_ode_solution(case, name, starts):
    errors = [_error(case, name, steps, starts) for steps in (8, 32, 128)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < errors[0] / 5
    assert errors[2] < {"ddim": 0.05, "dpmpp_2m": 2e-3}.get(name, 1e-3)


@pytest.mark.parametrize("grid", ["uniform", "trailing", "leading", "karras", "logsnr"])
@pytest.mark.parametrize("name", ["prk", "plms"])
def test_prk_and_plms_converge_on_every_grid(name, grid, starts):
    """Integer grids start at t = 999, where the cosine schedule's clipped beta makes the first step fall
    1000x in noise level; PRK and PLMS diverged there (errors of 1e2 to 1e8) before the sigma midpoint and
    the DDIM top step. Four times the steps must shrink the error at least 4x, to below 5e-3."""
    coarse, fine = (_error("stiff", name, steps, starts, grid) for steps in (20, 80))
    assert fine < coarse / 4
    assert fine < 5e-3


@pytest.mark.parametrize("name,grid,factor", [("ipndm", "quad", 16), ("deis", "quad", 10),
                                              ("dpmpp_3m", "quad", 16), ("prk", "karras", 64)])
def test_high_order_samplers_converge_at_their_order(name, grid, factor, starts):
    """From 20 to 80 steps the error falls at least ``factor``: about order 2 (16x) for the multistep methods,
    whose lower-order warm-up steps cap them at these counts (measured: ipndm 24x, deis 13x, dpmpp_3m 29x), and
    order 3 for PRK (measured 99x). 80 steps keep the errors (>= 2e-6) above the 300-step reference's own (1e-6)."""
    coarse, fine = (_error("smooth", name, steps, starts, grid) for steps in (20, 80))
    assert fine < coarse / factor


def test_eps_last_step_integrates_the_interpolant_of_its_order_to_sigma_0():
    """With eps a quadratic in sigma along the way, ``y_0 = y - int_0^s eps`` is exact with 3 nodes; with 2
    nodes it misses the quadratic term's integral minus its linear fit, here 0.5 * c2 * (...)."""
    c0, c1, c2 = 0.3, -1.2, 2.0
    eps = lambda s: torch.full((1, 1), c0 + c1 * s + c2 * s ** 2, dtype=torch.float64)  # noqa: E731
    sigma, abar = 0.1, 1 / (1 + 0.1 ** 2)
    x = torch.full((1, 1), 0.7, dtype=torch.float64)
    exact = 0.7 / math.sqrt(abar) - (c0 * sigma + c1 * sigma ** 2 / 2 + c2 * sigma ** 3 / 3)
    nodes = [0.3, 0.2, 0.1]
    three = eps_last_step(x, abar, nodes, [eps(s) for s in nodes]).item()
    two = eps_last_step(x, abar, nodes[1:], [eps(s) for s in nodes[1:]]).item()
    one = eps_last_step(x, abar, nodes[2:], [eps(sigma)]).item()
    assert three == pytest.approx(exact, abs=1e-14)
    # linear through (0.2, 0.1): the quadratic c2 s^2 is replaced by c2 (0.3 s - 0.02); integral gap over [0, 0.1]
    assert two - exact == pytest.approx(c2 * (0.1 ** 3 / 3 - 0.3 * 0.1 ** 2 / 2 + 0.02 * 0.1), abs=1e-14)
    assert abs(one - exact) > abs(two - exact)


def test_data_prediction_step_integrates_a_linear_x0_prediction_in_log_snr_exactly():
    """DPM-Solver++ / UniPC steps: ``x_t = (s_t / s_s) x_s + a_t int e^(l - l_t) D(l) dl``; for D linear in
    lambda the integral is ``d0 (1 - e^-h) + d1 ((l_t - 1) - (l_s - 1) e^-h)``, and 2 nodes reproduce it."""
    d0, d1 = 0.4, -0.3
    d = lambda lam: torch.full((1, 1), d0 + d1 * lam, dtype=torch.float64)  # noqa: E731
    abars = [0.2, 0.5, 0.9]  # previous, current, next
    lams = [0.5 * math.log(a / (1 - a)) for a in abars]
    x = torch.full((1, 1), 0.8, dtype=torch.float64)
    out = data_multistep_step(x, abars[1], abars[2], lams[:2], [d(lams[0]), d(lams[1])]).item()
    h = lams[2] - lams[1]
    integral = d0 * -math.expm1(-h) + d1 * ((lams[2] - 1) - (lams[1] - 1) * math.exp(-h))
    exact = math.sqrt((1 - abars[2]) / (1 - abars[1])) * 0.8 + math.sqrt(abars[2]) * integral
    assert out == pytest.approx(exact, abs=1e-13)


def test_plain_step_counts_run_on_each_samplers_default_grid():
    assert default_grid("ddim", "20") == "pow1.5_20"
    assert default_grid("plms", "20") == "pow1.5_20"
    assert default_grid("ipndm", "20") == "pow1.25_20"  # the spelling evaluation's eval.sampler at 20 steps
    assert default_grid("dpmpp_3m", " 20") == "pow1.25_20"
    assert default_grid("deis", "20") == "karras20"
    assert default_grid("prk", "20") == "karras20"
    assert default_grid("ddpm", "20") == "20"
    assert default_grid("ipndm", "logsnr20") == "logsnr20"
    assert default_grid("plms", "ddim50") == "ddim50"


def test_a_samplers_grid_follows_its_row_for_the_step_count():
    """Rows (most steps, grid): 5, 10, 20, 50, and the last row above 50."""
    assert [default_grid("ipndm", str(n)) for n in (4, 5, 8, 10, 15, 20, 30, 50, 200)] == [
        "pow1.5_4", "pow1.5_5", "trailing8", "trailing10", "pow1.25_15", "pow1.25_20", "pow1.5_30", "pow1.5_50",
        "pow1.5_200"]
    assert [default_grid("unipc", str(n)) for n in (5, 10, 20, 50)] == [
        "pow1.75_5", "pow1.25_10", "quad20", "pow1.5_50"]


def test_the_default_sampler_follows_the_table_by_the_step_count_asked():
    assert [default_sampler(n) for n in ("3", "5", "10", "20", "50", "100")] == [
        "unipc", "unipc", "unipc", "ipndm", "ipndm", "ipndm"]
    assert [default_sampler(n) for n in ("karras20", "pow1.5_8", "ddim10", "10,10,10")] == [
        "ipndm", "unipc", "unipc", "ipndm"]
    assert [default_grid(default_sampler(str(n)), str(n)) for n in (5, 10, 20, 50)] == [
        "pow1.75_5", "pow1.25_10", "pow1.25_20", "pow1.5_50"]
    with pytest.raises(ValueError, match="'karras' names no step count"):
        default_sampler("karras")


def test_each_default_pair_is_its_samplers_own_grid_at_that_budget():
    for bound, sampler, grid in DEFAULT_SAMPLING:
        assert default_grid(sampler, str(bound)) == f"{grid}{bound}"
        assert dict(DEFAULT_GRIDS[sampler])[bound] == grid


def test_stage_settings_default_to_the_tables_choice_for_50_steps():
    from textdiff.sampling.cascade import StageSettings

    assert (StageSettings().sampler, StageSettings().steps) == ("ipndm", "pow1.5_50")


def _sample_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "sample.py"
    spec = importlib.util.spec_from_file_location("sample_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("flags,base,up", [
    ([], ("ipndm", "pow1.5_50"), ("ipndm", "pow1.5_50")),
    (["--steps", "10", "--up-steps", "20"], ("unipc", "pow1.25_10"), ("ipndm", "pow1.25_20")),
    (["--steps", "5", "--up-steps", "karras8"], ("unipc", "pow1.75_5"), ("unipc", "karras8")),
    (["--sampler", "deis", "--steps", "10", "--up-steps", "20"], ("deis", "karras10"), ("deis", "karras20")),
    (["--steps", "20", "--up-sampler", "ddim"], ("ipndm", "pow1.25_20"), ("ddim", "pow1.5_20")),
])
def test_sample_tool_defaults_each_stages_sampler_and_grid_by_its_step_count(flags, base, up):
    tool = _sample_tool()
    args = tool.build_parser().parse_args(["--weights", "base.safetensors", "--upsampler", "up.safetensors",
                                           "--out", "out", *flags])
    specs, _ = tool.stage_specs(args)
    assert [(s.settings.sampler, s.settings.steps) for s in specs] == [base, up]


def test_sample_tool_names_the_flag_of_a_step_spec_without_a_count():
    tool = _sample_tool()
    args = tool.build_parser().parse_args(["--weights", "base.safetensors", "--steps", "karras", "--out", "out"])
    with pytest.raises(tool.CascadeError, match="--steps: step spec 'karras' names no step count"):
        tool.stage_specs(args)


@pytest.mark.parametrize("spec", ["pow1.5", "pow_20", "pow0_20", "pow1.5_0", "pow1.5_1001", "pow-1_20", "pow1.5_2x"])
def test_malformed_power_grid_names_the_spec_and_the_form(spec):
    with pytest.raises(ValueError, match=rf"{spec}.*powP_N with an exponent P > 0 and N in \[1, 1000\]"):
        sampling_timesteps(1000, spec)


def test_named_grids():
    assert sampling_timesteps(1000, "trailing10").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampling_timesteps(1000, "leading10").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert sampling_timesteps(1000, "quad4").tolist() == [999, 999 * 0.5625, 999 * 0.25, 999 * 0.0625]
    assert sampling_timesteps(1000, "pow2_4").tolist() == sampling_timesteps(1000, "quad4").tolist()
    # (1 - i/4)^1.5 for i = 0..3: 1, 0.75^1.5, 0.5^1.5, 0.25^1.5 = 0.125
    assert sampling_timesteps(1000, "pow1.5_4").tolist() == pytest.approx(
        [999, 999 * 0.75 ** 1.5, 999 * 0.5 ** 1.5, 999 * 0.125], rel=1e-15)
    assert sampling_timesteps(1000, "pow1_5").tolist() == pytest.approx([999, 799.2, 599.4, 399.6, 199.8], rel=1e-15)
    karras = sampling_timesteps(1000, "karras10", ABAR)
    from textdiff.diffusion.schedules import alpha_bar_at
    sigma = ((1 - alpha_bar_at(ABAR, karras)) / alpha_bar_at(ABAR, karras)).sqrt()
    assert karras[0].item() == 999 and karras[-1].item() == 0
    assert sigma[1].item() == pytest.approx(20.0, rel=1e-9)  # 2 x the step count
    ramp = sigma[1:] ** (1 / 7)
    assert ramp.diff().max().item() == pytest.approx(ramp.diff().min().item(), rel=1e-6)


@pytest.mark.parametrize("case", ["smooth", "stiff"])
def test_plms_and_prk_at_20_and_50_steps_are_no_worse_than_ddim_at_4x(case, starts):
    for steps in (20, 50):
        ddim = _error(case, "ddim", 4 * steps, starts)
        assert _error(case, "prk", steps, starts) <= ddim
        assert _error(case, "plms", steps, starts) <= ddim


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


@pytest.mark.parametrize("name,nfe", [("ddpm", 12), ("ddim", 12), ("prk", 45), ("plms", 21), ("dpmpp_2m", 12),
                                      ("ipndm", 12), ("dpmpp_3m", 12), ("unipc", 12), ("deis", 12)])
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
    with pytest.raises(ValueError, match="karrasN"):
        sampling_timesteps(1000, "karras20x", ABAR)
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
                               "--samplers", "ddim,prk,plms", "--spacing", "logsnr"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert len(rows) == 12  # 3 samplers x steps 20, 50, 80, 200
    assert {"sampler", "steps", "error", "nfe", "seconds", "case"} <= set(rows[0])
    assert {(r["sampler"], r["steps"], r["nfe"]) for r in rows if r["steps"] == 20} == {
        ("ddim", 20, 20), ("prk", 20, 77), ("plms", 20, 29)}


def test_bench_spacing_takes_a_power_grid_and_refuses_a_bad_one(capsys):
    import json

    rc = _bench_module().main(["--json", "--n", "8", "--ref-steps", "50", "--steps", "10", "--cases", "smooth",
                               "--samplers", "ddim", "--spacing", "pow1.5_"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [r["grid"] for r in rows] == ["pow1.5_10", "pow1.5_80", "pow1.5_200"]
    with pytest.raises(SystemExit) as e:
        _bench_module().main(["--spacing", "pow-2_"])
    assert e.value.code == 2 and "--spacing 'pow-2_'" in capsys.readouterr().err


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


def test_bench_peer_table_puts_diffusers_next_to_textdiff(capsys):
    pytest.importorskip("diffusers")
    import json

    rc = _bench_module().main(["--peer", "--json", "--n", "8", "--ref-steps", "100", "--cases", "smooth",
                               "--methods", "DDIM,PLMS"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert [(r["method"], r["steps"]) for r in rows] == [(m, s) for m in ("DDIM", "PLMS") for s in (10, 20, 50, 80, 200)]
    plms10 = rows[5]
    assert (plms10["sampler"], plms10["grid"], plms10["nfe"], plms10["peer_nfe"]) == ("ipndm", "trailing10", 10, 11)
    assert rows[0]["peer_t_start"] == 900  # diffusers' DDIM default: leading spacing
    assert all(r["error"] > 0 and r["peer_error"] > 0 for r in rows)
