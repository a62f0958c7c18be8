"""Which keys DeepSpeed's config reads, taken from DeepSpeed itself, so a typo is refused before a run starts;
and the few facts of a DeepSpeed config that textdiff reads itself (:func:`zero_stage`).

DeepSpeed ignores keys it does not read: ``zero_optimisation`` trains at ZeRO 0 and ``gradient_cliping``
clips nothing. The key lists come from the installed DeepSpeed, so they follow its version:

- top level and ``optimizer`` / ``scheduler``: the keys ``DeepSpeedConfig._initialize_params`` looks up,
  recorded by running it on a dict that notes every lookup;
- ``zero_optimization``, ``fp16``, ``bf16``: the fields (and aliases) of DeepSpeed's pydantic models,
  nested models included;
- ``scheduler.params``: the arguments of the scheduler class in ``deepspeed.runtime.lr_schedules``;
- ``optimizer.params`` of Adam/AdamW: the arguments of ``torch.optim`` and DeepSpeed's own Adam classes.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import numbers
import typing
from typing import Any, Optional

import torch

# top-level keys read outside DeepSpeedConfig._initialize_params: by DeepSpeedConfig.__init__
# (sequence_parallel_size), the launcher (autotuning, elasticity) and the engine's optional features
_READ_ELSEWHERE = ("sequence_parallel_size", "autotuning", "elasticity", "amp", "sparse_attention",
                   "compression_training", "curriculum_learning", "nebula", "quantize_training")
# DeepSpeed-only switches of its Adam/AdamW entry, popped before the optimizer class is built
_ADAM_SWITCHES = ("torch_adam", "adam_w_mode")


class _Recorder(dict):
    """A dict that notes every key looked up in it (``get``, ``[]``, ``in``, ``keys()``) under ``path``."""

    def __init__(self, seen: set, path: tuple, *args):
        super().__init__(*args)
        self._seen, self._path = seen, path

    def _note(self, key):
        self._seen.add((self._path, key))

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)

    def keys(self):
        recorder = self

        class _Keys(set):
            def __contains__(self, key):
                recorder._note(key)
                return super().__contains__(key)

        return _Keys(super().keys())


@functools.lru_cache(maxsize=1)
def read_keys() -> dict[tuple, frozenset]:
    """{section path: keys DeepSpeedConfig looks up there} for the top level, ``optimizer`` and ``scheduler``."""
    from deepspeed.runtime.config import DeepSpeedConfig  # deferred (all DeepSpeed imports here): seconds to import

    seen: set = set()
    probe = _Recorder(seen, (), {
        "optimizer": _Recorder(seen, ("optimizer",), {"type": "AdamW", "params": {}}),
        "scheduler": _Recorder(seen, ("scheduler",), {"type": "WarmupLR", "params": {}})})
    ds_logger = logging.getLogger("DeepSpeed")
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # its config parsing logs every default it takes
    try:
        DeepSpeedConfig._initialize_params(DeepSpeedConfig.__new__(DeepSpeedConfig), probe)
    finally:
        ds_logger.setLevel(level)
    out: dict[tuple, set] = {}
    for path, key in seen:
        out.setdefault(path, set()).add(key)
    out[()] |= set(_READ_ELSEWHERE)
    return {path: frozenset(keys) for path, keys in out.items()}


def _pydantic_keys(model) -> dict[str, Any]:
    """{field name or alias: nested DeepSpeed pydantic model or None} of a DeepSpeed config model."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel  # deferred

    out = {}
    for name, info in model.model_fields.items():
        nested = None
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, DeepSpeedConfigModel):
                nested = arg
        out[name] = nested
        if info.alias:
            out[info.alias] = nested
    return out


def _models() -> dict[str, Any]:
    # deferred
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {"zero_optimization": DeepSpeedZeroConfig, "fp16": DeepSpeedFP16Config, "bf16": DeepSpeedBF16Config,
            "bfloat16": DeepSpeedBF16Config}


