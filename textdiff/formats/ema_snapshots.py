"""EMA snapshots: the power-function EMAs of a run saved every ``ema.snapshot_every`` steps, from which
``tools/reconstruct_ema.py`` rebuilds an EMA of any width after training (textdiff/train/posthoc_ema.py).

``RUN_DIR/ema_snapshots/step_NNNNNNNN.safetensors``: one fp32 tensor per average and parameter, named
``<average>/<parameter>`` (``power:0.05/out_conv.weight``), and in the metadata the step, the EMA's update
count at that step (the profile's length t) and each average's ``sigma_rel``. safetensors holds tensors only,
and a snapshot is written atomically, so a killed run leaves whole snapshots or none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from textdiff.files import atomic_write_bytes

SNAPSHOT_DIR = "ema_snapshots"
_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot file: its ``path``, training ``step``, EMA update count ``updates`` and the relative
    width of each average it holds (``{average name: sigma_rel}``)."""

    path: Path
    step: int
    updates: int
    sigma_rels: dict[str, float]


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """Where the snapshot of ``step`` lives."""
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:08d}.safetensors"


def write_snapshot(run_dir: str | Path, step: int, updates: int, averages: dict[str, dict[str, torch.Tensor]],
                   sigma_rels: dict[str, float]) -> Path:
    """Save ``averages`` ({average name: {parameter name: full fp32 tensor}}) as the snapshot of ``step``."""
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{key}/{name}": t.detach().float().cpu().contiguous()
               for key, named in averages.items() for name, t in named.items()}
    meta = {"step": str(step), "updates": str(updates), "sigma_rels": json.dumps(sigma_rels)}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def list_snapshots(run_dir: str | Path, up_to_step: int | None = None) -> list[SnapshotInfo]:
    """The run's snapshots, oldest first (those after ``up_to_step`` left out), read from metadata only."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for path in sorted(folder.glob("step_*.safetensors")) if folder.is_dir() else []:
        if not _NAME.match(path.name):
            continue
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        step = int(meta["step"])
        if up_to_step is None or step <= up_to_step:
            found.append(SnapshotInfo(path, step, int(meta["updates"]), json.loads(meta["sigma_rels"])))
    return found


def read_snapshot(info: SnapshotInfo) -> dict[str, dict[str, torch.Tensor]]:
    """{average name: {parameter name: fp32 tensor}} of one snapshot."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for full, t in load_file(str(info.path)).items():
        key, _, name = full.partition("/")
        out.setdefault(key, {})[name] = t
    return out
