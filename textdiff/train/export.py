"""Export a checkpoint's weights (EMA or raw) and its config as one safetensors file for sampling.

The file holds fp32 tensors named as in ``build_model(cfg.model).state_dict()`` (a frozen caption encoder is
left out: ``build_model`` loads it from its own weights) and, in its metadata, the whole config tree
(``textdiff_config``, JSON), which weights these are (``weights``: ``ema:<rate>`` or ``raw``), the step and
the source checkpoint. Works for every ZeRO stage: raw weights under ZeRO 1-3 are merged from the
partitions with DeepSpeed's ``zero_to_fp32``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from textdiff.config import ConfigError, TextdiffConfig, config_from_dict
from textdiff.files import atomic_write_bytes

CONFIG_KEY = "textdiff_config"


def model_shapes(cfg: TextdiffConfig) -> dict[str, torch.Size]:
    """{name: shape} of the model's state dict, built on the meta device (no memory, no weights read)."""
    from textdiff.models import build_model

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

    weights: ``"ema"`` (one EMA rate; ``ema_rate`` picks one when the run kept several) or ``"raw"``.
    """
    from safetensors.torch import save

    from textdiff.sampling.loading import checkpoint_weights, read_source_config, resolve_checkpoint

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"export target {out} must end in .safetensors")
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights is {weights!r}; choose ema or raw")
    ckpt = resolve_checkpoint(source)
    cfg = read_source_config(ckpt)
    state, label = checkpoint_weights(ckpt, cfg, weights, ema_rate)
    state = fit_shapes({k: v.detach().float().contiguous() for k, v in state.items()}, model_shapes(cfg))
    meta = {CONFIG_KEY: json.dumps(cfg.to_dict()), "weights": label, "source": str(ckpt),
            "step": ckpt.name.removeprefix("step_").lstrip("0") or "0"}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(state, metadata=meta))
    return out


def read_export_config(path: str | Path) -> TextdiffConfig:
    """The config stored in an exported file's metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise ConfigError(f"exported file {path} does not exist; write one with tools/export.py") from None
    if CONFIG_KEY not in meta:
        raise ConfigError(f"{path} has no {CONFIG_KEY} metadata; it was not written by tools/export.py")
    return config_from_dict(json.loads(meta[CONFIG_KEY]))


def read_export(path: str | Path) -> tuple[TextdiffConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of an exported file."""
    from safetensors.torch import load_file

    cfg = read_export_config(path)
    return cfg, load_file(str(path))
