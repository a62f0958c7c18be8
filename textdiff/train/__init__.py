"""Training on DeepSpeed: ``launch.sh`` -> :mod:`cli` -> :func:`loop.train`.

engine (process group, ZeRO, precision, frozen modules), loop (the training loop), control (per-rank seeding, RNG
state for exact resume, stop signals), ema (arithmetic-then-
exponential averages), checkpoint (atomic save, retention, resume, remote copy), logging (TensorBoard),
export (safetensors for sampling), bench (engine vs plain PyTorch step), ds_keys (the keys DeepSpeed reads, so
a typo in the recipe is refused). See docs/training.md.
"""
