"""Shared fixtures: a small synthetic shard set that data, model and training tests stream from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from textdiff.data.shards import make_synthetic_shards

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
