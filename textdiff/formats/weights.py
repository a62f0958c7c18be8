"""Weights out of a *source*: a training run directory (its latest complete checkpoint), a ``RUN_DIR/checkpoints``
folder, one complete checkpoint directory ``.../step_NNNNNNNN``, or an exported ``.safetensors`` file.

From a checkpoint, ``weights="ema"`` takes an EMA average (``textdiff.pt``; ``ema_rate`` picks one when the
run kept several) and ``weights="raw"`` the optimizer's weights: fp32 master weights merged from the ZeRO
partitions for ZeRO stages 1-3 (DeepSpeed's ``zero_to_fp32``), the module's own state for stage 0 (in the
run's compute dtype, cast to fp32). :func:`read_source_config` reads only the config, so a cascade can be
checked before any weight is loaded. :func:`export_checkpoint` writes a checkpoint's weights as an export
(fp32 tensors named as in ``build_model(cfg.model).state_dict()``; a frozen caption encoder is left out:
``build_model`` loads it from its own weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from textdiff.config import ConfigError, TextdiffConfig, config_from_dict
from textdiff.config.deepspeed_keys import zero_stage
from textdiff.formats.checkpoint import (COMPLETE, CONFIG_FILE, TEXTDIFF_STATE, UnsafeCheckpointError,
                                         find_complete_checkpoint, load_untrusted, rate_key)
from textdiff.formats.export import SAFETENSORS_SUFFIX, is_export, read_export_config, write_export
from textdiff.models import build_model

WEIGHTS = ("ema", "raw")


class LoadError(ValueError):
    """A model source cannot be used; the message names the path and what to do."""


def resolve_checkpoint(source: str | Path) -> Path:
    """The complete checkpoint directory a run directory, checkpoints folder or checkpoint path stands for."""
    path = Path(source)
    found = find_complete_checkpoint(path)
    if found is not None:
        return found
    if not path.exists():
        raise LoadError(f"model source {path} does not exist; pass a run directory, a checkpoint directory "
                        f"(step_NNNNNNNN) or an exported *{SAFETENSORS_SUFFIX} file")
    raise LoadError(f"model source {path} holds no complete checkpoint (a step_NNNNNNNN directory with a "
                    f"{COMPLETE} file); was the run stopped before its first save?")


def _load(path: Path):
    """load_untrusted, its refusal as a LoadError (a downloaded checkpoint is untrusted)."""
    try:
        return load_untrusted(path)
    except UnsafeCheckpointError as e:
        raise LoadError(str(e)) from None


def read_source_config(source: str | Path) -> TextdiffConfig:
    """The config a source was trained with, without loading weights."""
    if is_export(source):
        return read_export_config(source)
    ckpt = resolve_checkpoint(source)
    path = ckpt / CONFIG_FILE
    try:
        return config_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise LoadError(f"checkpoint {ckpt} has no {CONFIG_FILE}; it was not written by textdiff's training") from None
    except (json.JSONDecodeError, ConfigError) as e:
        raise LoadError(f"{path}: {e}") from None


def ema_state_dict(ckpt: Path, ema_rate: Optional[float | str] = None, default: Optional[str] = None
                   ) -> tuple[dict[str, torch.Tensor], str]:
    """{parameter name: fp32 EMA average} of one average from a checkpoint, and its key.

    ``ema_rate``: a rate (``0.999``) or an average's name (``"plain:0.999"``, ``"power:0.05"``); None takes
    ``default`` (the run's first ``ema.rates``) where the checkpoint keeps it, else the only average, or
    names the choices when there are several.
    """
    path = ckpt / TEXTDIFF_STATE
    if not path.is_file():
        raise LoadError(f"checkpoint {ckpt} has no {TEXTDIFF_STATE} (the EMA weights); use --raw for the "
                        "optimizer's weights")
    state = _load(path)
    ema = (state or {}).get("ema")
    if not ema:
        raise LoadError(f"{path} holds no EMA; use --raw for the optimizer's weights")
    averages = ema["averages"]
    if ema_rate is None and default in averages:
        key = default
    elif ema_rate is None:
        if len(averages) != 1:
            raise LoadError(f"{path} keeps EMA rates {', '.join(sorted(averages))}; pick one with --ema-rate")
        key = next(iter(averages))
    else:
        key = ema_rate if isinstance(ema_rate, str) else rate_key(ema_rate)
        if key not in averages:
            raise LoadError(f"--ema-rate {ema_rate}: {path} keeps EMA rates {', '.join(sorted(averages))} only")
    return dict(zip(ema["names"], averages[key])), key


def raw_state_dict(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The optimizer's weights as a full fp32 state dict: merged ZeRO partitions (stages 1-3) or the module
    state DeepSpeed saved (stage 0)."""
    if zero_stage > 0:
        # deferred: DeepSpeed takes seconds to import, and only ZeRO 1-3 checkpoints need its merger
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 calls torch.load(weights_only=False) itself: every file it may read is checked first
        for path in sorted(ckpt.glob("*.pt")):
            _load(path)

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise LoadError(f"checkpoint {ckpt} has no DeepSpeed module state (mp_rank_00_model_states.pt); is its "
                        "config.json's zero_optimization.stage right?")
    module = _load(files[0])["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def checkpoint_weights(ckpt: Path, cfg: TextdiffConfig, weights: str, ema_rate: Optional[float] = None
                       ) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, label) of checkpoint ``ckpt``: ``weights`` ``"ema"`` (label ``ema:RATE``) or ``"raw"``."""
    if weights == "ema":
        state, key = ema_state_dict(ckpt, ema_rate, default=rate_key(cfg.ema.rates[0]))
        return state, f"ema:{key}"
    return raw_state_dict(ckpt, zero_stage(cfg.deepspeed)), "raw"


def model_shapes(cfg: TextdiffConfig) -> dict[str, torch.Size]:
    """{name: shape} of the model's state dict, built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        model = build_model(cfg.model, load_capt_weights=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def fit_shapes(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Reshape entries whose element count matches the model's but whose shape does not (training keeps 0-dim
    parameters as [1], see ``engine.promote_scalar_parameters``); everything else is left as it is."""
    out = {}
    for name, t in state.items():
        target = shapes.get(name)
        out[name] = t.reshape(target) if target is not None and t.shape != target and t.numel() == target.numel() else t
    return out


def export_checkpoint(source: str | Path, out: str | Path, weights: str = "ema",
                      ema_rate: Optional[float] = None) -> Path:
    """Write ``out`` (.safetensors) from a run directory or checkpoint ``source``; returns ``out``.

    weights: ``"ema"`` (one EMA rate; ``ema_rate`` picks one when the run kept several) or ``"raw"``. Works for
    every ZeRO stage: raw weights under ZeRO 1-3 are merged from the partitions.
    """
    if not is_export(out):
        raise ConfigError(f"export target {out} must end in {SAFETENSORS_SUFFIX}")
    if weights not in WEIGHTS:
        raise ConfigError(f"weights is {weights!r}; choose one of {', '.join(WEIGHTS)}")
    ckpt = resolve_checkpoint(source)
    cfg = read_source_config(ckpt)
    state, label = checkpoint_weights(ckpt, cfg, weights, ema_rate)
    state = fit_shapes({k: v.detach().float().contiguous() for k, v in state.items()}, model_shapes(cfg))
    return write_export(out, state, cfg, {"weights": label, "source": str(ckpt),
                                          "step": ckpt.name.removeprefix("step_").lstrip("0") or "0"})


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``model``; every parameter the optimizer trains must be there, and nothing else.

    A frozen caption encoder is not in training checkpoints: it keeps the weights ``build_model`` gave it.
    Scalar parameters that training keeps as ``[1]`` are reshaped to the model's ``[]``.
    """
    state = fit_shapes(state, {k: v.shape for k, v in model.state_dict().items()})
    frozen = tuple(f"{name}." for name, m in model.named_modules()
                   if name and any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters()))
    expected = {n for n in model.state_dict() if not n.startswith(frozen)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise LoadError(f"{where} does not fit the model its config builds: missing {missing[:3]} "
                        f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all)")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in state:
                if state[name].shape != tensor.shape:
                    raise LoadError(f"{where}: {name} has shape {tuple(state[name].shape)}, the model "
                                    f"{tuple(tensor.shape)}")
                tensor.copy_(state[name])
