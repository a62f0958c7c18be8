"""Per-group learning rates of the research code's ``text_lr``, ``gain_lr`` and ``capt_lr`` as optimizer param groups.

The research code's training loop sorts the U-net's parameters by name: the transcription encoder, the
cross-attention (text -> image) and weave (image -> text) layers train at ``text_lr``; the learned gains of
those layers at ``gain_lr``; an unfrozen caption encoder at ``capt_lr``; everything else at ``lr``. Here the
same groups are picked by textdiff's module names (``text_encoder.``, ``.cross.``, ``.weave.``,
``capt_encoder.``) and given to DeepSpeed as param groups. DeepSpeed's warm-up schedulers set every group to
one ``warmup_max_lr``; :func:`scheduled_group_lrs` rewrites them as per-group lists, each group's scaled by
its lr over ``lr``, so a group warms up to its own rate, as the research code multiplies each group's lr by
the one warm-up factor.
"""

from __future__ import annotations

import copy
from typing import Sequence

from torch import nn

from textdiff.config import ConfigError, TrainConfig

LR_GROUPS = ("other", "text", "gain", "capt")
# schedulers whose per-group rates come from these keys; a number there would set every group alike
SCALED_SCHEDULER_KEYS = {"WarmupLR": ("warmup_min_lr", "warmup_max_lr"),
                         "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr")}
# schedulers that scale each group's own starting lr, so param groups need nothing more
RELATIVE_SCHEDULERS = ("WarmupCosineLR",)


def lr_group(name: str) -> str:
    """The learning-rate group of a parameter named ``name`` in textdiff's U-net: one of :data:`LR_GROUPS`."""
    parts = name.split(".")
    if parts[0] == "capt_encoder":
        return "capt"
    if parts[0] == "text_encoder":
        return "text"
    if "cross" in parts or "weave" in parts:
        # the research code puts every learned gain of the text layers (the branch gain, the weave MLP's) apart
        branch = parts.index("cross") if "cross" in parts else parts.index("weave")
        return "gain" if any("gain" in p for p in parts[branch + 1:]) else "text"
    return "other"


def group_lrs(train: TrainConfig, lr: float) -> dict[str, float]:
    """The lr of each group: ``train.text_lr`` / ``gain_lr`` / ``capt_lr``, or ``lr`` where one is -1."""
    given = {"text": train.text_lr, "gain": train.gain_lr, "capt": train.capt_lr}
    return {"other": lr, **{g: lr if v == -1 else v for g, v in given.items()}}


def param_groups(named: Sequence[tuple[str, nn.Parameter]], lrs: dict[str, float]) -> list[dict]:
    """Optimizer param groups ``[{"params": [...], "lr": ...}]`` of ``named`` (name, parameter) by :func:`lr_group`,
    in the order of :data:`LR_GROUPS`, empty groups left out."""
    buckets: dict[str, list[nn.Parameter]] = {g: [] for g in LR_GROUPS}
    for name, p in named:
        buckets[lr_group(name)].append(p)
    return [{"params": buckets[g], "lr": lrs[g]} for g in LR_GROUPS if buckets[g]]


def base_lr(ds_config: dict) -> float:
    """``optimizer.params.lr`` of a DeepSpeed config; raises ConfigError naming the train keys that need it."""
    try:
        lr = float(ds_config["optimizer"]["params"]["lr"])
    except (KeyError, TypeError, ValueError):
        lr = 0.0
    if lr <= 0:
        raise ConfigError("train.text_lr / gain_lr / capt_lr are set, which needs a positive optimizer.params.lr "
                          "in the recipe (the lr of every other parameter); give it, or set them to -1")
    return lr


def scheduled_group_lrs(ds_config: dict, ratios: Sequence[float]) -> dict:
    """A copy of ``ds_config`` whose scheduler warms each param group up to its own lr: the scalar
    ``warmup_min_lr``/``warmup_max_lr`` times each group's ``ratios`` (its lr over ``optimizer.params.lr``).
    Raises ConfigError for a scheduler that would set every group to one rate."""
    out = copy.deepcopy(ds_config)
    scheduler = out.get("scheduler")
    if scheduler is None or scheduler.get("type") in RELATIVE_SCHEDULERS:
        return out
    kind = scheduler.get("type")
    if kind not in SCALED_SCHEDULER_KEYS:
        raise ConfigError(f"train.text_lr / gain_lr / capt_lr give param groups their own lr, but scheduler.type "
                          f"{kind!r} sets one rate for all; use one of "
                          f"{', '.join((*SCALED_SCHEDULER_KEYS, *RELATIVE_SCHEDULERS))}, or set them to -1")
    params = scheduler.setdefault("params", {})
    for key in SCALED_SCHEDULER_KEYS[kind]:
        value = params.get(key, 0.0 if key == "warmup_min_lr" else None)
        if value is None:
            continue  # DeepSpeed then warms each group up to its own lr
        params[key] = [float(value) * r for r in ratios]
    return out


def optimizer_inputs(named: Sequence[tuple[str, nn.Parameter]], train: TrainConfig, ds_config: dict
                     ) -> tuple[list, dict]:
    """What ``deepspeed.initialize`` gets: (model_parameters, config). The plain parameter list and the config
    unchanged while every group lr is -1 (one group, as before); param groups and per-group scheduler
    rates otherwise."""
    if (train.text_lr, train.gain_lr, train.capt_lr) == (-1, -1, -1):
        return [p for _, p in named], ds_config
    lr = base_lr(ds_config)
    groups = param_groups(named, group_lrs(train, lr))
    return groups, scheduled_group_lrs(ds_config, [g["lr"] / lr for g in groups])
