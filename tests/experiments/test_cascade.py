"""tools/prove_cascade.py at a tiny budget on the session's tiny spelling experiment: the plumbing of the cascade
experiment (its result is the 40-minute run recorded in docs/cascade.md), and the image metrics it reports."""

import json

import numpy as np
import pytest
from PIL import Image

from textdiff.experiments.cascade import RESULT_KEYS, bicubic, cascade_grid, psnr, ssim

from .conftest import load_tool

cascade_tool = load_tool("prove_cascade")
TINY_UP = ("model.num_channels=32", "model.channel_mult=[1,2]", "model.txt_dim=32", "model.txt_depth=1",
           "model.channels_per_head=16", "model.cross_attn_channels_per_head=16", "model.num_heads=2",
           "model.txt_resolutions=[16]", "model.attention_resolutions=[16]", "eval.every=4",
           "checkpoint.save_every=1000")


def test_psnr_and_ssim_of_worked_examples():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = np.clip(a.astype(int) + 5, 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    # two flat images: SSIM is its luminance term alone, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    flat1, flat2 = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(flat1, flat2) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-9)
    assert ssim(a, rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)) < 0.1  # unrelated noise


def test_bicubic_upscaling_and_the_grid_have_the_asked_sizes():
    low = [np.zeros((32, 32, 3), np.uint8)] * 3
    assert [im.shape for im in bicubic(low, 64)] == [(64, 64, 3)] * 3
    grid = cascade_grid([("a", low, ["1>1"] * 3), ("b", bicubic(low, 64), ["1>-"] * 3)], n=3, size=64)
    assert grid.size == (2 * 70 + 6, 18 + 3 * (64 + 13 + 4))


@pytest.mark.slow  # trains the base experiment (session fixture) and an upsampler
def test_the_cascade_experiment_scores_every_figure_on_the_base_samples(experiment, tmp_path, capfd):
    code, base = experiment
    assert code == 0
    out = tmp_path / "cascade"
    argv = ["--base", str(base), "--minutes", "5", "--out", str(out), "--renders", "1", "--steps", "4",
            "--levels", "0,200", "--engine", "tesseract", "--json"]
    for s in TINY_UP:
        argv += ["--set", s]
    assert cascade_tool.main(argv) == 0
    printed = json.loads(capfd.readouterr().out.splitlines()[-1])
    result = json.loads((out / "result.json").read_text())
    assert set(RESULT_KEYS) <= set(result) and printed["cer_base32"] == result["cer_base32"]
    assert result["n_eval"] == 110 and result["steps"] >= 1
    # the base samples are the spelling experiment's own: the same CER as it recorded with the same engine
    assert result["cer_base32"] == pytest.approx(json.loads((base / "result.json").read_text())["cer_txt"])
    assert list(result["cer_cascade64_by_level"]) == ["0", "200"]  # JSON keys
    assert 0.0 <= result["ceiling64"] <= 0.05 and 0.0 <= result["ceiling32"] <= 0.1
    assert 0 < result["ssim_bicubic"] <= 1 and result["psnr_bicubic"] > 10
    assert Image.open(out / "eval" / "grid.png").size[0] == 4 * 70 + 6
    assert cascade_tool.main(["--base", str(base), "--out", str(out), "--reevaluate", "--steps", "4", "--levels", "0",
                              "--engine", "tesseract"] + [a for s in TINY_UP for a in ("--set", s)]) == 0


def test_a_base_that_is_not_a_finished_experiment_is_refused_before_any_work(tmp_path, capsys):
    assert cascade_tool.main(["--base", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    assert "holds no result.json; give a finished tools/prove_spelling.py --out" in capsys.readouterr().err
