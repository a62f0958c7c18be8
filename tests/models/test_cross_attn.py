"""Transcription cross-attention and weave attention inside the U-net."""

import math
from pathlib import Path

import pytest
import torch

from textdiff.config import load_config
from textdiff.models import build_model
from textdiff.models.cross_attn import AxialPositionTable, BranchGain, ImageToText, TextCrossAttnBlock

ROOT = Path(__file__).resolve().parents[2]


def blocks(steps):
    return [m for step in steps for m in step.modules() if isinstance(m, TextCrossAttnBlock)]


def test_output_layers_only_puts_text_blocks_in_the_decoder_at_each_resolution(tiny):
    model = tiny.model(tiny.cfg(txt=True, txt_output_layers_only=True))
    assert len(blocks(model.input_steps)) == 0
    # 2 decoder steps per level (num_res_blocks + 1) at both 16 and 8 px
    assert sorted(s.res for s in model.output_steps if blocks([s])) == [8, 8, 16, 16]


def test_without_output_layers_only_the_encoder_has_text_blocks_too(tiny):
    model = tiny.model(tiny.cfg(txt=True))
    assert len(blocks(model.input_steps)) == 2 and len(blocks(model.output_steps)) == 4


def test_one_axial_position_table_per_resolution_shared_by_its_blocks(tiny):
    model = tiny.model(tiny.cfg(txt=True, weave_attn=True))
    tables = [m for m in model.modules() if isinstance(m, AxialPositionTable)]
    assert len(tables) == 2 and sorted(model.pos_tables.keys()) == ["16", "8"]
    assert model.pos_tables["8"]().shape == (1, 2 * 64, 8, 8)  # scale and shift for 64 channels at 8 px
    for block in blocks(model.output_steps):
        assert not any(isinstance(m, AxialPositionTable) for m in block.modules())


def test_padded_transcription_tokens_change_nothing(tiny):
    model = tiny.model(tiny.cfg(txt=True, weave_attn=True))
    x, t = tiny.inputs()
    cond = model.prepare_cond(["hi", "abc"], None)
    other = dict(cond)
    other["txt_ids"] = torch.where(cond["txt_mask"], cond["txt_ids"], torch.full_like(cond["txt_ids"], 42))
    with torch.no_grad():
        out, out_other = model(x, t, **cond), model(x, t, **other)
        out_changed = model(x, t, **model.prepare_cond(["hj", "abc"], None))
    assert torch.allclose(out, out_other, atol=1e-5)
    assert (out_changed[0] - out[0]).abs().max() > 1e-3  # a real character does matter
    assert torch.allclose(out_changed[1], out[1], atol=1e-5)  # and only for its own sample


def test_weave_updates_the_text_stream_for_its_own_block_only(tiny):
    model = tiny.model(tiny.cfg(txt=True, weave_attn=True, txt_output_layers_only=True))
    x, t = tiny.inputs()
    seen = []
    for block in blocks(model.output_steps):
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    weave_out = []
    for block in blocks(model.output_steps):
        block.weave.register_forward_hook(lambda mod, args, out: weave_out.append(out.clone()))
    cond = model.prepare_cond(["hello", ""], None)
    with torch.no_grad():
        model(x, t, **cond)
        encoded = model.text_encoder(cond["txt_ids"], cond["txt_mask"], t)
    assert len(seen) == 4 and all(torch.equal(s, encoded) for s in seen)
    assert all((w - encoded).abs().max() > 1e-3 for w in weave_out)


def test_rezero_text_blocks_start_as_the_identity(tiny):
    torch.manual_seed(0)
    from textdiff.models import build_model

    model = build_model(tiny.cfg(txt=True, weave_attn=True, cross_attn_rezero=True)).eval()
    x, t = tiny.inputs()
    h = torch.randn(2, 32, 16, 16)
    block = blocks(model.output_steps)[-1]
    txt = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out = block(h, torch.randn(2, 128), txt, mask, model.pos_tables["16"]())
    assert torch.equal(out, h)


@pytest.mark.parametrize("options", [
    dict(cross_attn_q_t_emb=True, cross_attn_orth_init=True),
    dict(cross_attn_use_layerscale=True, txt_avoid_groupnorm=True),
    dict(cross_attn_rezero=True, cross_attn_rezero_keeps_prenorm=True, txt_attn_before_attn=True),
    dict(weave_attn=True, weave_ff_glu=True, weave_ff_rezero=False, weave_use_ff_gain=True,
         weave_qkv_dim_always_text=True, cross_attn_init_gain=0.5, cross_attn_gain_scale=10.0),
])
def test_cross_attention_options_build_and_give_finite_gradients(tiny, options):
    model = tiny.model(tiny.cfg(txt=True, **options)).train()
    x, t = tiny.inputs()
    out = model(x, t, **model.prepare_cond(["ok", None], None))
    out.square().mean().backward()
    grads = [p.grad for b in blocks(model.output_steps) for p in b.parameters()]
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cross_attention_gain_starts_at_init_gain(tiny):
    model = tiny.model(tiny.cfg(txt=True, cross_attn_init_gain=0.25, cross_attn_gain_scale=200.0))
    gain = blocks(model.output_steps)[0].cross.gain
    assert gain(torch.ones(3)).tolist() == pytest.approx([0.25] * 3, rel=1e-5)


