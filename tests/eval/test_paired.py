"""The paired bootstrap behind prove_spelling.py --compare: both runs' corpus CERs, their difference, and an
interval that resamples held-out strings (all samples of a string together)."""

import numpy as np
import pytest

from textdiff.eval.paired import corpus_cer, paired_cer_difference


def test_corpus_cer_is_total_errors_over_total_length():
    # 1 error in "12" and 3 in "345": 4 / 5, not the mean of per-image CERs (0.5 + 1.0) / 2
    assert corpus_cer(np.array([1, 3]), np.array([2, 3])) == pytest.approx(0.8)


def test_identical_runs_differ_by_exactly_zero_in_every_round():
    errors, lengths, groups = [0, 1, 2, 3], [2, 2, 3, 3], ["12", "12", "345", "345"]
    r = paired_cer_difference(errors, errors, lengths, groups, rounds=500)
    assert r["difference"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["b_better"] == 0.0
    assert (r["strings"], r["samples"], r["rounds"]) == (2, 4, 500)


def test_a_run_better_on_every_string_by_the_same_rate_gives_a_point_interval():
    # B makes one error fewer per character on every string: every resampled set differs by exactly -0.5
    lengths = [2, 2, 4, 4, 6, 6]
    a = [n * 0.75 for n in lengths]
    b = [n * 0.25 for n in lengths]
    r = paired_cer_difference(a, b, lengths, ["x", "x", "y", "y", "z", "z"], rounds=300)
    assert r["cer_a"] == pytest.approx(0.75) and r["cer_b"] == pytest.approx(0.25)
    assert r["difference"] == pytest.approx(-0.5)
    assert r["ci95"] == pytest.approx([-0.5, -0.5]) and r["b_better"] == 1.0


def test_the_interval_covers_the_spread_of_strings_and_is_seeded():
    # B better on half the strings, worse on the other half: the interval straddles zero
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 4, size=80)
    groups = [f"s{i // 2}" for i in range(80)]
    a = np.minimum(lengths, rng.integers(0, 3, size=80))
    b = np.where(np.arange(80) % 4 < 2, 0, lengths)
    r = paired_cer_difference(a, b, lengths, groups, rounds=2000, seed=1)
    low, high = r["ci95"]
    assert low < r["difference"] < high and low < 0 < high
    assert 0.0 < r["b_better"] < 1.0
    assert r == paired_cer_difference(a, b, lengths, groups, rounds=2000, seed=1)


def test_samples_of_one_string_are_resampled_together():
    # two strings: B is perfect on "a" (both samples), A on "b". A round draws "a" twice, "b" twice, or each
    # once, so the difference takes exactly three values: -1, +1 and 0 (lengths equal)
    r = paired_cer_difference([1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], ["a", "a", "b", "b"], rounds=4000)
    assert r["difference"] == 0.0
    assert r["ci95"] == [-1.0, 1.0]
    assert 0.2 < r["b_better"] < 0.3   # "a" drawn twice: probability 1/4


def test_inputs_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        paired_cer_difference([1, 2], [1], [2, 2], ["a", "b"])
