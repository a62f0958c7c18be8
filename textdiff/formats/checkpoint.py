"""The checkpoint layout: names, complete checkpoints, and files read without running their pickles.

Layout under ``RUN_DIR/checkpoints/``::

    step_00001000/               one complete checkpoint (the directory name carries the step)
        <DeepSpeed's files>      engine.save_checkpoint(tag=...): module, optimizer, scheduler, loss scale
        rank_00000.pt ...        per rank: data stream position, RNG states, timestep-sampler state
        textdiff.pt              rank 0: EMA averages and update count, step, wall time
        config.json              the whole config tree the run used
        COMPLETE                 written last; only directories with it are ever resumed from
    .partial-step_00002000/      a save in progress (or one killed mid-way); never picked, removed later
    .replaced-step_00001000/     the previous copy of a step saved again, while the new one is renamed in

Only directories with ``COMPLETE`` count (:func:`complete_checkpoints`); a ``.replaced-step_N`` copy stands
for step N while a re-save of it is renamed in (textdiff/train/checkpoint.py writes them). Every file is read
through :func:`load_untrusted`: a downloaded checkpoint is untrusted, and its pickles never run code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch

from textdiff.config import ConfigError
from textdiff.files import atomic_write, fsync_dir

log = logging.getLogger(__name__)


COMPLETE = "COMPLETE"


PARTIAL_PREFIX = ".partial-"


REPLACED_PREFIX = ".replaced-"


TEXTDIFF_STATE = "textdiff.pt"


CONFIG_FILE = "config.json"


_NAME = re.compile(r"^(?:\.replaced-)?step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps (``step_00001000``)."""
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    """File name of one rank's textdiff state inside a checkpoint."""
    return f"rank_{rank:05d}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through :func:`textdiff.files.atomic_write` (a crash leaves the old file or the new one)."""
    atomic_write(path, lambda f: torch.save(obj, f))


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file holds more than tensors and plain containers (its pickle would run code)."""


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its optimizer-state files pickle: an enum, the loss scalers (plain attribute
    holders) and a two-number dataclass, whose rebuilding runs no code of the file's choosing."""
    try:  # deferred: DeepSpeed takes seconds to import, and sampling an export needs none
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # sampling an export or a stage-0 checkpoint needs no DeepSpeed
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_untrusted(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only, never a pickle
    that runs code. Raises UnsafeCheckpointError naming the file and what it tried to load."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f"calls {found.group(1)}" if found else "holds objects other than tensors and containers"
            raise UnsafeCheckpointError(
                f"{path} is refused: its pickle {what}, which torch.load(weights_only=True) does not allow, so "
                "loading it could run code from the file. Use checkpoints written by textdiff's training, or "
                "weights exported with tools/export.py (*.safetensors)") from None


def fsync_tree(path: Path) -> None:
    """fsync every file and folder below ``path`` (DeepSpeed writes its files without an fsync).

    Other ranks write into the same folder meanwhile: a temporary file renamed away before it is opened here
    is skipped (its writer, :func:`atomic_torch_save`, syncs it; every rank syncs the tree after its own
    writes, so each file is synced by the rank that wrote it).
    """
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:
                continue
        fsync_dir(Path(folder))


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under ``root``, oldest first (``step_N``, or the
    ``.replaced-step_N`` copy when a re-save of step N was cut between its two renames)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for d in sorted(root.iterdir(), key=lambda d: not d.name.startswith(REPLACED_PREFIX)):  # step_N wins
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            found[int(m.group(1))] = d
    return sorted(found.items())


def ignored_checkpoints(root: str | Path) -> list[Path]:
    """Folders under ``root`` that look like checkpoints but are not complete (a save cut short)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and not (d / COMPLETE).is_file()
                  and (d.name.startswith(PARTIAL_PREFIX) or _NAME.match(d.name)))


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The complete checkpoint with the highest step under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def find_complete_checkpoint(path: str | Path) -> Optional[Path]:
    """The complete checkpoint ``path`` stands for: itself, or the latest below it (a checkpoints folder) or
    below its ``checkpoints/`` (a run directory); None when there is none."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    return latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")


def resolve_resume(resume: Optional[str], root: str | Path) -> Optional[Path]:
    """The checkpoint directory that ``--resume`` names: None (fresh start), ``auto`` (the latest complete one
    under ``root``, or None when there is none yet) or a path of a complete checkpoint directory."""
    if not resume:
        return None
    if resume == "auto":
        found = latest_checkpoint(root)
        for d in ignored_checkpoints(root):
            log.warning("ignored the partial checkpoint %s (no %s file: its save was cut short); resuming from %s",
                        d, COMPLETE, found if found is not None else "the start")
        return found
    found = find_complete_checkpoint(resume)
    if found is not None:
        return found
    raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} file in it) and no complete "
                      "checkpoint below it; pass a step_NNNNNNNN directory, a run directory, or --resume auto")


def read_config(path: Path) -> dict:
    """The recipe dict saved in checkpoint ``path`` (its ``config.json``)."""
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {path} has no readable {CONFIG_FILE} ({type(e).__name__}); was it written "
                          "by textdiff's training?") from None


def rate_key(rate: float) -> str:
    """The name of one average in state dicts, exports and TensorBoard (``0.9999`` -> ``"0.9999"``)."""
    return repr(float(rate))
