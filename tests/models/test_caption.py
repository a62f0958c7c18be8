"""Caption conditioning through a tiny local open_clip text tower (random weights, no download)."""

import socket

import pytest
import torch

from textdiff.config import ConfigError
from textdiff.models import build_model
from textdiff.models.caption import PLACEHOLDER_CAPTION, CaptionEncoder


def outputs(model, tiny, captions):
    x, t = tiny.inputs(n=len(captions))
    x, t = x[:1].expand(len(captions), -1, -1, -1), t[:1].expand(len(captions))  # same x, t for every caption
    with torch.no_grad():
        return model(x, t, **model.prepare_cond(None, captions))


@pytest.mark.parametrize("style", [dict(glide_style_capt_attn=True, glide_style_capt_emb=False),
                                   dict(glide_style_capt_attn=False, glide_style_capt_emb=True)],
                         ids=["imagen_attention", "glide_embedding"])
def test_caption_changes_the_output_in_both_styles(tiny, style):
    model = tiny.model(tiny.cfg(using_capt=True, **style))
    out = outputs(model, tiny, ["a red stop sign", "a blue shop front"])
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_imagen_style_adds_caption_keys_to_existing_self_attention_only(tiny):
    model = tiny.model(tiny.cfg(using_capt=True))
    names = [n for n, _ in model.named_modules() if n.endswith("capt_kv")]
    # one per self-attention layer: one encoder step at 8 px, the middle block, two decoder steps at 8 px
    assert len(names) == 4 and model.capt_emb_proj is None


def test_missing_and_empty_captions_become_the_placeholder_caption(tiny):
    model = tiny.model(tiny.cfg(using_capt=True, glide_style_capt_emb=True))
    out = outputs(model, tiny, [None, "", PLACEHOLDER_CAPTION, "a cat"])
    assert torch.allclose(out[0], out[2], atol=1e-6) and torch.allclose(out[1], out[2], atol=1e-6)
    assert (out[3] - out[2]).abs().max() > 1e-3


def test_empty_null_caption_removes_the_caption_contribution(tiny):
    model = tiny.model(tiny.cfg(using_capt=True, glide_style_capt_emb=True, capt_null="empty"))
    cond = model.prepare_cond(None, [None, "a cat"])
    assert cond["capt_keep"].tolist() == [False, True]
    out = outputs(model, tiny, [None, PLACEHOLDER_CAPTION, "a dog"])
    assert (out[0] - out[1]).abs().max() > 1e-3  # unlike the placeholder mode, null is not a caption


def test_frozen_caption_encoder_is_kept_out_of_the_optimizer(tiny):
    model = tiny.model(tiny.cfg(using_capt=True)).train()
    tower = list(model.capt_encoder.parameters())
    trainable = {id(p) for p in model.trainable_parameters()}
    assert tower and not any(id(p) in trainable for p in tower)
    assert not model.capt_encoder.tower.training  # stays in eval mode under model.train()
    x, t = tiny.inputs()
    model(x, t, **model.prepare_cond(None, ["a", "b"])).square().mean().backward()
    assert all(p.grad is None for p in tower)
    assert model.middle.layers[1].capt_kv.weight.grad.abs().sum() > 0


