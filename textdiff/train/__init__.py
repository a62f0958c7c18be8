"""Training on DeepSpeed: ``launch.sh`` -> :mod:`cli` -> :func:`loop.train`.

engine (process group, ZeRO, precision, frozen modules), loop (the training loop), control (per-rank seeding, RNG
state for exact resume, stop signals), ema (arithmetic-then-
exponential averages), checkpoint (atomic save, retention, resume, remote copy), logging (TensorBoard),
export (safetensors for sampling), bench (engine vs plain PyTorch step). See docs/training.md.
"""
