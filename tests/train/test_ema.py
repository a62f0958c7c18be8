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


def test_tracked_averages_start_as_their_names_say_beside_the_rates():
    """One run keeps the rate's average (started as ema.warmup says) and each tracked start: plain (the rate
    from the first update), arithmetic (the exact mean until the rate takes over) and ramp."""
    from textdiff.train.ema import average_decays, power_key

    cfg = EMAConfig(rates=(0.9,), warmup="ramp", tracked=("plain:0.9", "arithmetic:0.9", "ramp:0.9"),
                    power_sigma_rels=(0.1,))
    decays = average_decays(cfg)
    assert list(decays) == ["0.9", "plain:0.9", "arithmetic:0.9", "ramp:0.9", power_key(0.1)]
    assert [decays["plain:0.9"](n) for n in (0, 5)] == [0.9, 0.9]
    assert [decays["arithmetic:0.9"](n) for n in (0, 1, 8, 20)] == pytest.approx([1 / 2, 2 / 3, 0.9, 0.9])
    assert [decays["ramp:0.9"](n) for n in (0, 10)] == pytest.approx([1 / 10, 11 / 20])
    assert decays["0.9"](10) == decays["ramp:0.9"](10)
    ema = EMA(["w"], [torch.zeros(1)], cfg)
    for value in (1.0, 2.0, 3.0):
        ema.update([torch.tensor([value])])
    assert float(ema.named_averages("arithmetic:0.9")["w"]) == pytest.approx(1.5)  # mean of 0, 1, 2, 3
    assert float(ema.named_averages(power_key(0.1))["w"]) > float(ema.named_averages("plain:0.9")["w"])


@pytest.mark.parametrize("keys, message", [
    ({"tracked": ["slow:0.9"]}, "ema.tracked holds 'slow:0.9'; write plain:R, arithmetic:R or ramp:R"),
    ({"tracked": ["ramp:1.5"]}, "ema.tracked holds 'ramp:1.5'"),
    ({"tracked": ["ramp:0.9", "ramp:0.9"]}, "ema.tracked names an average twice"),
    ({"power_sigma_rels": [0.3]}, r"ema.power_sigma_rels holds 0.3; a relative width must lie in \(0, 0.2886\)"),
    ({"snapshot_every": 100}, "ema.snapshot_every saves the power-function EMAs; set ema.power_sigma_rels too"),
])
def test_bad_tracked_averages_and_snapshot_settings_name_the_key(keys, message):
    from textdiff.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"textdiff": {"ema": keys}})
