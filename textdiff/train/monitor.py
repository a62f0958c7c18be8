"""The seam between training and looking at what it trains: a *monitor* (image grids, the spelling
evaluation: textdiff/eval/monitor.py) is handed a model holding the EMA weights, the step and the logger, and
never sees the engine, the optimizer or the ranks. The trainer calls it on rank 0; the other ranks wait."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from textdiff.train.logging import TrainLogger


@dataclass
class MonitorView:
    """What a monitor sees at a step: ``model`` in eval mode holding the weights of the monitor's first
    average (sharing the frozen caption encoder), ``load(name)`` to put another of its ``averages`` into that
    model, ``first_batch`` (its ``low_res`` images feed an upsampler's grid), and whether this is the run's last
    step or a stopping one."""

    step: int
    samples_seen: int
    model: torch.nn.Module
    first_batch: Optional[dict]
    logger: TrainLogger
    last: bool
    stopping: bool
    load: Callable[[str], torch.nn.Module] = lambda name: None


class Monitor(Protocol):
    """What the trainer calls (textdiff/eval/monitor.py implements it)."""

    averages: list[str]  # weights it looks at, first the one it samples: "raw" or an EMA's name (textdiff/train/ema.py)

    def setup_error(self) -> Optional[str]:
        """On rank 0 before any training work: why the monitor cannot run (a missing program, a bad prompt
        file), or None. The trainer stops every rank with it as a ConfigError."""

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        """Whether :meth:`observe` has work at ``step`` (every rank asks, so all gather the EMA together)."""

    def observe(self, view: MonitorView) -> None:
        """Look at the model at ``view.step`` (rank 0 only)."""
