"""bench_train: the engine step and the plain PyTorch step both run, and the ratio is their time ratio."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from textdiff.config import ModelConfig, TextdiffConfig, load_config
from textdiff.bench.train import bench_train, synthetic_batch

ROOT = Path(__file__).resolve().parents[2]


def test_synthetic_batch_has_the_stream_layout_with_low_res_for_upsamplers():
    cfg = TextdiffConfig(model=ModelConfig(image_size=32, low_res_size=8, channel_mult=(1, 2), num_channels=32,
                                           attention_resolutions=(16,), channels_per_head=32, num_heads=1))
    batch = synthetic_batch(cfg, 3, torch.Generator().manual_seed(0))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["low_res"].shape == (3, 3, 8, 8)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and len(batch["txt"]) == 3


@pytest.mark.slow
def test_bench_reports_both_throughputs_and_their_ratio(tiny):
    result = bench_train(tiny("deepspeed.gradient_accumulation_steps=2"), steps=1, warmup=1)
    assert result["images_per_step"] == 8 and result["dtype"] == "float32" and result["zero_stage"] == 0
    assert result["engine_images_per_s"] > 0 and result["plain_images_per_s"] > 0
    assert result["overhead"] == pytest.approx(result["plain_images_per_s"] / result["engine_images_per_s"])


@pytest.mark.slow
def test_mfu_is_the_model_flops_of_the_step_per_second_over_the_matmul_rate(tiny):
    """Two micro-batches a step do twice the model FLOPs of one; MFU divides them by the engine's step time
    and by the matmul rate measured beside it."""
    one = bench_train(tiny(), steps=1, warmup=0)
    two = bench_train(tiny("deepspeed.gradient_accumulation_steps=2"), steps=1, warmup=0)
    assert one["gflop_per_step"] > 0 and two["gflop_per_step"] == pytest.approx(2 * one["gflop_per_step"], rel=1e-9)
    step_s = two["images_per_step"] / two["engine_images_per_s"]
    assert two["mfu"] == pytest.approx(two["gflop_per_step"] / step_s / two["matmul_gflop_s"])


@pytest.mark.slow
def test_the_ema_update_adds_no_collective_and_its_overhead_is_reported(tiny):
    result = bench_train(tiny("deepspeed.zero_optimization.stage=2"), steps=1, warmup=0)
    assert result["ema_sharded"] and result["ema_overhead"] > 0
    assert result["collectives_per_step_with_ema"] == result["collectives_per_step"] > 0
    assert result["collective_mb_per_step_with_ema"] == result["collective_mb_per_step"]


@pytest.mark.slow
def test_checkpointing_bench_reports_each_variant_against_the_first(tiny):
    from textdiff.bench.train import checkpointing_bench

    off, every = checkpointing_bench(tiny(), {"off": {}, "every level": {"use_checkpoint": True}}, steps=1, warmup=0)
    assert off["variant"] == "off" and off["memory_ratio"] == 1.0 and off["time_ratio"] == 1.0
    assert every["use_checkpoint"] is True and every["img_s"] > 0 and every["peak_mb"] > 0


def test_checkpointing_every_level_keeps_less_for_the_backward_pass(tiny):
    from textdiff.models import build_model
    from textdiff.bench.train import LiveTensorBytes

    cfg = tiny()
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))
    kept = {}
    for flag in (False, True):
        model = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "use_checkpoint": flag}))
        cond = model.prepare_cond(["ab"] * 4, None)
        with LiveTensorBytes() as counter:
            out = model(x, t, **cond)  # what stays alive now is what the backward pass will read
        kept[flag] = counter.live
        out.sum().backward()
    assert kept[True] < 0.5 * kept[False]


def _bench_tool():
    spec = importlib.util.spec_from_file_location("bench_train_tool", ROOT / "tools" / "bench_train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_bench_sizes_are_the_demo_recipe_widened_or_the_given_recipe(capsys):
    tool = _bench_tool()
    args = SimpleNamespace(config="ds_configs/base64.json", overrides=["model.num_res_blocks=3"])
    recipe = tool.size_config("recipe", args).model
    assert (recipe.image_size, recipe.num_channels, recipe.num_res_blocks) == (64, 256, 3)
    demo, wide = tool.size_config("demo", args).model, tool.size_config("46M", args).model
    assert (demo.image_size, demo.num_channels) == (32, load_config(tool.DEMO).model.num_channels)
    assert (wide.image_size, wide.num_channels, wide.channel_mult) == (64, 128, (1, 2, 2, 2))
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--peer", "--sizes", "recipe"])
    assert exit_info.value.code == 2 and "--sizes recipe needs --config" in capsys.readouterr().err


def test_page_faults_counts_the_pages_a_step_maps_in():
    """A 64 MiB block is above glibc's largest mmap threshold (32 MiB), with or without textdiff.malloc's
    setting: each allocation maps it afresh, and its first touch faults at least once per 2 MiB (huge
    pages; 16,384 with 4 KiB pages). A step that allocates nothing takes (next to) none."""
    from textdiff.bench.train import page_faults

    assert page_faults(lambda: torch.ones(16 * 2 ** 20)) >= 31
    assert page_faults(lambda: None) <= 8
