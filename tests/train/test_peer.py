"""bench_train --peer: diffusers' U-net sized like textdiff's, both steps timed, and the memory counter."""

import pytest
import torch

from textdiff.config import load_config
from textdiff.models import build_model
from textdiff.train.bench import LiveTensorBytes, peak_step_bytes, step_seconds

pytest.importorskip("diffusers")

from textdiff.train.peer import peer_bench, peer_unet, trainable_size  # noqa: E402


def test_the_peer_of_the_demo_recipe_is_within_ten_percent_of_its_size():
    cfg = load_config("ds_configs/demo_cpu.json")
    mine, peer = trainable_size(build_model(cfg.model, load_capt_weights=False)), trainable_size(peer_unet(cfg.model))
    assert mine == 1_487_979 and abs(peer / mine - 1) < 0.10


def test_peer_bench_reports_both_throughputs_sizes_and_peaks(tiny):
    result = peer_bench(tiny(), torch.float32, steps=1, warmup=0)
    assert result["ratio"] == pytest.approx(result["img_s_textdiff"] / result["img_s_peer"])
    assert result["params_textdiff"] > 0 and result["params_peer"] > 0
    assert result["peak_mb_textdiff"] > 0 and result["peak_mb_peer"] > 0
    assert result["gflop_textdiff"] > 0 and 0 < result["mfu_textdiff"] and 0 < result["mfu_peer"]


def test_steps_are_timed_in_a_b_b_a_rounds():
    order = []
    step_seconds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4, 0, torch.device("cpu"))
    assert "".join(order) == "abbaabba"


def test_live_tensor_bytes_peak_counts_what_is_alive_together():
    def step():
        x = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        y = torch.empty(500, dtype=torch.float64)  # 4000 bytes, both alive
        del x, y
        torch.empty(250, dtype=torch.float32)  # 1000 bytes, after the others were freed
    with LiveTensorBytes() as counter:
        step()
    assert counter.peak == 8000 and counter.live == 0
    assert peak_step_bytes(step, torch.device("cpu")) == 8000
