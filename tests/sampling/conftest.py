"""Tiny trained-looking models for the sampling tests: run directories in the training checkpoint layout.

Weights are random (every zero-initialised parameter made small and random, so outputs depend on every
input). The models predict x_0 (``diffusion.predict_xstart``), so a random network's samples stay inside
[-1, 1] instead of saturating, and differences between runs show in the pixels. The diffusion has 100 steps
and samplers take 2-3, so a whole cascade samples in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from textdiff.config import DiffusionConfig, EMAConfig, ModelConfig, TextdiffConfig
from textdiff.models import build_model
from textdiff.formats.checkpoint import COMPLETE, CONFIG_FILE, TEXTDIFF_STATE, checkpoint_name
from textdiff.train.ema import EMA

from ..conftest import tiny_model_cfg

EMA_SCALE = 0.5  # the fake EMA is the raw weights times this, so the two are told apart


def tiny_sampling_cfg(**overrides) -> ModelConfig:
    """The tiny model (tests/conftest.py) with transcription conditioning and a learned variance;
    ``image_size=32, low_res_size=16`` makes an upsampler (three levels, attention at 8 px)."""
    keys = dict(learn_sigma=True, txt=True, txt_dim=32, txt_depth=1, max_seq_len=8, txt_resolutions=(8,),
                cross_attn_channels_per_head=16, **overrides)
    if keys.get("image_size") == 32:
        keys.update(channel_mult=(1, 1, 2), txt_resolutions=(8,), attention_resolutions=(8,))
    return tiny_model_cfg(**keys)


def tiny_sampling_config(**model_overrides) -> TextdiffConfig:
    """The whole tree of a tiny model, with a 100-step cosine diffusion that predicts x_0."""
    return TextdiffConfig(model=tiny_sampling_cfg(**model_overrides),
                          diffusion=DiffusionConfig(diffusion_steps=100, predict_xstart=True)).validate()


def random_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """build_model(cfg) with zero-initialised parameters made small and random, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model.eval()


def write_run(run_dir: Path, cfg: TextdiffConfig, seed: int = 0, step: int = 3) -> torch.nn.Module:
    """A run directory holding one complete checkpoint as training writes it (stage 0 module state,
    textdiff.pt with an EMA of rate 0.9999, config.json); returns the model with the raw weights."""
    model = random_model(cfg.model, seed)
    ckpt = run_dir / "checkpoints" / checkpoint_name(step)
    ckpt.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ema = EMA([n for n, _ in named], [p.detach() * EMA_SCALE for _, p in named], EMAConfig())
    torch.save({"step": step, "ema": ema.state_dict()}, ckpt / TEXTDIFF_STATE)
    (ckpt / CONFIG_FILE).write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    (ckpt / COMPLETE).write_text(f"{step}\n")
    return model


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``ema_scale`` and run directories of a 16 px base (``base``), a 16 -> 32 px upsampler (``up``), a
    noise-conditioned one (``up_nc``) and an 8 -> 32 px upsampler that fits no base here (``up_from8``), with
    their raw models (``base_model`` ...) and configs (``base_cfg`` ...)."""
    root = tmp_path_factory.mktemp("runs")
    specs = {"base": {}, "up": dict(image_size=32, low_res_size=16),
             "up_nc": dict(image_size=32, low_res_size=16, noise_cond=True),
             "up_from8": dict(image_size=32, low_res_size=8)}
    out = {}
    for i, (name, overrides) in enumerate(specs.items()):
        cfg = tiny_sampling_config(**overrides)
        out[name] = root / name
        out[f"{name}_model"] = write_run(root / name, cfg, seed=i)
        out[f"{name}_cfg"] = cfg
    return SimpleNamespace(ema_scale=EMA_SCALE, **out)


@pytest.fixture
def make_run():
    """``make_run(run_dir, **model_overrides)`` writes a tiny run directory and returns its raw model."""
    return lambda run_dir, **overrides: write_run(run_dir, tiny_sampling_config(**overrides))
