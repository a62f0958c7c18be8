"""Shared fixtures: a small synthetic shard set that data, model and training tests stream from; the one
tiny-model builder (each test folder picks its variant of it), the tiny training recipe on those shards, and
the single-thread setting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from textdiff.config import ModelConfig, TextdiffConfig, apply_overrides, config_from_dict
from textdiff.data.shards import make_synthetic_shards

# the tiny U-net every test folder starts from: 16 px, two levels (16 and 8 px), 32 channels, attention at 8 px
TINY_MODEL = dict(image_size=16, num_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                  num_heads=2, channels_per_head=16)


def tiny_model_keys(**overrides) -> dict:
    """The keys of the tiny model (:data:`TINY_MODEL`) with ``overrides``, as a recipe's ``model`` section."""
    return {**TINY_MODEL, **overrides}


def tiny_model_cfg(**overrides) -> ModelConfig:
    """The tiny model's validated config (:func:`tiny_model_keys`)."""
    cfg = ModelConfig(**tiny_model_keys(**overrides))
    cfg.validate()
    return cfg


TINY_CLIP = str(Path(__file__).parent / "models" / "tiny_clip.json")


def outside_env() -> dict:
    """This process's environment without the rendezvous variables an in-process Trainer of an earlier test
    set (RANK, MASTER_PORT ...): a child run must start as a fresh run would, not join this process's store."""
    dist_vars = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in dist_vars}


def tiny_recipe(shards: Path) -> dict:
    """A recipe dict: micro-batch 4, AdamW, fp32, ZeRO 0; 16 px model with transcription conditioning."""
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-3,
                                                     "warmup_num_steps": 5, "warmup_type": "linear"}},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 1000000,
        "textdiff": {
            "model": tiny_model_keys(channels_per_head=32, learn_sigma=True, txt=True, txt_dim=32, txt_depth=1,
                                     max_seq_len=16, txt_resolutions=[8], cross_attn_channels_per_head=16,
                                     txt_pdrop=0.1),
            "diffusion": {"diffusion_steps": 1000, "noise_schedule": "cosine"},
            "data": {"shards": str(shards / "manifest.json"), "num_workers": 0, "shuffle_buffer": 16,
                     "resampled": False, "save_first_batch": False},
            "train": {"max_steps": 4, "log_every": 1, "sample_every": 0},
            "ema": {"rates": [0.9, 0.5]},
            "checkpoint": {"save_every": 1000, "keep_last": 2},
        },
    }


def tiny_config(shards: Path, *overrides: str) -> TextdiffConfig:
    """The tiny recipe with ``SECTION.KEY=VALUE`` overrides applied."""
    return config_from_dict(apply_overrides(tiny_recipe(shards), list(overrides)))


def write_recipe(shards: Path, path: Path, *overrides: str) -> Path:
    """Write the tiny recipe (with overrides) as a JSON file for launch.sh; returns its path."""
    path.write_text(json.dumps(apply_overrides(tiny_recipe(shards), list(overrides)), indent=1))
    return path


SYNTHETIC_IMAGES = 48
SYNTHETIC_SIZE = 64
SYNTHETIC_PER_SHARD = 16


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of 48 synthetic 64 px images (seed 0) in 3 shards ``shard-00000{0,1,2}.tar`` + manifest.json."""
    out_dir = tmp_path_factory.mktemp("synthetic_shards")
    make_synthetic_shards(SYNTHETIC_IMAGES, out_dir, seed=0, size=SYNTHETIC_SIZE, maxcount=SYNTHETIC_PER_SHARD,
                          workers=0, overwrite=True, progress=False, command="tests/conftest.py synthetic_shards")
    return out_dir


class WaitingCopies(TorchDispatchMode):
    """Counts host -> device copies that wait for the device (not ``non_blocking``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device", args[0].device)
            if src != dst and not kwargs.get("non_blocking", False):
                self.count += 1
        elif func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            if not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                self.count += 1
        return func(*args, **kwargs)


@pytest.fixture
def waiting_copies_mode():
    """The :class:`WaitingCopies` dispatch mode (a class: ``with waiting_copies_mode() as mode``)."""
    return WaitingCopies


@pytest.fixture
def tiny_clip() -> str:
    """Path of the tiny open_clip text-tower config (random weights) of the model tests."""
    return TINY_CLIP


@pytest.fixture
def tiny(synthetic_shards):
    """tiny(*overrides) -> TextdiffConfig on the session's synthetic shards."""
    return lambda *overrides: tiny_config(synthetic_shards, *overrides)


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread: on a shared 2-core machine extra threads mostly wait on each other (25x slower);
    OMP_NUM_THREADS too, which engine.init_distributed and child processes read."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deepspeed_cpu_fp16(monkeypatch):
    """DeepSpeed builds fp16 engines on this CPU, as it does where oneDNN has fp16 kernels (Intel AMX): its CPU
    accelerator asks ``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` and refuses fp16 elsewhere (AMD), though
    PyTorch computes fp16 on any CPU. With this switch both CPU kinds run the same fp16 engine tests."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