def test_weave_ff_gain_and_rezero_choose_the_mlp_branch_scale(tiny):
    rezero = ImageToText(32, 32, 32, 2, 128, tiny.cfg(txt=True, weave_attn=True, weave_ff_rezero=True))
    gained = ImageToText(32, 32, 32, 2, 128, tiny.cfg(txt=True, weave_attn=True, weave_ff_rezero=False,
                                                       weave_use_ff_gain=True))
    assert rezero.ff_rezero.item() == 0.0 and rezero.ff_gain is None
    assert gained.ff_rezero is None and gained.ff_gain(torch.ones(1)).item() == 1.0
    assert isinstance(gained.ff_norm, torch.nn.LayerNorm) and not isinstance(rezero.ff_norm, torch.nn.LayerNorm)


def test_weave_mlp_gain_is_exp_of_gain_scale_times_g(tiny):
    """The research code's effective MLP gain: exp(gain_scale * g), g starting at log(init_gain) / gain_scale."""
    weave = ImageToText(32, 32, 32, 2, 128, tiny.cfg(txt=True, weave_attn=True, weave_ff_rezero=False,
                                                      weave_use_ff_gain=True, cross_attn_init_gain=0.5,
                                                      cross_attn_gain_scale=10.0))
    assert weave.ff_gain(torch.ones(2)).tolist() == pytest.approx([0.5, 0.5], rel=1e-6)
    with torch.no_grad():
        weave.ff_gain.gain.fill_(0.1)
    assert weave.ff_gain(torch.ones(1)).item() == pytest.approx(math.exp(10.0 * 0.1), rel=1e-6)


def test_layerscale_and_rezero_gains_are_multiplied_by_gain_scale(tiny):
    layerscale = BranchGain(4, tiny.cfg(txt=True, cross_attn_use_layerscale=True, cross_attn_gain_scale=200.0))
    assert layerscale(torch.ones(4)).tolist() == pytest.approx([200.0 * 1e-5] * 4, rel=1e-5)


def test_adaptive_norms_have_the_research_codes_groupnorm_affine(tiny):
    """AdaGN normalises with GroupNorm(1, C) and its own C weights and C biases, before the scale/shift."""
    block = TextCrossAttnBlock(64, 128, tiny.cfg(txt=True, weave_attn=True, cross_attn_q_t_emb=True))
    for norm in (block.cross.img_norm.norm, block.weave.img_norm.norm):
        assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 1
        assert norm.weight.shape == (64,) and norm.bias.shape == (64,)


def test_axial_position_tables_start_standard_normal():
    """rows and cols: 2 x 512 x 32 = 32,768 draws each; the sample mean of N(0, 1) lies within
    4 / sqrt(32768) = 0.022 of 0 and the sample std within 4 * sqrt(1 / (2 * 32768)) = 0.016 of 1."""
    torch.manual_seed(0)
    table = AxialPositionTable(32, 512)
    for w in (table.rows.detach(), table.cols.detach()):
        n = w.numel()
        assert n == 32_768
        assert abs(float(w.mean())) < 4 / n ** 0.5 and abs(float(w.std()) - 1.0) < 4 * (1 / (2 * n)) ** 0.5


def test_up256_text_blocks_have_four_heads_of_128_over_txt_dim_512():
    """The research code's text-to-image attention is txt_dim wide (512) with txt_dim // 128 = 4 heads,
    also where the image has 256 channels (up256's 32 and 64 px levels)."""
    cfg = load_config(str(ROOT / "ds_configs/up256.json")).model
    with torch.device("meta"):
        model = build_model(cfg, load_capt_weights=False)
    crosses = [b.cross for b in blocks(model.output_steps)]
    assert len(crosses) == 6
    assert all(c.heads == 4 and c.q.weight.shape == (512, 256) and c.out.weight.shape == (256, 512)
               for c in crosses)


@pytest.mark.parametrize("always_text, width", [(True, 512), (False, 64)])
def test_weave_image_to_text_width_is_the_images_unless_always_text(tiny, always_text, width):
    cfg = tiny.cfg(txt=True, txt_dim=512, weave_attn=True, weave_qkv_dim_always_text=always_text,
                   cross_attn_channels_per_head=128)
    block = TextCrossAttnBlock(64, 128, cfg)
    assert block.weave.heads == block.cross.heads == 4
    assert block.weave.q.weight.shape == (width, 512) and block.cross.q.weight.shape == (512, 64)


def test_cross_attn_channels_per_head_minus_one_means_num_heads(tiny):
    cfg = tiny.cfg(txt=True, cross_attn_channels_per_head=-1, num_heads=4)
    assert TextCrossAttnBlock(32, 128, cfg).cross.heads == 4
