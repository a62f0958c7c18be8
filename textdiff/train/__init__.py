"""Training on DeepSpeed: ``launch.sh`` -> :mod:`textdiff.launch` -> :func:`loop.train`.

engine (process group, ZeRO, precision, fp32 master weights, frozen modules), loop (the Trainer), loss (one
micro-batch's diffusion loss), window (losses reduced once per log, non-finite handling), master_ema and ema
(averages of the fp32 masters), control (per-rank seeding, RNG state for exact resume, stop signals),
checkpoint (atomic save, retention, resume checks, remote copy), logging (TensorBoard), param_groups
(per-group learning rates), monitor (the seam to what a run shows while it trains). See docs/training.md.
"""
