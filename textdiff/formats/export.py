"""The export format: a model's weights in one ``.safetensors`` file whose metadata carries the whole config
(``textdiff_config``, the recipe JSON), where the weights came from (``weights``: ``ema:<rate>`` or ``raw``),
the checkpoint (``source``) and its ``step``. safetensors holds tensors only, so loading one runs no code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from textdiff.config import ConfigError, TextdiffConfig, config_from_dict
from textdiff.files import atomic_write_bytes

CONFIG_KEY = "textdiff_config"
SAFETENSORS_SUFFIX = ".safetensors"


def is_export(path: str | Path) -> bool:
    """Whether ``path`` names an export (by its suffix) rather than a run or checkpoint directory."""
    return str(path).endswith(SAFETENSORS_SUFFIX)


def write_export(out: str | Path, state: dict[str, torch.Tensor], cfg: TextdiffConfig, meta: dict[str, str]) -> Path:
    """Write ``state`` (contiguous tensors) and ``cfg`` with the string ``meta`` to ``out`` atomically;
    returns ``out``. Raises ConfigError for a name without the ``.safetensors`` suffix."""
    out = Path(out)
    if not is_export(out):
        raise ConfigError(f"export target {out} must end in {SAFETENSORS_SUFFIX}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(state, metadata={CONFIG_KEY: json.dumps(cfg.to_dict()), **meta}))
    return out


def read_export_config(path: str | Path) -> TextdiffConfig:
    """The config stored in an exported file's metadata."""
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
    cfg = read_export_config(path)
    return cfg, load_file(str(path))
