"""The spelling experiment at a tiny budget, run once per session for every test that needs a finished one
(tests/experiments/test_spelling.py, test_cascade.py): about two minutes, so the tests using it are slow."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    """A tools/NAME.py script as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prove = load_tool("prove_spelling")

MINUTES = 2.2
TINY = ("model.num_channels=32", "model.channel_mult=[1,2]", "model.txt_dim=32", "model.txt_depth=1",
        "model.channels_per_head=16", "model.cross_attn_channels_per_head=16", "model.num_heads=2",
        "eval.every=4", "checkpoint.save_every=1000", "ema.power_sigma_rels=[0.05,0.1]", "ema.snapshot_every=4",
        'ema.tracked=["plain:0.999"]')


@pytest.fixture(scope="session")
def experiment(tmp_path_factory):
    """The whole experiment: data, training, evaluation (slow)."""
    out = tmp_path_factory.mktemp("spell") / "run"
    # one engine: the budget's evaluation reserve grows with each (docs/spelling.md)
    argv = ["--minutes", str(MINUTES), "--out", str(out), "--renders", "1", "--steps", "4", "--engine", "tesseract",
            "--json"]
    for s in TINY:
        argv += ["--set", s]
    code = prove.main(argv)
    return code, out


