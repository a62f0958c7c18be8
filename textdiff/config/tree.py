"""The one typed config tree: :class:`TextdiffConfig` of all sections, built from a recipe dict or JSON file
with ``SECTION.KEY=VALUE`` overrides, and back to the recipe layout."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from textdiff.config.base import ConfigError
from textdiff.config.deepspeed_keys import deepspeed_config_error
from textdiff.config.model import ModelConfig
from textdiff.config.sections import (AugmentConfig, CheckpointConfig, DataConfig, DiffusionConfig, EMAConfig,
                                      EvalConfig, TrainConfig)


@dataclass
class TextdiffConfig:
    """The whole tree. ``deepspeed`` keeps DeepSpeed's own keys exactly as written in the file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: dict = field(default_factory=dict)

    def validate(self) -> "TextdiffConfig":
        """Validate every section; returns self so calls chain."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.deepspeed:
            error = deepspeed_config_error(self.deepspeed)
            if error:
                raise ConfigError(error)
        return self

    def to_dict(self) -> dict:
        """The tree as the JSON recipe layout (DeepSpeed keys at top level, textdiff sections below)."""
        out = dict(self.deepspeed)
        out["textdiff"] = {f.name: _to_jsonable(dataclasses.asdict(getattr(self, f.name)))
                           for f in dataclasses.fields(self) if f.name != "deepspeed"}
        return out


SECTIONS = tuple(f.name for f in dataclasses.fields(TextdiffConfig) if f.name != "deepspeed")


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation and convert lists to tuples; raise naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} is {value!r}; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if isinstance(value, str):  # the seed wrote lists as "16,8,4"
            value = [v for v in value.split(",") if v.strip()]
            value = [json.loads(v) if v.strip().lstrip("-").replace(".", "", 1).isdigit() else v for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} is {value!r}; expected a list")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is {value!r}; expected a JSON object")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} is {value!r}; expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} is {value!r}; expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} is {value!r}; expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} is {value!r}; expected a string")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {annotation!r}")


def _build_section(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a JSON object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}.{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return cls(**kwargs)


def config_from_dict(raw: dict) -> TextdiffConfig:
    """Build and validate the tree from a recipe dict (DeepSpeed keys + ``textdiff`` sections)."""
    raw = dict(raw)
    sections = raw.pop("textdiff", {})
    if not isinstance(sections, dict):
        raise ConfigError("textdiff must be a JSON object of sections")
    hints = typing.get_type_hints(TextdiffConfig)
    kwargs = {}
    for name, value in sections.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, SECTIONS, n=1)
            hint = f"; did you mean textdiff.{close[0]}?" if close else f"; sections: {', '.join(SECTIONS)}"
            raise ConfigError(f"unknown section textdiff.{name}{hint}")
        kwargs[name] = _build_section(hints[name], value, name)
    return TextdiffConfig(deepspeed=raw, **kwargs).validate()


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``SECTION.KEY=VALUE`` into (section, key, value); VALUE is JSON if it parses, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r} is not of the form SECTION.KEY=VALUE (e.g. train.max_steps=20)")
    path, value_text = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = json.loads(value_text)
    except json.JSONDecodeError:
        value = value_text
    return section.strip(), key.strip(), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the recipe dict with ``SECTION.KEY=VALUE`` overrides applied.

    ``deepspeed.KEY=VALUE`` sets a top-level DeepSpeed key (dots below it address nested keys).
    """
    raw = json.loads(json.dumps(raw))
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "deepspeed":
            node = raw
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
            continue
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; sections: {', '.join(SECTIONS)}, deepspeed"
            raise ConfigError(f"--set {text!r}: unknown section {section}{hint}")
        raw.setdefault("textdiff", {}).setdefault(section, {})[key] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TextdiffConfig:
    """Read a recipe JSON file, apply ``--set`` overrides, and validate; errors name the file and key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass one of ds_configs/*.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
    try:
        return config_from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
