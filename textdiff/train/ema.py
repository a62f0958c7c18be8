"""EMA of the weights that starts as an arithmetic average and hands over to the exponential one.

The plain EMA of rate r needs about 1/(1-r) steps (10 000 for 0.9999) to forget its initial value. Starting
as an arithmetic mean removes that warm-up. As in the research code (``update_arithmetic_average`` with
``n = step - arithmetic_avg_from_step + 2``), update n (counted from ``ema.arithmetic_avg_from_step``) uses
decay ``min(rate, 1 - 1/(n + 2 + arithmetic_avg_extra_shift))``: the first update is the 50/50 average of
the initial weights and the first step's, and the first 1/(1-rate) - 1 updates give the exact mean of the
initial weights and every step's so far, after which the decay is the rate itself.

``ema.warmup = "ramp"`` instead uses decay ``min(rate, (1 + n) / (10 + n))`` (the warm-up of TensorFlow's
ExponentialMovingAverage with num_updates): after n updates it averages about the last n/10, where the
arithmetic mean weights every step since the start alike (after 300 steps at rate 0.999, half of it is the
first 150 steps' barely trained weights, which sample as noise). Use "arithmetic" (the
seed's) for long runs, where the mean's exactness over the first 1/(1-rate) steps matters, and "ramp" for
short runs that sample the EMA after a few thousand steps.

Beside ``ema.rates``, one run can track other averages of the same weights, so that they are compared on
equal terms: ``ema.tracked`` (``plain:R``, ``arithmetic:R``, ``ramp:R``) and EDM2's power-function EMAs
``ema.power_sigma_rels`` (textdiff/train/posthoc_ema.py), which ``ema.snapshot_every`` saves for rebuilding an
EMA of any width after training.

The update count lives in the EMA's state and so in every checkpoint: a resumed run continues the average
where it stopped (the seed needed ``arithmetic_avg_extra_shift`` raised by hand after each restart).
Averages are kept in fp32. The tensors an :class:`EMA` averages are whatever its owner hands it: in training,
each rank's own partition of the optimizer's fp32 master weights (``engine.fp32_master_weights``), so under
ZeRO the EMA is sharded like the optimizer state and its update communicates nothing.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from textdiff.config import EMAConfig
from textdiff.formats.checkpoint import rate_key
from textdiff.train.posthoc_ema import power_decay, sigma_rel_to_gamma


def ema_decay(rate: float, update: int, from_step: int, extra_shift: int, warmup: str = "arithmetic") -> float:
    """Decay for the 0-based ``update``: ``rate`` before ``from_step``, then ``min(rate, 1 - 1/(n + 2 + shift))``
    with n = update - from_step (n = 0 gives decay 1/2: the average restarts halfway between its value and
    the current weights); ``from_step = -1`` (the research code's default): ``rate`` always, a plain EMA.
    With ``warmup="ramp"``: ``min(rate, (1 + update) / (10 + update))``."""
    if warmup == "ramp":
        return min(rate, (1.0 + update) / (10.0 + update))
    if from_step < 0 or update < from_step:
        return rate
    n = update - from_step
    return min(rate, 1.0 - 1.0 / (n + 2 + extra_shift))


def power_key(sigma_rel: float) -> str:
    """The name of a power-function EMA of relative width ``sigma_rel`` (``0.05`` -> ``"power:0.05"``)."""
    return f"power:{float(sigma_rel)!r}"


def average_decays(cfg: EMAConfig) -> dict[str, Callable[[int], float]]:
    """{average name: decay at 0-based update n} of every average an ``ema`` section asks for: each of
    ``rates`` (named by :func:`rate_key`, started as ``warmup`` and ``arithmetic_avg_*`` say), each of
    ``tracked`` (named as written: ``plain:R``, ``arithmetic:R`` from step 0, ``ramp:R``) and each of
    ``power_sigma_rels`` (:func:`power_key`)."""
    decays: dict[str, Callable[[int], float]] = {}
    for rate in cfg.rates:
        decays[rate_key(rate)] = partial(ema_decay, rate, from_step=cfg.arithmetic_avg_from_step,
                                         extra_shift=cfg.arithmetic_avg_extra_shift, warmup=cfg.warmup)
    starts = {"plain": dict(from_step=-1, warmup="arithmetic"), "arithmetic": dict(from_step=0, warmup="arithmetic"),
              "ramp": dict(from_step=-1, warmup="ramp")}
    for spec in cfg.tracked:
        kind, _, rate = spec.partition(":")
        decays[spec] = partial(ema_decay, float(rate), extra_shift=0, **starts[kind])
    for sigma_rel in cfg.power_sigma_rels:
        decays[power_key(sigma_rel)] = partial(power_decay, sigma_rel_to_gamma(sigma_rel))
    return decays


class EMA:
    """fp32 averages of a fixed list of named parameters, one list of tensors per average
    (:func:`average_decays`: the ``ema`` section's rates, tracked starts and power-function profiles).

    names: the parameter names (``model.named_parameters()`` order); init: their initial values, any dtype.
    """

    def __init__(self, names: Sequence[str], init: Sequence[torch.Tensor], cfg: EMAConfig):
        if len(names) != len(init):
            raise ValueError(f"EMA got {len(names)} names but {len(init)} tensors; pass one name per parameter")
        self.names = list(names)
        self.cfg = cfg
        self.num_updates = 0
        self.decays = average_decays(cfg)
        self.averages = {key: [t.detach().float().clone() for t in init] for key in self.decays}

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor]) -> None:
        """Fold in the current weights (one tensor per name, the shapes of ``init``, any dtype); counts one
        update. One multi-tensor op (``_foreach_lerp_``) per average, whatever the number of tensors."""
        if len(params) != len(self.names):
            raise ValueError(f"EMA.update got {len(params)} tensors for {len(self.names)} parameters")
        first = next(iter(self.averages.values()))
        current = [p.detach().to(a.device, torch.float32) for p, a in zip(params, first)]
        for key, decay in self.decays.items():
            # avg + (1 - decay) (cur - avg): one pass over the averages, where mul_ then add_ took two
            torch._foreach_lerp_(self.averages[key], current, 1.0 - decay(self.num_updates))
        self.num_updates += 1

    def named_averages(self, rate: float | str) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 average} for one average: a rate (a float or its :func:`rate_key`) or the name
        of a tracked or power-function average."""
        key = rate if isinstance(rate, str) else rate_key(rate)
        if key not in self.averages:
            raise KeyError(f"no EMA {key}; this run keeps {', '.join(self.averages)} (ema.rates, ema.tracked, "
                           "ema.power_sigma_rels)")
        return dict(zip(self.names, self.averages[key]))

    def state_dict(self) -> dict:
        """Update count, names and averages (tensors on CPU)."""
        return {"num_updates": self.num_updates, "names": list(self.names),
                "averages": {k: [t.cpu() for t in v] for k, v in self.averages.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; names and rates must match this run's model and ``ema.rates``."""
        if list(state["names"]) != self.names:
            missing = sorted(set(self.names) - set(state["names"]))[:3]
            raise ValueError(f"the checkpoint's EMA holds other parameters than this model (e.g. missing "
                             f"{missing}); resume with the model config the run was started with")
        saved = set(state["averages"])
        if saved != set(self.averages):
            raise ValueError(f"the checkpoint's EMA keeps averages {sorted(saved)} but this run's ema section asks "
                             f"for {sorted(self.averages)}; set ema.rates, ema.tracked and ema.power_sigma_rels "
                             "to the saved ones to resume")
        device = {k: v[0].device if v else torch.device("cpu") for k, v in self.averages.items()}
        self.averages = {k: [t.float().to(device[k]) for t in v] for k, v in state["averages"].items()}
        self.num_updates = int(state["num_updates"])
