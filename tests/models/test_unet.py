"""The U-net: output shapes, upsampler and noise conditioning, monochrome, the base64 recipe at reduced width."""

from pathlib import Path

import pytest
import torch

from textdiff.config import load_config
from textdiff.models import build_model
from textdiff.models.fused import GroupNormSiLU

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("learn_sigma, channels", [(False, 3), (True, 6)])
def test_output_is_eps_or_eps_and_variance(tiny, learn_sigma, channels):
    model = tiny.model(tiny.cfg(learn_sigma=learn_sigma))
    x, t = tiny.inputs()
    with torch.no_grad():
        assert model(x, t).shape == (2, channels, 16, 16)


def test_fresh_model_predicts_zero_because_the_output_conv_starts_at_zero(tiny):
    x, t = tiny.inputs()
    with torch.no_grad():
        assert build_model(tiny.cfg())(x, t).abs().max() == 0.0


def test_upsampler_output_depends_on_the_low_res_image(tiny):
    model = tiny.model(tiny.cfg(low_res_size=8))
    x, t = tiny.inputs()
    low = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x, t, **model.prepare_cond(None, None, low_res=low))
        b = model(x, t, **model.prepare_cond(None, None, low_res=low.flip(-1)))
    assert model.input_steps[0].layers[0].in_channels == 6 and (a - b).abs().max() > 1e-3


def test_noise_conditioning_changes_the_output(tiny):
    model = tiny.model(tiny.cfg(low_res_size=8, noise_cond=True))
    x, t = tiny.inputs()
    low = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x, t, **model.prepare_cond(None, None, low_res=low, noise_cond_t=torch.tensor([0, 0])))
        b = model(x, t, **model.prepare_cond(None, None, low_res=low, noise_cond_t=torch.tensor([0, 400])))
    assert torch.allclose(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-3


def test_noise_conditioning_is_ignored_when_off(tiny):
    model = tiny.model(tiny.cfg(low_res_size=8))
    x, t = tiny.inputs()
    low = torch.randn(2, 3, 8, 8)
    cond = model.prepare_cond(None, None, low_res=low, noise_cond_t=torch.tensor([0, 400]))
    assert "noise_cond_t" not in cond and model.noise_cond_embed is None
    with torch.no_grad():
        assert torch.equal(model(x, t, **cond), model(x, t, low_res=low, noise_cond_t=torch.tensor([999, 999])))


def test_noise_conditioning_without_a_level_is_a_clear_error(tiny):
    model = tiny.model(tiny.cfg(low_res_size=8, noise_cond=True))
    with pytest.raises(ValueError, match="model.noise_cond is true: prepare_cond needs noise_cond_t"):
        model.prepare_cond(None, None, low_res=torch.zeros(1, 3, 8, 8))


def test_monochrome_model_works_on_one_channel_and_the_adapter_on_rgb(tiny):
    mono = tiny.model(tiny.cfg(monochrome=True, learn_sigma=True))
    adapted = tiny.model(tiny.cfg(monochrome=True, monochrome_adapter=True, learn_sigma=True))
    x, t = tiny.inputs()
    with torch.no_grad():
        assert mono(x[:, :1], t).shape == (2, 2, 16, 16)
        assert adapted(x, t).shape == (2, 6, 16, 16)
    assert adapted.rgb_in.weight.flatten().tolist() == pytest.approx([0.299, 0.587, 0.114])


def test_fused_silu_model_matches_the_torch_one(tiny):
    reference, fused = tiny.model(tiny.cfg(txt=True)), tiny.model(tiny.cfg(txt=True, silu_impl="fused"))
    x, t = tiny.inputs()
    cond = reference.prepare_cond(["abc", None], None)
    with torch.no_grad():
        assert torch.allclose(reference(x, t, **cond), fused(x, t, **cond), atol=1e-5)


def test_base64_recipe_at_reduced_width_runs_forward_and_backward_on_cpu(tiny):
    overrides = ["model.num_channels=32", "model.channels_per_head=16", "model.num_heads=4",
                 "model.cross_attn_channels_per_head=16", "model.txt_dim=32", "model.txt_depth=1",
                 "model.max_seq_len=24", f"model.clipname={tiny.clip}", "model.clip_pretrained=",
                 "model.silu_impl=torch"]
    cfg = load_config(ROOT / "ds_configs/base64.json", overrides).model
    model = tiny.model(cfg).train()
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([900])
    out = model(x, t, **model.prepare_cond(["STOP"], ["a road sign"]))
    out.square().mean().backward()
    assert out.shape == (1, 6, 64, 64)
    trainable = list(model.trainable_parameters())
    with_grad = [p for p in trainable if p.grad is not None and p.grad.abs().sum() > 0]
    # every trainable parameter takes part; only the null-condition paths unused by this batch may stay at 0
    assert len(with_grad) >= 0.95 * len(trainable), f"{len(with_grad)} of {len(trainable)} got a gradient"


def test_model_cast_to_bfloat16_takes_float32_inputs(tiny):
    model = tiny.model(tiny.cfg(txt=True, low_res_size=8, noise_cond=True)).to(torch.bfloat16)
    x, t = tiny.inputs()
    cond = model.prepare_cond(["ab", None], None, low_res=torch.randn(2, 3, 8, 8), noise_cond_t=torch.tensor([0, 9]))
    with torch.no_grad():
        out = model(x, t, **cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_space_to_depth_stem_runs_the_first_level_at_half_size_and_returns_full_size(tiny):
    cfg = tiny.cfg(image_size=32, stem_patch=2, attention_resolutions=(8,), learn_sigma=True)
    model = tiny.model(cfg)
    x, t = tiny.inputs(size=32)
    seen = []
    model.input_steps[1].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        out = model(x, t)
        shifted = model(x.roll(1, dims=-1), t)
    assert model.input_steps[0].layers[0].in_channels == 3 * 2 * 2 and seen[0] == (2, 32, 16, 16)
    assert out.shape == (2, 6, 32, 32)
    # every output pixel of the 2x2 blocks comes from its own shuffled channel: neighbours are not copies
    assert float((out[:, :, 0::2] - out[:, :, 1::2]).abs().mean()) > 1e-3
    assert float((out - shifted).abs().max()) > 1e-3


def test_group_count_is_a_model_option_so_widths_like_48_work(tiny):
    model = tiny.model(tiny.cfg(num_channels=48, num_groups=16, channels_per_head=16, num_heads=3))
    x, t = tiny.inputs()
    with torch.no_grad():
        assert model(x, t).shape == (2, 3, 16, 16)
    fused = {m.groups for m in model.modules() if isinstance(m, GroupNormSiLU)}
    plain = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert fused == {16} and plain == {16}


def test_pooled_transcription_embedding_conditions_every_block_through_the_timestep_stream(tiny):
    """With txt_pooled_emb the first token's encoding joins the embedding that every ResBlock reads."""
    model = tiny.model(tiny.cfg(txt=True, txt_pooled_emb=True))
    x, t = tiny.inputs()
    seen = []
    model.input_steps[1].layers[0].emb_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    with torch.no_grad():
        model(x, t, **model.prepare_cond(["ab", "ab"], None))
        model(x, t, **model.prepare_cond(["ab", "cd"], None))
    assert torch.equal(seen[0][0], seen[1][0]) and float((seen[0][1] - seen[1][1]).abs().max()) > 1e-3
    assert sum(p.numel() for p in model.txt_emb_proj.parameters()) == 2 * 32 + 32 * 128 + 128


def _loss_and_grads(model, x, t, **cond):
    loss = model(x, t, **cond).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny):
    cfg = tiny.cfg(txt=True)
    plain = tiny.model(cfg)
    checkpointed = tiny.model(tiny.cfg(txt=True, use_checkpoint=True))
    checkpointed.load_state_dict(plain.state_dict())
    x, t = tiny.inputs()
    cond = plain.prepare_cond(["ab", "cd"], None)
    loss, grads = _loss_and_grads(plain, x, t, **cond)
    loss_c, grads_c = _loss_and_grads(checkpointed, x, t, **cond)
    assert torch.equal(loss, loss_c) and grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-7)


