"""Specification of the sampler family and of choosing the default sampler by the worst case over it
(textdiff.bench.mixture.FAMILY, textdiff.bench.sampler_choice, tools/bench_samplers.py --family)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from textdiff.bench.mixture import BLOBS8, FAMILY, SMOOTH, STIFF, make_case, random_mixture
from textdiff.bench.sampler_choice import (choose, comparison, family_plan, model_calls, steps_within, textdiff_rows,
                                           worst_ratios)
from textdiff.diffusion.schedules import alphas_cumprod, cosine_betas
from textdiff.sampling.samplers import DEFAULT_SAMPLING, default_grid, default_sampler

ABAR = alphas_cumprod(cosine_betas(1000))


def _generated(name):
    dim, kind, spread, seed = name.split("-")
    return int(dim[1:]), kind, spread, int(seed)


def test_the_family_is_51_problems_the_three_cases_and_dims_2_to_16_smooth_or_stiff_near_or_far_3_seeds():
    assert len(FAMILY) == 51
    assert (FAMILY["smooth"], FAMILY["stiff"], FAMILY["blobs8"]) == (SMOOTH, STIFF, BLOBS8)
    generated = sorted(_generated(n) for n in FAMILY if n.startswith("d"))
    assert generated == sorted((d, k, s, seed) for d in (2, 4, 8, 16) for k in ("smooth", "stiff")
                               for s in ("near", "far") for seed in (0, 1, 2))
    for name in FAMILY:
        if name.startswith("d"):
            m = FAMILY[name]
            assert len(m.weights) == 8 and len(m.means[0]) == _generated(name)[0]
            assert sum(m.weights) == pytest.approx(1.0, abs=1e-12)


def test_smooth_stds_lie_in_0p2_to_0p5_and_stiff_pairs_a_0p02_to_0p05_std_with_a_0p2_to_0p5_one():
    for name, m in FAMILY.items():
        if "smooth-" in name:
            assert all(0.2 <= s <= 0.5 for s in m.stds)
        elif "stiff-" in name:
            assert all(0.02 <= s <= 0.05 for s in m.stds[0::2]) and all(0.2 <= s <= 0.5 for s in m.stds[1::2])


def test_siblings_lie_0p1_to_0p3_apart_around_centres_0p6_near_or_sqrt_dim_far_from_the_origin():
    for name, m in FAMILY.items():
        if not name.startswith("d"):
            continue
        dim, _, spread, _ = _generated(name)
        means = torch.tensor(m.means, dtype=torch.float64).reshape(4, 2, dim)
        centres, gaps = means.mean(1).norm(dim=1), (means[:, 0] - means[:, 1]).norm(dim=1)
        radius = 0.6 if spread == "near" else math.sqrt(dim)
        assert torch.allclose(centres, torch.full((4,), radius, dtype=torch.float64), rtol=1e-12)
        assert ((gaps >= 0.1) & (gaps <= 0.3)).all()


def test_smooth_and_stiff_of_one_dim_spread_and_seed_share_means_and_weights():
    a, b = FAMILY["d8-smooth-far-1"], FAMILY["d8-stiff-far-1"]
    assert (a.means, a.weights) == (b.means, b.weights) and a.stds != b.stds


def test_random_mixture_depends_on_its_seed_only_through_the_generator():
    stds = ((0.02, 0.05), (0.2, 0.5))
    assert random_mixture(4, 6, stds, 7) == random_mixture(4, 6, stds, 7)
    assert random_mixture(4, 6, stds, 7).means != random_mixture(4, 6, stds, 8).means
    with pytest.raises(ValueError, match="components is 5; give an even number"):
        random_mixture(4, 5, stds, 7)


def _row(problem, sampler, grid, error, budget=10):
    return {"problem": problem, "sampler": sampler, "grid": grid, "budget": budget, "steps": budget, "nfe": budget,
            "error": error}


# A wins two of three problems outright but is 4.5x off on Q; B is never best and never worse than 1.5x.
# prk (several calls per step, no candidate) sets the best on Q.
TABLE = [_row("P", "ipndm", "quad", 1.0), _row("Q", "ipndm", "quad", 9.0), _row("R", "ipndm", "quad", 2.0),
         _row("P", "unipc", "karras", 1.3), _row("Q", "unipc", "karras", 3.0), _row("R", "unipc", "karras", 2.5),
         _row("Q", "prk", "karras", 2.0)]


def test_the_worst_case_ratio_picks_the_robust_candidate_not_the_single_problem_best():
    picked = choose(TABLE, 10)
    assert (picked["sampler"], picked["grid"], picked["worst_problem"]) == ("unipc", "karras", "Q")
    assert picked["worst_ratio"] == pytest.approx(1.5)
    assert [(c["sampler"], c["worst_ratio"]) for c in worst_ratios(TABLE, 10)] == [("unipc", 1.5), ("ipndm", 4.5)]


def test_a_candidate_missing_on_a_problem_counts_as_infinitely_worse_there():
    rows = TABLE + [_row("P", "deis", "quad", 0.5), _row("R", "deis", "quad", 0.5)]  # never ran on Q
    ranked = worst_ratios(rows, 10)
    assert (ranked[-1]["sampler"], ranked[-1]["worst_ratio"], ranked[-1]["worst_problem"]) == ("deis", math.inf, "Q")


def test_the_comparison_sets_the_choice_against_the_best_textdiff_and_diffusers_rows():
    peer = [{"problem": "Q", "peer": "UniPC 3", "budget": 10, "steps": 10, "nfe": 10, "error": 2.4}]
    q = next(r for r in comparison(TABLE, peer, 10, "unipc", "karras") if r["problem"] == "Q")
    assert (q["ratio"], q["ratio_to_peer"], q["best"], q["peer"]) == (1.5, 1.25, "prk karras10 (10)", "UniPC 3 (10)")


def test_several_call_samplers_run_the_most_steps_whose_model_calls_fit_the_budget():
    assert model_calls("ipndm", "quad10", ABAR) == 10
    # karras starts with a top step (one call): prk 1 + 4 + 4 + 1 for 4 steps; plms the same 3 warm-up steps + 1
    assert [steps_within(name, "karras", 10, ABAR) for name in ("prk", "plms")] == [4, 4]
    assert model_calls("plms", "trailing11", ABAR) == 20 and steps_within("plms", "trailing", 20, ABAR) == 11
    # every step of logsnr4 shrinks sigma more than 100x, so each is a one-call DDIM top step
    assert model_calls("prk", "logsnr4", ABAR) == 4 and steps_within("prk", "logsnr", 4, ABAR) == 4
    assert steps_within("plms", "quad", 1, ABAR) is None  # fewer than 2 steps


@pytest.fixture(scope="module")
def subset_rows():
    """Every deterministic sampler on every candidate grid at 10 and 20 NFE on four problems of the family:
    d8-stiff-near-0, d8-smooth-far-0, d16-stiff-far-1 and smooth, 48 starts each, 300-step references."""
    plan = family_plan(ABAR, (10, 20))
    rows = []
    for name in ("d8-stiff-near-0", "d8-smooth-far-0", "d16-stiff-far-1", "smooth"):
        rows += textdiff_rows(make_case(name, ABAR, 48, 0, 300), ABAR, plan)
    return rows


@pytest.mark.parametrize("steps,bound", [(10, 8.0), (20, 20.0)])
def test_the_default_at_10_and_20_nfe_stays_within_the_family_bound_of_the_best_on_a_subset(subset_rows, steps,
                                                                                             bound):
    """The goal of 1.5x is not reached on the family (docs/samplers.md): the bound here is the family's
    worst ratio of the default (6.2x at 10 NFE, 16.7x at 20) with room for 48 starts instead of 300."""
    sampler = default_sampler(str(steps))
    grid = default_grid(sampler, str(steps)).removesuffix(str(steps))
    ratios = {c["worst_problem"]: c["worst_ratio"] for c in worst_ratios(subset_rows, steps)
              if (c["sampler"], c["grid"]) == (sampler, grid)}
    assert len(ratios) == 1 and max(ratios.values()) < bound


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_samplers",
                                                  Path(__file__).resolve().parents[2] / "tools" / "bench_samplers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_family_mode_prints_every_row_from_the_top_and_the_choice(capsys):
    pytest.importorskip("diffusers")
    assert _bench_module().main(["--family", "--json", "--n", "8", "--ref-steps", "100", "--cases",
                                 "d2-stiff-near-0", "--budgets", "5", "--grids", "quad,karras"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    mine, peer = [r for r in rows if "sampler" in r], [r for r in rows if "peer" in r]
    assert len(mine) == 6 * 2 + 2 * 2 and len(peer) == 21  # 6 one-call samplers + prk, plms; 21 diffusers settings
    assert {r["nfe"] for r in mine if r["sampler"] not in ("prk", "plms")} == {5}
    assert all(r["nfe"] <= 5 for r in mine)
    assert sorted({r["nfe"] for r in peer}) == [5, 6, 14]  # PNDM: one call more, or PRK steps
    assert _bench_module().main(["--family", "--n", "8", "--ref-steps", "100", "--cases", "d2-stiff-near-0",
                                 "--budgets", "5", "--grids", "quad,karras"]) == 0
    out = capsys.readouterr().out
    assert "5 NFE: choice " in out and "| d2-stiff-near-0 |" in out


def test_bench_family_refuses_a_grid_that_starts_below_the_top(capsys):
    with pytest.raises(SystemExit) as e:
        _bench_module().main(["--family", "--grids", "quad,leading"])
    assert e.value.code == 2 and "--grids: leading starts at t = 900" in capsys.readouterr().err


def test_the_default_table_is_the_family_choice_per_budget():
    assert DEFAULT_SAMPLING == ((5, "unipc", "pow1.75_"), (10, "unipc", "pow1.25_"), (20, "ipndm", "pow1.25_"),
                                (50, "ipndm", "pow1.5_"))
