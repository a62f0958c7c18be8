"""The losses of the steps since the last log, kept on the device and summed over the ranks once per
``train.log_every``, and what a non-finite loss does.

A NaN or inf loss on any rank is seen by all ranks at the next reduction of the window: the next log, and
before every checkpoint, sample grid and evaluation. With fp16 the step goes through and DeepSpeed's loss
scaler skips it (counted in ``train/skipped_steps``); with bf16 or fp32 there is no scaler to skip it, so
every rank stops there with :class:`TrainingDiverged` naming the first bad step, before anything is saved
from the weights that step reached.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf under bf16/fp32; the message names the step."""


def nonfinite_action(dtype: torch.dtype) -> str:
    """What a NaN/inf loss does: ``"skip"`` under fp16 (the loss scaler drops the step), else ``"stop"``."""
    return "skip" if dtype == torch.float16 else "stop"


def step_stats(terms: dict[str, torch.Tensor], t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """One step's sums for the log, on the terms' device: [loss, mse, vb sums, samples, loss sum by
    timestep quartile (4), samples by quartile (4)]. terms: per-sample [N]; t: [N] step indices."""
    quartile = (4 * t.long() // num_timesteps).clamp(max=3).to(terms["loss"].device)
    # not F.one_hot: off CUDA it reads the indices' min and max on the host to check them
    onehot = (quartile[:, None] == torch.arange(4, device=quartile.device)).to(terms["loss"].dtype)  # [N, 4]
    sums = torch.stack([terms["loss"].sum(), terms["mse"].sum(), terms["vb"].sum(),
                        torch.tensor(float(len(t)), device=onehot.device)])
    return torch.cat([sums, terms["loss"] @ onehot, onehot.sum(0)])


class LossWindow:
    """Per-step sums (:func:`step_stats` and the non-finite micro-batch count) since the last reduction, on
    the device; ``dtype`` is the engine's compute dtype (it decides what a non-finite loss does)."""

    def __init__(self, dtype: torch.dtype, accumulation: int, world_size: int):
        self.dtype, self.accumulation, self.world_size = dtype, accumulation, world_size
        self.rows: list[torch.Tensor] = []

    def append(self, stats: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """One step: its :func:`step_stats` [12] and its count of non-finite micro-batches (0-dim)."""
        self.rows.append(torch.cat([stats, nonfinite.reshape(1).to(stats.dtype)]))

    def reduce(self, step: int) -> tuple[dict[str, float], list[float]]:
        """The steps since the last call (the last of them is ``step``), summed over the ranks in one
        all-reduce (all ranks call this): their means ``train/loss``, ``train/mse``, ``train/vb`` and
        ``train/loss_q0..3`` (the quartiles with samples), and each step's mean loss."""
        if not self.rows:
            return {}, []
        stats = torch.stack(self.rows).double()  # [steps, 13]
        dist.all_reduce(stats)
        stats = stats.cpu()
        self._raise_if_diverged(stats[:, 12], step)
        self.rows = []
        total = stats.sum(0)
        out = {"train/loss": float(total[0] / total[3]), "train/mse": float(total[1] / total[3]),
               "train/vb": float(total[2] / total[3])}
        for q in range(4):
            if total[8 + q] > 0:
                out[f"train/loss_q{q}"] = float(total[4 + q] / total[8 + q])
        return out, (stats[:, 0] / stats[:, 3]).tolist()

    def check_finite(self, step: int) -> None:
        """Raise TrainingDiverged (on every rank: all must call this) if a step since the last reduction had a
        non-finite loss under bf16/fp32; the window is kept for the next log."""
        if self.rows:
            counts = torch.stack([row[12] for row in self.rows]).double()
            dist.all_reduce(counts)
            self._raise_if_diverged(counts.cpu(), step)

    def _raise_if_diverged(self, nonfinite: torch.Tensor, step: int) -> None:
        """nonfinite: [steps] non-finite micro-batches of each step in the window, summed over the ranks."""
        bad = nonfinite.nonzero().flatten()
        if len(bad) == 0 or nonfinite_action(self.dtype) != "stop":
            return
        first = step - len(nonfinite) + 1 + int(bad[0])
        raise TrainingDiverged(
            f"the loss is not finite at step {first} (in {int(nonfinite[bad[0]])} micro-batches of "
            f"{self.accumulation} x {self.world_size} ranks; {len(bad)} of the {len(nonfinite)} steps up to step "
            f"{step}) under {str(self.dtype).removeprefix('torch.')}, which has no loss scaling to skip it; "
            f"nothing was saved after it. Resume from the last checkpoint with a lower lr or gradient_clipping, "
            "or check the data")