def test_norm_recompute_trades_kept_activations_for_nothing_else(tiny):
    """"all" keeps less for the backward pass than "top" (only the 16 px maps recompute), "top" less than
    "none"; the loss and gradients are the same whichever recomputes."""
    from textdiff.bench.train import LiveTensorBytes

    x, t = tiny.inputs()
    kept, results = {}, {}
    for mode in ("all", "top", "none"):
        model = tiny.model(tiny.cfg(txt=True, norm_recompute=mode)).train()
        cond = model.prepare_cond(["ab", "cd"], None)
        with LiveTensorBytes() as counter:
            out = model(x, t, **cond)
        kept[mode] = counter.live
        del out
        results[mode] = _loss_and_grads(model, x, t, **cond)
    assert kept["all"] < kept["top"] < kept["none"]
    for mode in ("top", "none"):
        assert torch.equal(results[mode][0], results["all"][0])
        for name, grad in results["all"][1].items():
            torch.testing.assert_close(results[mode][1][name], grad, rtol=1e-6, atol=1e-8)


def test_norm_recompute_top_is_the_full_width_maps(tiny):
    model = build_model(tiny.cfg(norm_recompute="top"))
    widths = {m.recompute_from_width for m in model.modules() if isinstance(m, GroupNormSiLU)}
    assert widths == {16}


def test_checkpointing_below_a_resolution_picks_the_levels_at_most_that_wide(tiny):
    model = build_model(tiny.cfg(use_checkpoint_below_res=8))
    steps = [*model.input_steps, model.middle, *model.output_steps]
    assert {s.res for s in steps if s.checkpoint} == {8} and {s.res for s in steps if not s.checkpoint} == {16}
    assert not any(s.checkpoint for s in [*build_model(tiny.cfg()).input_steps])


def test_upsample_conv3x3_equals_nearest_upsampling_then_the_conv():
    from textdiff.models.blocks import upsample_conv3x3

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).double()
    x = torch.randn(2, 5, 4, 6, dtype=torch.double)
    expected = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    assert upsample_conv3x3(x, conv).shape == (2, 7, 8, 12)
    torch.testing.assert_close(upsample_conv3x3(x, conv), expected, rtol=0, atol=1e-12)
