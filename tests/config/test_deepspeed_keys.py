"""DeepSpeed keys the installed DeepSpeed does not read, and negative learning rates, are named with the
close key; every recipe of ds_configs/ uses only keys DeepSpeed reads."""

from pathlib import Path

import pytest

from textdiff.config import ConfigError, load_config
from textdiff.config.deepspeed_keys import zero_stage

ROOT = Path(__file__).resolve().parents[2]
BASE64 = ROOT / "ds_configs/base64.json"


@pytest.mark.parametrize("override, message", [
    ("deepspeed.zero_optimisation.stage=2",
     "unknown DeepSpeed key deepspeed.zero_optimisation; did you mean deepspeed.zero_optimization?"),
    ("deepspeed.gradient_cliping=1.0",
     "unknown DeepSpeed key deepspeed.gradient_cliping; did you mean deepspeed.gradient_clipping?"),
    ("deepspeed.zero_optimization.stag=2",
     "unknown DeepSpeed key deepspeed.zero_optimization.stag; did you mean deepspeed.zero_optimization.stage?"),
    ('deepspeed.zero_optimization.offload_optimizer={"devic": "cpu"}',
     "deepspeed.zero_optimization.offload_optimizer.devic; did you mean "
     "deepspeed.zero_optimization.offload_optimizer.device?"),
    ("deepspeed.fp16.loss_scale_windw=100", "did you mean deepspeed.fp16.loss_scale_window?"),
    ("deepspeed.optimizer.params.weight_decy=0.1", "did you mean deepspeed.optimizer.params.weight_decay?"),
    ("deepspeed.scheduler.params.warmup_num_step=5", "did you mean deepspeed.scheduler.params.warmup_num_steps?"),
    ("deepspeed.scheduler.params.warmup_max_lr=-0.001",
     "deepspeed.scheduler.params.warmup_max_lr is -0.001; a learning rate must not be negative"),
    ("deepspeed.optimizer.params.lr=-0.001",
     "deepspeed.optimizer.params.lr is -0.001; a learning rate must not be negative"),
    ("deepspeed.checkpoint.load_universal=true", "torch.load\\(weights_only=False\\)"),
])
def test_deepspeed_keys_it_does_not_read_and_negative_learning_rates_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(BASE64, [override])


def test_every_recipe_uses_only_keys_deepspeed_reads():
    for recipe in sorted((ROOT / "ds_configs").glob("*.json")):
        assert load_config(recipe).deepspeed, recipe
    cfg = load_config(BASE64, ["deepspeed.scheduler.params.warmup_min_lr=0", "deepspeed.bf16.enabled=false",
                               "deepspeed.zero_optimization.offload_optimizer.device=cpu"])
    assert cfg.deepspeed["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


def test_the_zero_stage_is_read_from_zero_optimization_and_is_0_without_it():
    assert [zero_stage({}), zero_stage({"zero_optimization": {}}), zero_stage({"zero_optimization": {"stage": 3}})] \
        == [0, 0, 3]
