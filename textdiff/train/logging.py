"""What a run reports: TensorBoard scalars, images and text under ``RUN_DIR/tb``, and console logs.

Only rank 0 writes TensorBoard events; per-rank numbers (throughput) are gathered to it and written under
one tag per rank (``perf/images_per_s/rank1``). Rank 0 logs at INFO level, other ranks at WARNING, each
line prefixed with its rank, so a multi-rank console stays readable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Optional

import torch

from textdiff.data.preview import png_bytes
from textdiff.files import atomic_write_bytes


def setup_logging(rank: int) -> None:
    """Console logging for this rank: INFO on rank 0, WARNING elsewhere, lines tagged ``[rank N]``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger("textdiff")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    if rank != 0:  # DeepSpeed's own INFO lines repeat on every rank
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """images: [N, C, H, W] in [-1, 1] -> one [3, rows*(H+2)+2, nrow*(W+2)+2] grid in [0, 1] (2 px gaps)."""
    n, c, h, w = images.shape
    x = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
    if c == 1:
        x = x.expand(n, 3, h, w)
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = x[i]
    return grid


def save_png(grid: torch.Tensor, path: Path) -> None:
    """Write a [3, H, W] grid in [0, 1] as a PNG, atomically."""
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(array))


EVAL_GRID_COLUMNS = 8  # images per row of the eval/samples grid
EVAL_METRICS = ("cer", "exact_match", "word_accuracy", "false_text_rate", "ned", "sentence_accuracy",
                "mario_word_accuracy", "mario_precision", "mario_recall", "mario_f_measure")


def eval_scalars(metrics: Mapping[str, float]) -> dict[str, float]:
    """Spelling metrics as TensorBoard tags (``eval/cer`` ...); rates the evaluation left out stay out."""
    return {f"eval/{k}": float(metrics[k]) for k in EVAL_METRICS if k in metrics}


def append_jsonl(path: Path, record: Mapping) -> None:
    """Append ``record`` as one JSON line in a single write to a file opened for appending, so a reader or a
    crash never sees half a line."""
    line = (json.dumps(dict(record)) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def per_rank(name: str, values: list[float]) -> dict[str, float]:
    """One scalar per rank: ``{"NAME/rank0": v0, "NAME/rank1": v1, ...}``."""
    return {f"{name}/rank{r}": v for r, v in enumerate(values)}


class TrainLogger:
    """TensorBoard writer of rank 0 (other ranks get a logger that writes nothing)."""

    def __init__(self, run_dir: Path, rank: int):
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # deferred: TensorBoard's import is slow; rank 0 only

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One point per tag at ``step``; non-finite values are written too (they show a divergence)."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, float(value), global_step=step)

    def image(self, tag: str, step: int, grid: torch.Tensor) -> None:
        """A [3, H, W] image in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, global_step=step, dataformats="CHW")

    def text(self, tag: str, step: int, text: str) -> None:
        """Markdown text (the config as a JSON code block, for instance)."""
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        """Push pending events to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def gpu_memory_gib(dev: torch.device) -> Optional[dict[str, float]]:
    """Allocated and peak GPU memory of ``dev`` in GiB, or None on CPU."""
    if dev.type != "cuda":
        return None
    gib = 1024 ** 3
    return {"gpu/mem_allocated_gib": torch.cuda.memory_allocated(dev) / gib,
            "gpu/mem_peak_gib": torch.cuda.max_memory_allocated(dev) / gib}
