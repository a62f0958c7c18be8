"""EMA: an exact arithmetic mean for the first 1/(1-rate) updates, then the exponential average."""

import pytest
import torch

from textdiff.config import EMAConfig
from textdiff.train.ema import EMA, ema_decay


def _snapshots(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 2, generator=g) for _ in range(k)]


def test_decay_is_one_half_then_two_thirds_then_capped_at_the_rate():
    # the research code's update_arithmetic_average with n = step - from + 2: the divisor is 2 at the first step
    assert [ema_decay(0.9, n, 0, 0) for n in (0, 1, 3)] == [0.5, pytest.approx(2 / 3), 0.8]
    assert ema_decay(0.9, 8, 0, 0) == pytest.approx(0.9)
    assert ema_decay(0.9, 500, 0, 0) == 0.9


def test_decay_before_from_step_is_the_rate_and_shift_delays_the_start():
    assert ema_decay(0.99, 4, 5, 0) == 0.99
    assert ema_decay(0.99, 5, 5, 0) == 0.5
    assert ema_decay(0.99, 5, 5, 3) == pytest.approx(0.8)


def test_from_step_minus_one_the_research_codes_default_is_the_plain_ema_from_the_first_update():
    assert EMAConfig().arithmetic_avg_from_step == -1
    assert [ema_decay(0.9, n, -1, 0) for n in (0, 1, 500)] == [0.9, 0.9, 0.9]
    ema = EMA(["w"], [torch.zeros(1)], EMAConfig(rates=(0.9,)))
    ema.update([torch.ones(1)])
    assert ema.averages["0.9"][0].item() == pytest.approx(0.1, abs=1e-7)  # 0.9 * 0 + 0.1 * 1, fp32


def test_first_updates_average_the_initial_weights_with_each_step_alike():
    ema = EMA(["w"], [torch.zeros(2)], EMAConfig(rates=(0.9,), arithmetic_avg_from_step=0))
    seen = []
    for v in (1.0, 2.0, 6.0):
        ema.update([torch.full((2,), v)])
        seen.append(ema.named_averages(0.9)["w"][0].item())
    assert seen == [0.5, 1.0, 2.25]  # (0 + 1) / 2, (0 + 1 + 2) / 3, (0 + 1 + 2 + 6) / 4


def test_first_nine_updates_of_rate_0_9_give_the_exact_mean_with_the_initial_weights():
    snaps = _snapshots(9)
    init = torch.full((3, 2), 100.0)
    ema = EMA(["w"], [init], EMAConfig(rates=(0.9,), arithmetic_avg_from_step=0))
    for s in snaps:
        ema.update([s])
    torch.testing.assert_close(ema.named_averages(0.9)["w"], torch.stack([init] + snaps).mean(0), atol=1e-5, rtol=0)


def test_after_the_handover_the_average_is_exponential():
    snaps = _snapshots(14)
    ema = EMA(["w"], [torch.zeros(3, 2)], EMAConfig(rates=(0.9,), arithmetic_avg_from_step=0))
    for s in snaps:
        ema.update([s])
    expected = torch.stack([torch.zeros(3, 2)] + snaps[:9]).mean(0)
    for s in snaps[9:]:
        expected = 0.9 * expected + 0.1 * s
    torch.testing.assert_close(ema.named_averages(0.9)["w"], expected, atol=1e-6, rtol=0)


def test_two_rates_are_kept_apart_and_in_fp32():
    ema = EMA(["w"], [torch.zeros(2, dtype=torch.bfloat16)], EMAConfig(rates=(0.5, 0.9), arithmetic_avg_from_step=0))
    for v in (1.0, 2.0, 3.0):
        ema.update([torch.full((2,), v, dtype=torch.bfloat16)])
    assert ema.named_averages(0.9)["w"].dtype == torch.float32
    assert ema.named_averages(0.9)["w"].tolist() == [1.5, 1.5]  # mean of 0, 1, 2, 3
    assert ema.named_averages(0.5)["w"].tolist() == [2.125, 2.125]  # 0.5, then 1.25, then 0.5*1.25+0.5*3


def test_state_round_trip_continues_the_count_without_a_manual_shift():
    snaps = _snapshots(6)
    straight = EMA(["w"], [torch.zeros(3, 2)], EMAConfig(rates=(0.9,), arithmetic_avg_from_step=0))
    for s in snaps:
        straight.update([s])
    first = EMA(["w"], [torch.zeros(3, 2)], EMAConfig(rates=(0.9,), arithmetic_avg_from_step=0))
    for s in snaps[:3]:
        first.update([s])
    resumed = EMA(["w"], [torch.zeros(3, 2)], EMAConfig(rates=(0.9,), arithmetic_avg_from_step=0))
    resumed.load_state_dict(first.state_dict())
    for s in snaps[3:]:
        resumed.update([s])
    assert resumed.num_updates == 6
    assert torch.equal(resumed.named_averages(0.9)["w"], straight.named_averages(0.9)["w"])


def test_loading_other_rates_names_the_config_key():
    saved = EMA(["w"], [torch.zeros(1)], EMAConfig(rates=(0.9,), arithmetic_avg_from_step=0)).state_dict()
    with pytest.raises(ValueError, match="ema.rates"):
        EMA(["w"], [torch.zeros(1)], EMAConfig(rates=(0.99,), arithmetic_avg_from_step=0)).load_state_dict(saved)


def test_ramp_warmup_decay_is_one_tenth_then_rises_to_the_rate():
    assert [ema_decay(0.999, n, 0, 0, "ramp") for n in (0, 10, 90)] == [pytest.approx(0.1), pytest.approx(0.55),
                                                                        pytest.approx(0.91)]
    assert ema_decay(0.999, 10 ** 6, 0, 0, "ramp") == 0.999


def test_ramp_warmup_follows_the_recent_weights_where_the_arithmetic_mean_keeps_the_early_ones():
    """300 updates at rate 0.999 of weights moving linearly from 1/300 to 1 (w_n = n / 300): the arithmetic
    mean with the initial 0 is (300 * 301 / 2 / 300) / 301 = 0.5, half of it early weights; the ramp averages about the last 10% of the
    run: sum_n (1 - d_n) w_n prod_{m > n} d_m = 0.9000."""
    arith = EMA(["w"], [torch.zeros(1)], EMAConfig(rates=(0.999,), arithmetic_avg_from_step=0))
    ramp = EMA(["w"], [torch.zeros(1)], EMAConfig(rates=(0.999,), warmup="ramp"))
    for n in range(1, 301):
        arith.update([torch.full((1,), n / 300)])
        ramp.update([torch.full((1,), n / 300)])
    assert float(arith.named_averages(0.999)["w"]) == pytest.approx(0.5, abs=1e-6)
    assert float(ramp.named_averages(0.999)["w"]) == pytest.approx(0.9, abs=1e-5)
