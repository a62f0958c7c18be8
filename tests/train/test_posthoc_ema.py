"""Post-hoc EMA (EDM2): power-function profiles, their widths, and an EMA rebuilt from snapshots that matches
the same EMA tracked directly, to the bound the least squares leave."""

import math

import numpy as np
import pytest
import torch

from textdiff.config import EMAConfig
from textdiff.formats.ema_snapshots import list_snapshots, write_snapshot
from textdiff.train.ema import EMA, power_key
from textdiff.train.posthoc_ema import (gamma_to_sigma_rel, power_decay, profile_inner, reconstruct,
                                        sigma_rel_to_gamma, solve_coefficients)


def test_the_widths_edm2_tracks_have_its_exponents():
    """EDM2 (its table 1 and code): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94; the maps invert."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    with pytest.raises(ValueError, match=r"sigma_rel 0.3 must lie in \(0, 0.2887\)"):
        sigma_rel_to_gamma(0.3)


def test_a_power_ema_starts_at_the_first_weights_and_weighs_step_tau_as_tau_to_the_gamma():
    gamma, t = 6.94, 400
    assert power_decay(gamma, 0) == 0.0
    weights = np.zeros(t)  # the discrete profile: the average of one-hot "weights" e_tau
    for update in range(t):
        weights *= power_decay(gamma, update)
        weights[update] += 1 - power_decay(gamma, update)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    tau = np.arange(1, t + 1)
    continuous = (gamma + 1) * tau ** gamma / t ** (gamma + 1)
    assert np.abs(weights - continuous).sum() < 0.02  # the continuous profile the inner products assume


def test_profile_inner_products_are_the_integrals_of_the_profiles():
    grid = np.linspace(0, 1000, 2_000_001)[1:]

    def profile(t, g):
        return np.where(grid <= t, (g + 1) * (grid / t) ** g / t, 0.0)

    for (ta, ga), (tb, gb) in [((1000, 6.9), (1000, 16.9)), ((400, 6.9), (1000, 6.9)), ((700, 16.9), (300, 2.0))]:
        numeric = np.trapezoid(profile(ta, ga) * profile(tb, gb), grid)
        assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(numeric, rel=1e-4)


def test_the_coefficients_reproduce_a_snapshot_exactly_and_a_between_width_closely():
    g05, g10 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    times = [t for t in range(100, 1001, 100) for _ in (0, 1)]
    gammas = [g for _ in range(10) for g in (g05, g10)]
    x, fit = solve_coefficients(times, gammas, 1000, g05)
    assert fit < 1e-6 and x[-2] == pytest.approx(1.0, abs=1e-6)  # the last 0.05 snapshot itself
    x, fit = solve_coefficients(times, gammas, 1000, sigma_rel_to_gamma(0.075))
    assert fit < 0.01 and x.sum() == pytest.approx(1.0, abs=0.01)


def _toy_run(tmp_path, steps=240, every=20):
    """A toy model whose weights follow a known trajectory, averaged by the training EMA class: parameter
    ``w`` a smooth curve with noise, ``basis`` the one-hot vector of the step (so its averages are the
    discrete profiles themselves). Tracks power EMAs 0.05, 0.075 and 0.10; snapshots hold 0.05 and 0.10."""
    rng = np.random.default_rng(0)
    trajectory = [torch.tensor([math.sin(s / 40) + 0.1 * rng.standard_normal(), math.cos(s / 25)], dtype=torch.float32)
                  for s in range(steps + 1)]
    basis = torch.eye(steps + 1)
    cfg = EMAConfig(power_sigma_rels=(0.05, 0.075, 0.10))
    ema = EMA(["w", "basis"], [trajectory[0], basis[0]], cfg)
    snapped = {power_key(0.05): 0.05, power_key(0.10): 0.10}
    for step in range(1, steps + 1):
        ema.update([trajectory[step], basis[step]])
        if step % every == 0:
            write_snapshot(tmp_path, step, ema.num_updates, {k: ema.named_averages(k) for k in snapped}, snapped)
    return ema, trajectory


def test_an_ema_rebuilt_from_snapshots_matches_the_one_tracked_within_the_least_squares_bound(tmp_path):
    """|rebuilt w - tracked w| <= ||q_rebuilt - q_tracked||_1 max |w|: the rebuilt average is the same
    combination of the steps' weights as its discrete profile q_rebuilt (read off the one-hot parameter), so
    the distance of the profiles bounds the distance of the averages, plus float32 rounding."""
    ema, trajectory = _toy_run(tmp_path)
    assert [s.step for s in list_snapshots(tmp_path)] == list(range(20, 241, 20))
    rec = reconstruct(tmp_path, 0.075)
    tracked = ema.named_averages(power_key(0.075))
    assert rec.step == 240 and rec.updates == 240 and rec.fit < 0.02
    profile_gap = float((rec.weights["basis"].double() - tracked["basis"].double()).abs().sum())
    assert profile_gap < 0.05  # the least squares leave under 5% of the weight misplaced
    bound = profile_gap * float(torch.stack(trajectory).abs().max()) + 1e-5
    assert float((rec.weights["w"] - tracked["w"]).abs().max()) <= bound
    # a width that was snapshotted comes back to float32 rounding
    again = reconstruct(tmp_path, 0.10)
    torch.testing.assert_close(again.weights["w"], ema.named_averages(power_key(0.10))["w"], rtol=1e-5, atol=1e-6)


def test_reconstruction_at_an_earlier_snapshot_uses_only_snapshots_up_to_it_and_names_bad_steps(tmp_path):
    _toy_run(tmp_path)
    rec = reconstruct(tmp_path, 0.075, step=120)
    assert rec.step == 120 and max(step for step, _, _ in rec.terms) == 120
    with pytest.raises(ValueError, match=r"--step 130 is not a snapshot step; this run has snapshots at \[20, 40"):
        reconstruct(tmp_path, 0.075, step=130)
    with pytest.raises(ValueError, match="holds no EMA snapshots; train with ema.power_sigma_rels"):
        reconstruct(tmp_path / "empty", 0.075)


@pytest.mark.slow
def test_the_tool_writes_an_export_that_samples_load_and_prints_the_fit(tiny, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from textdiff.sampling.loading import load_for_sampling
    from textdiff.train.loop import Trainer

    run = tmp_path / "run"
    # snapshots every 2 steps and at the run's end
    trainer = Trainer(tiny("train.max_steps=5", "ema.power_sigma_rels=[0.05, 0.1]", "ema.snapshot_every=2"), run)
    trainer.run()
    trainer.close()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "tools" / "reconstruct_ema.py"), str(run), "--sigma-rel",
                           "0.075", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])  # DeepSpeed logs its accelerator to stdout first
    assert summary["step"] == 5 and summary["snapshots"] == 3 and 0 <= summary["fit"] < 0.2
    loaded = load_for_sampling(summary["out"])
    rec = reconstruct(run, 0.075)
    for name, value in loaded.model.state_dict().items():
        if name in rec.weights:
            assert torch.equal(value, rec.weights[name].reshape(value.shape)), name
    bad = subprocess.run([sys.executable, str(repo / "tools" / "reconstruct_ema.py"), str(run), "--sigma-rel",
                          "0.075", "--step", "3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--step 3 is not a snapshot step; this run has snapshots at [2, 4, 5]" in bad.stderr
