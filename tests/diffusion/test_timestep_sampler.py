"""Specification of textdiff.diffusion.timestep_sampler."""

import json

import pytest
import torch

from textdiff.diffusion.timestep_sampler import LossSecondMomentSampler, build_timestep_sampler


def test_uniform_sampler_has_unit_weights_and_covers_every_step():
    t, w = build_timestep_sampler("uniform", 4).sample(4000, torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(4000))
    counts = torch.bincount(t, minlength=4)
    assert counts.min().item() > 900 and counts.max().item() < 1100


def test_loss_aware_sampler_is_uniform_until_every_step_has_full_history():
    s = LossSecondMomentSampler(3, history=2)
    s.update(torch.tensor([0, 0, 1, 1]), torch.tensor([5.0, 5.0, 1.0, 1.0]))
    assert s.weights().tolist() == [1.0, 1.0, 1.0]


def test_loss_aware_probabilities_follow_root_mean_square_loss():
    s = LossSecondMomentSampler(2, history=2, uniform_prob=0.0)
    s.update(torch.tensor([0, 0, 1, 1]), torch.tensor([3.0, 4.0, 1.0, 1.0]))
    rms = [(12.5) ** 0.5, 1.0]
    assert s.weights().tolist() == pytest.approx([rms[0] / sum(rms), rms[1] / sum(rms)])
    t, w = s.sample(1000, torch.Generator().manual_seed(0))
    assert w[t == 1][0].item() == pytest.approx(1 / (2 * rms[1] / sum(rms)))


def test_loss_aware_state_round_trips_through_json():
    s = LossSecondMomentSampler(3, history=2)
    s.update(torch.tensor([0, 1, 2, 0, 1, 2, 0]), torch.arange(7.0))
    restored = LossSecondMomentSampler(3, history=2)
    restored.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert torch.equal(restored.weights(), s.weights())
    assert torch.equal(restored.sample(8, torch.Generator().manual_seed(1))[0],
                       s.sample(8, torch.Generator().manual_seed(1))[0])


def test_loading_state_of_another_step_count_says_what_differs():
    with pytest.raises(ValueError, match="diffusion.diffusion_steps"):
        LossSecondMomentSampler(4, history=2).load_state_dict(LossSecondMomentSampler(3, history=2).state_dict())
