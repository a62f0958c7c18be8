"""The one typed config tree of textdiff.

A run recipe is one JSON file (see ``ds_configs/``) that DeepSpeed reads too: DeepSpeed's own keys sit at
the top level, and textdiff's sections sit under the ``"textdiff"`` key::

    {"train_batch_size": 504, ..., "textdiff": {"model": {...}, "diffusion": {...}, "data": {...}}}

Each module reads its own section (``cfg.model``, ``cfg.data`` ...). Loading validates: an unknown key, a
wrong type or an impossible combination is a :class:`ConfigError` that names the key, and so is a DeepSpeed
key that the installed DeepSpeed does not read (:mod:`deepspeed_keys`). Command-line overrides have the
form ``SECTION.KEY=VALUE`` (VALUE parsed as JSON, else taken as a string).

Modules: base (ConfigError), model (the ``model`` section), sections (the others), tree (the whole tree,
loading, overrides), deepspeed_keys, respacing (which steps a respacing spec keeps).
"""

from textdiff.config.base import ConfigError
from textdiff.config.model import ModelConfig
from textdiff.config.sections import (AugmentConfig, CheckpointConfig, DataConfig, DiffusionConfig, EMAConfig,
                                      EvalConfig, TrainConfig)
from textdiff.config.tree import SECTIONS, TextdiffConfig, apply_overrides, config_from_dict, load_config, parse_override

__all__ = ["AugmentConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DiffusionConfig", "EMAConfig",
           "EvalConfig", "ModelConfig", "SECTIONS", "TextdiffConfig", "TrainConfig", "apply_overrides",
           "config_from_dict", "load_config", "parse_override"]
