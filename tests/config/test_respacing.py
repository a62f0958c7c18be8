"""Specification of textdiff.config.respacing: which steps a respacing spec keeps."""

import pytest

from textdiff.config.respacing import space_timesteps


def test_count_spec_keeps_both_ends():
    assert space_timesteps(1000, "5") == [0, 250, 500, 749, 999]


def test_ddim_spec_keeps_every_stride_from_zero():
    assert space_timesteps(1000, "ddim50")[:3] == [0, 20, 40]
    assert len(space_timesteps(1000, "ddim50")) == 50


def test_section_spec_spreads_each_section():
    assert space_timesteps(30, "2,3,1") == [0, 9, 10, 14, 19, 20]


def test_bad_specs_name_the_config_key():
    for spec in ("abc", "ddim7x", "20,20"):
        with pytest.raises(ValueError, match="diffusion.timestep_respacing"):
            space_timesteps(30, spec)


def _research_rule(num_timesteps, counts):
    """improved-diffusion's respace.space_timesteps, restated: the fractional stride accumulates."""
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        stride = (size - 1) / (count - 1) if count > 1 else 1
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def test_section_strides_accumulate_as_in_the_research_code():
    # i * stride would give 500 here: 10 * 49.95 rounds half to even, while the summed stride is 499.4999...
    assert space_timesteps(1000, "21")[10] == 499


@pytest.mark.parametrize("num_timesteps", [1000, 4000, 997])
def test_every_count_and_section_split_matches_the_accumulate_rule(num_timesteps):
    specs = [[n] for n in range(1, 301)] + [[n, m] for n in (1, 7, 25, 50) for m in (3, 10, 33, 100)]
    specs += [[10, 10, 10], [5, 17, 40, 2]]
    for counts in specs:
        assert space_timesteps(num_timesteps, ",".join(map(str, counts))) == _research_rule(num_timesteps, counts), counts
