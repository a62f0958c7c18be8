"""Shared fixtures: a small synthetic shard set that data, model and training tests stream from."""

from __future__ import annotations

from pathlib import Path

import pytest

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
