"""Benchmarks: the training step against plain PyTorch and against diffusers (``train``, ``peer``), and the
closed-form problems the samplers are measured on (``mixture``). tools/bench_*.py are their command lines."""
