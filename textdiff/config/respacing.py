"""Which steps a respacing spec (``diffusion.timestep_respacing``, the samplers' step grids) keeps: a pure
function of the spec, so the config checks it and the diffusion package respaces with it.

Specs, as in improved-diffusion: ``"250"`` (250 steps spread evenly over the whole range, first and last
included), ``"10,10,10"`` (the range cut into equal sections, that many steps spread evenly in each) and
``"ddim50"`` (every ``T / 50``-th step starting at 0, the stride DDIM used).
"""

from __future__ import annotations


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """The sorted original steps that respacing ``spec`` keeps out of ``num_timesteps``.

    Raises ValueError naming ``diffusion.timestep_respacing`` when the spec cannot be met.
    """
    key = "diffusion.timestep_respacing"
    spec = spec.strip()
    if not spec:
        return list(range(num_timesteps))
    if spec.startswith("ddim"):
        count = spec[len("ddim"):]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{key} is {spec!r}; write ddimN with N a positive integer, e.g. ddim50")
        count = int(count)
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"{key} is {spec!r}: no integer stride gives exactly {count} of {num_timesteps} steps; "
                         f"pick a count that divides {num_timesteps}, or a plain count like {count!r}")
    parts = spec.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{key} is {spec!r}; give a step count (\"250\"), counts per section (\"10,10,10\") "
                         "or ddimN")
    counts = [int(p) for p in parts]
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"{key} is {spec!r}: section {i} has {size} steps, fewer than the {count} asked for")
        kept += _spread(start, size, count)
        start += size
    return sorted(set(kept))


def _spread(start: int, size: int, count: int) -> list[int]:
    """``count`` steps spread over ``[start, start + size)``, first included, as improved-diffusion does.

    The fractional stride is accumulated (``cur += stride``) rather than multiplied (``i * stride``): the two
    round differently where ``i * stride`` lands on a half (``space_timesteps(1000, "21")[10]`` is 499, not
    500), and a respaced checkpoint must sample at the steps the research code trained and sampled at.
    """
    stride = (size - 1) / (count - 1) if count > 1 else 1
    steps, cur = [], 0.0
    for _ in range(count):
        steps.append(start + round(cur))
        cur += stride
    return steps
