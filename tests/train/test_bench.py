"""bench_train: the engine step and the plain PyTorch step both run, and the ratio is their time ratio."""

import pytest
import torch

from textdiff.config import ModelConfig, TextdiffConfig
from textdiff.train.bench import bench_train, synthetic_batch


def test_synthetic_batch_has_the_stream_layout_with_low_res_for_upsamplers():
    cfg = TextdiffConfig(model=ModelConfig(image_size=32, low_res_size=8, channel_mult=(1, 2), num_channels=32,
                                           attention_resolutions=(16,), channels_per_head=32, num_heads=1))
    batch = synthetic_batch(cfg, 3, torch.Generator().manual_seed(0))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["low_res"].shape == (3, 3, 8, 8)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and len(batch["txt"]) == 3


def test_bench_reports_both_throughputs_and_their_ratio(tiny):
    result = bench_train(tiny("deepspeed.gradient_accumulation_steps=2"), steps=1, warmup=1)
    assert result["images_per_step"] == 8 and result["dtype"] == "float32" and result["zero_stage"] == 0
    assert result["engine_images_per_s"] > 0 and result["plain_images_per_s"] > 0
    assert result["overhead"] == pytest.approx(result["plain_images_per_s"] / result["engine_images_per_s"])


def test_the_ema_update_adds_no_collective_and_its_overhead_is_reported(tiny):
    result = bench_train(tiny("deepspeed.zero_optimization.stage=2"), steps=1, warmup=0)
    assert result["ema_sharded"] and result["ema_overhead"] > 0
    assert result["collectives_per_step_with_ema"] == result["collectives_per_step"] > 0
    assert result["collective_mb_per_step_with_ema"] == result["collective_mb_per_step"]


def test_checkpointing_every_level_keeps_less_for_the_backward_pass(tiny):
    from textdiff.train.bench import checkpointing_bench

    off, every = checkpointing_bench(tiny(), {"off": {}, "every level": {"use_checkpoint": True}}, steps=1, warmup=0)
    assert off["variant"] == "off" and off["memory_ratio"] == 1.0 and every["use_checkpoint"] is True
    assert every["memory_ratio"] < 1.0 and every["img_s"] > 0
