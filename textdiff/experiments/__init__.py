"""Experiments that prove what textdiff does, end to end: each renders its task, trains with the real engine,
samples and scores, and records its result (tools/prove_*.py are their command lines)."""