def test_unfrozen_caption_encoder_trains(tiny):
    model = tiny.model(tiny.cfg(using_capt=True, freeze_capt_encoder=False))
    assert sum(p.numel() for p in model.trainable_parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("prefix", ["text.", ""], ids=["custom_text_clip_layout", "clip_layout"])
def test_weights_load_from_a_local_file(tiny, tmp_path, prefix):
    torch.manual_seed(3)
    source = CaptionEncoder(tiny.cfg(using_capt=True))
    path = tmp_path / "clip.pt"
    state = {f"{prefix}{k}": v for k, v in source.tower.state_dict().items()}
    torch.save({**state, "visual.proj": torch.zeros(2), "logit_scale": torch.ones(())}, path)
    loaded = CaptionEncoder(tiny.cfg(using_capt=True, clip_weights_path=str(path)))
    assert torch.equal(loaded.tower.token_embedding.weight, source.tower.token_embedding.weight)


def test_missing_weight_file_says_how_to_give_a_local_path(tiny, tmp_path):
    with pytest.raises(ConfigError, match="model.clip_weights_path .*does not exist; point it at a local"):
        CaptionEncoder(tiny.cfg(using_capt=True, clip_weights_path=str(tmp_path / "nope.pt")))


def test_offline_pretrained_name_gives_a_clear_error_not_a_hub_trace(tiny, monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(ConfigError, match="cannot be reached.*model.clip_weights_path"):
        CaptionEncoder(tiny.cfg(using_capt=True, clipname="ViT-L-14-336", clip_pretrained="openai"))


def test_unknown_clip_name_suggests_close_ones(tiny):
    with pytest.raises(ConfigError, match="model.clipname 'ViT-L-14-33' .*did you mean.*ViT-L-14"):
        CaptionEncoder(tiny.cfg(using_capt=True, clipname="ViT-L-14-33"))


def test_local_config_with_a_pretrained_tag_is_refused(tiny):
    with pytest.raises(ConfigError, match="model.clip_pretrained is 'openai'.*clip_weights_path"):
        build_model(tiny.cfg(using_capt=True, clip_pretrained="openai"))


def test_learned_null_caption_is_trained_and_differs_from_the_placeholder(tiny):
    model = tiny.model(tiny.cfg(using_capt=True, glide_style_capt_emb=True, capt_null="learned"))
    out = outputs(model, tiny, [None, "", PLACEHOLDER_CAPTION])
    assert torch.allclose(out[0], out[1], atol=1e-6) and (out[0] - out[2]).abs().max() > 1e-3
    x, t = tiny.inputs()
    model(x, t, **model.prepare_cond(None, [None, "a cat"])).square().mean().backward()
    assert model.null_capt_token.grad.abs().sum() > 0 and model.null_capt_pooled.grad.abs().sum() > 0


@pytest.mark.parametrize("penultimate, block", [(True, -2), (False, -1)])
def test_the_caption_tokens_are_the_chosen_layer_raw_or_after_clips_final_layernorm(tiny, penultimate, block):
    """The penultimate layer comes out raw (the U-net's own LayerNorm follows); the last after CLIP's ln_final."""
    torch.manual_seed(0)
    encoder = CaptionEncoder(tiny.cfg(using_capt=True, clip_use_penultimate_layer=penultimate))
    ids = encoder.tokenize(["a red stop sign", "a blue shop front"])
    seen = []
    blocks = encoder.tower.transformer.resblocks
    assert len(blocks) >= 2  # the tiny tower has a penultimate layer to take
    norm = (lambda x: x) if penultimate else encoder.tower.ln_final
    handle = blocks[block].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        tokens, pooled = encoder(ids)
        expected = norm(seen[0])
        handle.remove()
        other_block = blocks[-1 if penultimate else -2]
        seen.clear()
        other_block.register_forward_hook(lambda module, args, out: seen.append(out))
        encoder(ids)
        other = norm(seen[-1])
    assert tokens.shape == (2, encoder.tower.context_length, encoder.width)
    assert torch.allclose(tokens, expected, atol=1e-6)  # exactly the chosen block's output
    assert (tokens - other).abs().max() > 1e-2  # and not the other block's
    assert pooled.shape == (2, encoder.embed_dim)


def test_penultimate_caption_tokens_get_a_new_trainable_layernorm_outside_the_frozen_tower(tiny):
    """The research code's capt_ln_final: LayerNorm(width) = 2 x width trainable parameters, weight 1, bias 0,
    not CLIP's ln_final (frozen, trained for the last layer)."""
    model = build_model(tiny.cfg(using_capt=True, clip_use_penultimate_layer=True))
    width = model.capt_encoder.width
    assert isinstance(model.capt_norm, torch.nn.LayerNorm) and model.capt_norm is not model.capt_encoder.tower.ln_final
    assert [p.requires_grad for p in model.capt_norm.parameters()] == [True, True]
    assert sum(p.numel() for p in model.capt_norm.parameters()) == 2 * width
    assert build_model(tiny.cfg(using_capt=True, clip_use_penultimate_layer=False)).capt_norm is None
    ids, keep = model.capt_encoder.tokenize(["a red stop sign"]), torch.tensor([True])
    with torch.no_grad():
        model.capt_norm.bias.fill_(0.5)
        tokens, _, _ = model._caption(ids, keep)
    assert torch.allclose(tokens.mean(-1), torch.full(tokens.shape[:2], 0.5), atol=1e-5)


def test_the_penultimate_layer_changes_the_tokens_but_not_the_pooled_embedding(tiny):
    encoders = []
    for penultimate in (True, False):
        torch.manual_seed(0)  # the same random weights in both
        encoders.append(CaptionEncoder(tiny.cfg(using_capt=True, clip_use_penultimate_layer=penultimate)))
    ids = encoders[0].tokenize(["a red stop sign"])
    with torch.no_grad():
        (tok_pen, pool_pen), (tok_last, pool_last) = encoders[0](ids), encoders[1](ids)
    assert torch.equal(pool_pen, pool_last)  # the pooled embedding always comes from the last layer
    assert (tok_pen - tok_last).abs().max() > 1e-2
