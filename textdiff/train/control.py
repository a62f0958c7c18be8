"""Run control for the training loop: per-rank seeding, global RNG state for exact resume, and stop signals."""

from __future__ import annotations

import logging
import random
import signal

import numpy as np
import torch

log = logging.getLogger(__name__)


def rng_state() -> dict:
    """Global RNG states of torch (CPU and CUDA), numpy and random, for checkpoints.

    Only tensors, numbers and tuples, so ``torch.load(weights_only=True)`` reads it back (numpy's own state
    holds an ndarray, which needs pickle).
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int) -> torch.Generator:
    """Seed the global RNGs for this rank and return the loop's own generator (noise, timesteps, dropout)."""
    rank_seed = seed * 1000 + rank
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2 ** 32)
    random.seed(rank_seed)
    return torch.Generator().manual_seed(rank_seed + 7919)


class StopFlag:
    """Set by SIGTERM/SIGINT (the loop saves and exits after the step); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def defer_worker_errors(self) -> None:
        """Let a DataLoader worker's death surface at the next batch instead of anywhere.

        DeepSpeed's launcher sends SIGTERM to every process of a rank, data workers first, and PyTorch's
        SIGCHLD handler would then raise in the middle of whatever the rank is doing. The loader itself still
        reports a dead worker when it next waits for a batch (within 5 s), where the loop can act on it.
        """
        torch_handler = signal.getsignal(signal.SIGCHLD)
        if not callable(torch_handler) or signal.SIGCHLD in self._previous:
            return
        self._previous[signal.SIGCHLD] = torch_handler

        def handler(signum, frame) -> None:
            try:
                torch_handler(signum, frame)
            except RuntimeError as e:
                log.warning("%s; the next batch will tell whether training can go on", e)

        signal.signal(signal.SIGCHLD, handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: the user (or a stuck rank) cannot wait for the save
            raise KeyboardInterrupt
        self.requested = True
        log.warning("got %s: saving a checkpoint after this step, then exiting", signal.Signals(signum).name)
