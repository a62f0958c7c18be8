"""bench_train --peer: diffusers' U-net sized like textdiff's, both steps timed, and the memory counter."""

import pytest
import torch

from textdiff.config import load_config
from textdiff.models import build_model
from textdiff.bench.train import LiveTensorBytes, peak_step_bytes, step_seconds

pytest.importorskip("diffusers")

from textdiff.models import conv  # noqa: E402
from textdiff.models.linear import Linear  # noqa: E402
from textdiff.bench.peer import (peer_bench, peer_heads, peer_unet, textdiff_heads, trainable_size,  # noqa: E402
                                 with_textdiff_kernels)


def test_the_peer_of_the_demo_recipe_is_within_ten_percent_of_its_size():
    cfg = load_config("ds_configs/demo_cpu.json")
    mine, peer = trainable_size(build_model(cfg.model, load_capt_weights=False)), trainable_size(peer_unet(cfg.model))
    assert mine == 1_487_979 and abs(peer / mine - 1) < 0.10


@pytest.mark.slow
def test_peer_bench_reports_both_throughputs_sizes_and_peaks(tiny):
    result = peer_bench(tiny(), torch.float32, steps=1, warmup=0)
    assert result["ratio"] == pytest.approx(result["img_s_textdiff"] / result["img_s_peer"])
    assert result["params_textdiff"] > 0 and result["params_peer"] > 0
    assert result["peak_mb_textdiff"] > 0 and result["peak_mb_peer"] > 0
    assert result["faults_textdiff"] >= 0 and result["faults_peer"] >= 0
    assert result["gflop_textdiff"] > 0 and 0 < result["mfu_textdiff"] and 0 < result["mfu_peer"]
    # the heads that make the match checkable are in the record
    assert result["middle_heads_peer"] == result["middle_heads_textdiff"] == 2
    assert result["head_width_peer"][-1] == result["head_width_textdiff"][-1] == 32


def test_the_peer_on_textdiffs_kernel_route_is_the_same_function_in_fp32():
    """Every conv and linear layer of the peer swapped, no weight changed: identical output in fp32, where the
    route is F.conv2d and F.linear."""
    cfg = load_config("ds_configs/demo_cpu.json")
    torch.manual_seed(0)
    peer = peer_unet(cfg.model).eval()
    same = with_textdiff_kernels(peer)
    convs = [type(m) for m in same.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [type(m) for m in same.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) > 20 and set(convs) == {conv.Conv2d}
    assert len(linears) > 20 and set(linears) == {Linear}
    x, t, txt = torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.randn(2, 24, cfg.model.txt_dim)
    with torch.no_grad():
        assert torch.equal(peer(x, t, encoder_hidden_states=txt).sample, same(x, t, encoder_hidden_states=txt).sample)


@pytest.mark.slow
@pytest.mark.parametrize("native", [False, True], ids=["fp32_kernel_route", "bf16_kernels"])
def test_in_bf16_the_peer_is_also_timed_on_textdiffs_kernel_route_where_the_cpu_has_no_bf16_kernel(
        tiny, monkeypatch, native):
    """The switch stands in for the CPU kind, so both kinds run both cases."""
    monkeypatch.setattr(conv, "NATIVE_BF16_CPU", native)
    result = peer_bench(tiny(), torch.bfloat16, steps=1, warmup=0)
    if native:
        assert "ratio_same_kernels" not in result and "img_s_peer_same_kernels" not in result
    else:
        assert result["ratio_same_kernels"] == pytest.approx(result["img_s_textdiff"]
                                                             / result["img_s_peer_same_kernels"])


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


@pytest.mark.parametrize("size", ["demo", "46M"])
def test_the_peer_runs_textdiffs_heads_head_for_head(size):
    """diffusers' attention_head_dim is the number of heads: given textdiff's per-level head counts, the peer's
    built attention layers run the same heads of the same width at every attention level and in the middle."""
    import argparse
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).parents[2] / "tools" / "bench_train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = tool.size_config(size, argparse.Namespace(config=None, overrides=[])).model
    mine, peer = textdiff_heads(cfg), peer_heads(peer_unet(cfg))
    attended = [i for i, h in enumerate(peer["heads"]) if h is not None]
    assert attended  # the sizes attend somewhere
    assert [peer["heads"][i] for i in attended] == [mine["heads"][i] for i in attended]
    assert [peer["head_width"][i] for i in attended] == [mine["head_width"][i] for i in attended] == \
        [cfg.channels_per_head] * len(attended)
    assert (peer["middle_heads"], peer["middle_head_width"]) == (mine["middle_heads"], mine["middle_head_width"])
