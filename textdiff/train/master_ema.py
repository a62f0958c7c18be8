"""The EMA of a DeepSpeed engine's fp32 master weights, where they live.

Under ZeRO 1-3 (and DeepSpeed's bf16 optimizer) every rank averages its own fp32 partition, so the update
communicates nothing; where every rank holds all of the masters (ZeRO 0) rank 0 alone keeps the average.
The full average is gathered only for a checkpoint or a monitor (sample grid, evaluation), once per step, and
a checkpoint's full average is laid out as this rank's partition again on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from textdiff.config import EMAConfig
from textdiff.formats.checkpoint import rate_key
from textdiff.formats.ema_snapshots import write_snapshot
from textdiff.train import engine as eng
from textdiff.train.ema import EMA, power_key


class MasterEMA:
    """:class:`EMA` of ``engine``'s fp32 master weights for the trainable ``params`` (named ``names``;
    ``scalar[i]``: the model keeps parameter i 0-dim, training as [1])."""

    def __init__(self, engine, names: list[str], params: list[nn.Parameter], scalar: list[bool], cfg: EMAConfig,
                 rank: int):
        self.engine, self.names, self.params, self.scalar, self.rank = engine, names, params, scalar, rank
        master, self.sharded = eng.fp32_master_weights(engine, params)
        labels = names if eng.master_is_params(engine, params) else [f"fp32 master {i}" for i in range(len(master))]
        self.ema = EMA(labels, master, cfg) if self.sharded or rank == 0 else None
        self.sigma_rels = {power_key(s): float(s) for s in cfg.power_sigma_rels}
        self._cache: dict[str, tuple[int, Optional[dict[str, torch.Tensor]]]] = {}  # rate -> (step, full EMA)

    @property
    def num_updates(self) -> int:
        """Updates so far (0 on ranks that keep no average)."""
        return self.ema.num_updates if self.ema is not None else 0

    def update(self) -> None:
        """Fold in the masters as the optimizer left them."""
        if self.ema is not None:
            self.ema.update(eng.fp32_master_weights(self.engine, self.params)[0])

    def weights(self, rate: float | str, step: int) -> Optional[dict[str, torch.Tensor]]:
        """{parameter name: full fp32 EMA} of one rate at ``step`` on rank 0, None elsewhere; the model's
        shapes (0-dim gains too). Gathers a sharded EMA (all ranks must call this); kept per step."""
        key = rate if isinstance(rate, str) else rate_key(rate)
        if key in self._cache and self._cache[key][0] == step:
            return self._cache[key][1]
        if self.ema is None:  # a replicated EMA lives on rank 0 alone
            return None
        local = list(self.ema.named_averages(key).values())
        full = eng.full_fp32_parameters(self.engine, self.params, local)
        weights = self.shaped(dict(zip(self.names, full))) if self.rank == 0 else None
        # every rank remembers the step, so that a second call at this step (the grid, then the evaluation)
        # gathers nowhere rather than on all ranks but the one that kept the result
        self._cache = {key: (step, weights)}
        return weights

    def shaped(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors by parameter name in the model's shapes: 0-dim gains, trained as [1], made 0-dim."""
        return {n: t.reshape(()) if s else t for (n, t), s in zip(full.items(), self.scalar)}

    def state(self, step: int) -> Optional[dict]:
        """The full EMA for the checkpoint on rank 0 (all ranks must call this): count, names, averages."""
        averages = {key: self.weights(key, step) for key in self.ema.averages} if self.ema is not None else {}
        if self.rank != 0:
            return None
        return {"num_updates": self.ema.num_updates, "names": list(self.names),
                "averages": {k: [t.cpu() for t in v.values()] for k, v in averages.items()}}

    def load(self, saved: dict) -> None:
        """Lay a checkpoint's full fp32 averages (names in model order) out as this rank's master weights."""
        if self.ema is None:
            return
        if list(saved["names"]) != self.names:
            missing = sorted(set(self.names) - set(saved["names"]))[:3]
            raise ValueError(f"the checkpoint's EMA holds other parameters than this model (e.g. missing "
                             f"{missing}); resume with the model config the run was started with")
        averages = {k: eng.partition_fp32(self.engine, self.params, v) for k, v in saved["averages"].items()}
        self.ema.load_state_dict({"num_updates": saved["num_updates"], "names": self.ema.names,
                                  "averages": averages})

    def snapshot(self, run_dir: Path, step: int) -> None:
        """Save the power-function EMAs at ``step`` (textdiff/formats/ema_snapshots.py); all ranks must call
        this (a sharded EMA is gathered), rank 0 writes."""
        averages = {key: self.weights(key, step) for key in self.sigma_rels}
        if self.rank == 0:
            write_snapshot(run_dir, step, self.ema.num_updates, averages, self.sigma_rels)
