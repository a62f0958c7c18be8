"""Two runs scored on the same held-out strings and seeds: the difference of their CERs, and how sure it is.

A paired bootstrap over the held-out strings (Koehn 2004, "Statistical significance tests for machine
translation evaluation"): each round draws the strings with replacement, keeps every sample of a drawn string
in both runs (the samples of one string share its difficulty, so they are resampled together), and computes
both runs' corpus CER (total edit distance over total target length, as :func:`textdiff.eval.metrics.aggregate`)
on the drawn set. The spread of the rounds' differences is what the choice of held-out strings leaves uncertain;
it does not cover a second training seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def corpus_cer(errors: np.ndarray, lengths: np.ndarray) -> float:
    """Total edit distance over total target length: errors, lengths [N] -> scalar."""
    return float(np.sum(errors) / np.sum(lengths))


def paired_cer_difference(errors_a: Sequence[float], errors_b: Sequence[float], lengths: Sequence[float],
                          groups: Sequence[str], rounds: int = 10000, seed: int = 0) -> dict:
    """CER of run A and of run B on the same samples, B minus A, and its bootstrap 95% interval.

    errors_a, errors_b: [N] edit distances of each sample's reading in each run; lengths: [N] target lengths;
    groups: [N] the held-out string of each sample (resampled together). Returns ``cer_a``, ``cer_b``,
    ``difference`` (B - A: negative when B spells better), ``ci95`` [low, high] (the 2.5th and 97.5th
    percentiles of the rounds' differences), ``b_better`` (the share of rounds in which B's CER is below A's),
    ``strings`` and ``samples``.
    """
    a, b, n = (np.asarray(x, dtype=np.float64) for x in (errors_a, errors_b, lengths))
    if not (a.shape == b.shape == n.shape == (len(groups),)) or len(groups) == 0:
        raise ValueError(f"errors_a, errors_b, lengths and groups must be 1-D of one length, got {a.shape}, "
                         f"{b.shape}, {n.shape} and {len(groups)}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    g = len(names)
    per_a, per_b, per_n = (np.bincount(index, weights=x, minlength=g) for x in (a, b, n))
    draws = np.random.default_rng(seed).integers(0, g, size=(rounds, g))     # [rounds, G] drawn strings
    len_r = per_n[draws].sum(axis=1)
    diff_r = (per_b[draws].sum(axis=1) - per_a[draws].sum(axis=1)) / len_r   # [rounds]
    low, high = np.percentile(diff_r, [2.5, 97.5])
    cer_a, cer_b = corpus_cer(a, n), corpus_cer(b, n)
    return {"cer_a": cer_a, "cer_b": cer_b, "difference": cer_b - cer_a, "ci95": [float(low), float(high)],
            "b_better": float(np.mean(diff_r < 0)), "rounds": rounds, "strings": g, "samples": len(groups)}
