"""Per-group learning rates (text_lr, gain_lr, capt_lr), channels-last weights and cudnn.benchmark in the engine."""

import pytest
import torch

from textdiff.config import ConfigError
from textdiff.models import build_model
from textdiff.train import engine as eng
from textdiff.train.param_groups import lr_group, param_groups, scheduled_group_lrs

GROUP_LRS = ("train.text_lr=5e-4", "train.gain_lr=1e-3", "train.capt_lr=2.5e-4")


@pytest.fixture
def grouped(tiny, tiny_clip):
    """The tiny recipe with weave attention, an unfrozen caption encoder and a learning rate per group."""
    def make(*overrides):
        return tiny("model.weave_attn=true", "model.using_capt=true", f"model.clipname={tiny_clip}",
                    "model.clip_pretrained=", "model.freeze_capt_encoder=false", *overrides)
    return make


def test_parameters_are_grouped_by_module_as_the_research_codes_training_loop():
    assert lr_group("text_encoder.layers.0.attn.qkv.weight") == "text"
    assert lr_group("output_steps.0.layers.2.cross.q.weight") == "text"  # text -> image attention
    assert lr_group("input_steps.5.layers.2.weave.ff.inp.weight") == "text"  # image -> text (weave) layers
    assert lr_group("output_steps.0.layers.2.cross.gain.gain") == "gain"
    assert lr_group("input_steps.5.layers.2.weave.ff_gain") == "gain"
    assert lr_group("capt_encoder.tower.token_embedding.weight") == "capt"
    for name in ("middle.layers.1.capt_kv.weight", "middle.layers.1.qkv.weight", "out_conv.bias", "time_embed.0.weight"):
        assert lr_group(name) == "other"  # the research code's caption keys/values (encoder_kv) train at lr too


def test_param_groups_carry_their_lrs_in_a_fixed_order_without_empty_groups():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = param_groups([("text_encoder.w", a), ("out_conv.w", b), ("x.cross.gain.gain", c)],
                          {"other": 1e-4, "text": 5e-4, "gain": 1e-3, "capt": 2e-4})
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(1, 1e-4), (1, 5e-4), (1, 1e-3)]
    assert groups[1]["params"][0] is a


def test_warmup_schedulers_warm_each_group_up_to_its_own_lr():
    ds = {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-4}}}
    out = scheduled_group_lrs(ds, [1.0, 5.0, 0.5])
    assert out["scheduler"]["params"]["warmup_max_lr"] == pytest.approx([1e-4, 5e-4, 5e-5])
    assert out["scheduler"]["params"]["warmup_min_lr"] == pytest.approx([1e-5, 5e-5, 5e-6])
    assert ds["scheduler"]["params"]["warmup_max_lr"] == 1e-4  # the recipe itself is left as it was
    with pytest.raises(ConfigError, match="scheduler.type 'OneCycle'"):
        scheduled_group_lrs({"scheduler": {"type": "OneCycle", "params": {}}}, [1.0, 2.0])


def _engine(cfg):
    eng.init_distributed()
    torch.manual_seed(0)
    engine, _, _ = eng.build_engine(build_model(cfg.model, load_capt_weights=False), cfg, 1)
    return engine


def test_group_lrs_are_the_optimizers_and_move_each_parameter_by_its_lr_on_the_first_adam_step(grouped):
    cfg = grouped(*GROUP_LRS, "deepspeed.gradient_clipping=0.0", "deepspeed.optimizer.params.weight_decay=0.0")
    cfg.deepspeed.pop("scheduler")  # no warm-up: the first step runs at each group's full lr
    engine = _engine(cfg)
    named = list(engine.module.named_parameters())
    lr_of = {"other": 2e-3, "text": 5e-4, "gain": 1e-3, "capt": 2.5e-4}
    assert [g["lr"] for g in engine.optimizer.param_groups] == [2e-3, 5e-4, 1e-3, 2.5e-4]
    before = [p.detach().clone() for _, p in named]
    engine.backward(sum((p * 1.0).sum() for _, p in named))  # every gradient 1: Adam's first step is lr * sign
    engine.step()
    for (name, p), old in zip(named, before):
        step = (old - p.detach()).abs()
        assert torch.allclose(step, torch.full_like(step, lr_of[lr_group(name)]), rtol=1e-4), name


def test_warmup_lr_reaches_each_groups_own_lr(grouped):
    engine = _engine(grouped(*GROUP_LRS))  # WarmupLR to 2e-3 over 5 steps
    engine.lr_scheduler.step(10)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([2e-3, 5e-4, 1e-3, 2.5e-4])


def test_without_group_lrs_the_optimizer_has_one_group_at_the_recipes_lr(tiny):
    engine = _engine(tiny())
    assert [g["lr"] for g in engine.optimizer.param_groups] == [0.0]  # WarmupLR starts at warmup_min_lr 0
    engine.lr_scheduler.step(10)
    assert [g["lr"] for g in engine.optimizer.param_groups] == [2e-3]


def test_channels_last_stores_the_conv_weights_channels_last_and_computes_the_same(tiny):
    plain, last = _engine(tiny()), _engine(tiny("train.channels_last=true"))
    weight = last.module.out_conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert plain.module.out_conv.weight.is_contiguous()
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    cond = plain.module.prepare_cond(["ab", ""], None)
    a = eng.engine_forward(plain, torch.float32)(x, t, **cond)
    b = eng.engine_forward(last, torch.float32, channels_last=True)(x, t, **cond)
    assert torch.allclose(a, b, atol=1e-5)


def test_channels_last_under_zero_1_feeds_channels_last_inputs_and_leaves_deepspeeds_flat_weights(tiny):
    engine = _engine(tiny("train.channels_last=true", "deepspeed.zero_optimization.stage=1"))
    assert engine.module.out_conv.weight.is_contiguous()  # a view of ZeRO's flat buffer
    seen = []
    engine.module.out_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    eng.engine_forward(engine, torch.float32, channels_last=True)(x, t, **engine.module.prepare_cond(["ab", ""], None))
    # the last convolution's input: the whole U-net's activations stayed channels-last
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


@pytest.mark.slow
def test_the_trainer_sets_cudnn_benchmark_and_channels_last_from_the_recipe(tiny, tmp_path):
    from textdiff.train.loop import Trainer

    before = torch.backends.cudnn.benchmark
    try:
        trainer = Trainer(tiny("train.cudnn_benchmark=true", "train.channels_last=true", "train.max_steps=1"),
                          tmp_path / "run")
        assert torch.backends.cudnn.benchmark is True
        assert trainer.engine.module.out_conv.weight.is_contiguous(memory_format=torch.channels_last)
        trainer.train_step()
        trainer.close()
    finally:
        torch.backends.cudnn.benchmark = before