def _arguments(cls) -> Optional[frozenset]:
    """Keyword arguments of ``cls.__init__`` but the optimizer it wraps; None when it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.name not in ("self", "optimizer", "params"))


def scheduler_arguments(name: str) -> Optional[frozenset]:
    """The ``scheduler.params`` keys DeepSpeed's scheduler ``name`` takes (None: unknown scheduler)."""
    from deepspeed.runtime import lr_schedules  # deferred

    cls = getattr(lr_schedules, name, None) if name in lr_schedules.VALID_LR_SCHEDULES else None
    return _arguments(cls) if cls is not None else None


def optimizer_arguments(name: str) -> Optional[frozenset]:
    """The ``optimizer.params`` keys of DeepSpeed's Adam/AdamW entry (torch's classes or DeepSpeed's fused and
    CPU Adam, whichever it picks); None for other optimizers (not checked)."""
    if str(name).lower() not in ("adam", "adamw"):
        return None
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam  # deferred

    keys = set(_ADAM_SWITCHES)
    for cls in (torch.optim.Adam, torch.optim.AdamW, FusedAdam, DeepSpeedCPUAdam):
        keys |= _arguments(cls) or set()
    return frozenset(keys)


def _unknown(key: str, known, where: str) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    hint = f"; did you mean {where}{close[0]}?" if close else \
        f"; DeepSpeed {_version()} reads: {', '.join(sorted(known))}"
    return f"unknown DeepSpeed key {where}{key}{hint}"


def _version() -> str:
    import deepspeed  # deferred

    return deepspeed.__version__


def _check_pydantic(section: dict, model, where: str) -> Optional[str]:
    if not isinstance(section, dict):
        return None  # DeepSpeed's own model reports a wrong type (e.g. the legacy "zero_optimization": true)
    keys = _pydantic_keys(model)
    for key, value in section.items():
        if key not in keys:
            return _unknown(key, keys, where)
        if keys[key] is not None and isinstance(value, dict):
            error = _check_pydantic(value, keys[key], f"{where}{key}.")
            if error:
                return error
    return None


def deepspeed_config_error(ds: dict) -> Optional[str]:
    """The first problem of a recipe's DeepSpeed keys as a message naming the key (``deepspeed.`` prefixed, as
    ``--set`` writes it), or None. Checks key names (see the module docstring) and that learning rates are
    not negative; DeepSpeed itself checks the rest when the engine is built."""
    known = read_keys()
    for key in ds:
        if key not in known[()]:
            return _unknown(key, known[()], "deepspeed.")
    models = _models()
    for name, model in models.items():
        if name in ds:
            error = _check_pydantic(ds[name], model, f"deepspeed.{name}.")
            if error:
                return error
    for name, arguments in (("optimizer", optimizer_arguments), ("scheduler", scheduler_arguments)):
        section = ds.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            return f"deepspeed.{name} is {section!r}; expected a JSON object with \"type\" and \"params\""
        for key in section:
            if key not in known[(name,)]:
                return _unknown(key, known[(name,)], f"deepspeed.{name}.")
        params = section.get("params", {})
        if not isinstance(params, dict):
            return f"deepspeed.{name}.params is {params!r}; expected a JSON object"
        allowed = arguments(section.get("type", ""))
        for key, value in params.items():
            if allowed is not None and key not in allowed:
                return _unknown(key, allowed, f"deepspeed.{name}.params.")
            if (key == "lr" or key.endswith("_lr")) and isinstance(value, numbers.Real) and value < 0:
                return (f"deepspeed.{name}.params.{key} is {value}; a learning rate must not be negative "
                        "(0 is allowed, e.g. warmup_min_lr)")
    checkpoint = ds.get("checkpoint", {})
    if isinstance(checkpoint, dict) and checkpoint.get("load_universal"):
        return ("deepspeed.checkpoint.load_universal is true, but DeepSpeed's universal-checkpoint loader reads "
                "files with torch.load(weights_only=False), which can run code from a checkpoint; textdiff "
                "resumes its own checkpoints without it, so leave it unset")
    return None


def zero_stage(ds_config: dict) -> int:
    """``zero_optimization.stage`` of a DeepSpeed config (0 when absent): how the engine shards, and how a
    checkpoint saved its raw weights."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
