"""Transcription conditioning, second half: the image attends over the encoded transcription.

A :class:`TextCrossAttnBlock` sits after a U-net block at each of ``txt_resolutions``. Image queries attend
only over the text tokens (not over image + text). Image positions are told where they are by a learned
axial position table (one per resolution, shared by the blocks there), which enters through the adaptive
norm's scale and shift rather than being added to the features. With ``weave_attn`` the block first lets
the text tokens attend over the image and runs a transformer MLP on the text stream ("weave attention");
the image then attends over those updated text features, which this block alone uses.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from textdiff.config import ModelConfig
from textdiff.models.blocks import attention
from textdiff.models.linear import Linear
from textdiff.models.text_encoder import FeedForward


class AxialPositionTable(nn.Module):
    """Learned row and column tables summed into a [1, 2C, res, res] map (C scales and C shifts).

    Both start N(0, 1), as the research code's AxialPositionalEmbedding does.
    """

    def __init__(self, res: int, channels: int):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(2 * channels, res, 1))
        self.cols = nn.Parameter(torch.randn(2 * channels, 1, res))

    def forward(self) -> torch.Tensor:
        return (self.rows + self.cols).unsqueeze(0)


class AdaptiveNorm(nn.Module):
    """Normalise an image feature map, then h * (1 + scale) + shift with (scale, shift) from the position
    table plus, when ``emb_dim`` > 0, a projection of the timestep embedding.

    forward(x [N, C, H, W], pos [1, 2C, H, W], emb [N, E] or None) -> [N, C, H, W].
    The norm is GroupNorm(1) over the whole map with a per-channel affine (the research code's AdaGN);
    ``layer_norm`` normalises each position over channels instead (with the same affine); no ``do_norm``: none.
    """

    def __init__(self, channels: int, emb_dim: int, do_norm: bool, layer_norm: bool):
        super().__init__()
        self.layer_norm = layer_norm
        self.norm = ((nn.LayerNorm(channels) if layer_norm else nn.GroupNorm(1, channels)) if do_norm
                     else None)
        self.emb_proj = nn.Sequential(nn.SiLU(), Linear(emb_dim, 2 * channels)) if emb_dim else None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        if self.norm is not None and self.layer_norm:
            x = self.norm(x.transpose(1, -1)).transpose(1, -1)
        elif self.norm is not None:
            x = self.norm(x)
        mod = pos.to(x.dtype)
        if self.emb_proj is not None:
            mod = mod + self.emb_proj(emb)[:, :, None, None].to(x.dtype)
        scale, shift = mod.chunk(2, dim=1)
        return x * (1 + scale) + shift


class BranchGain(nn.Module):
    """Scales a residual branch by the research code's effective gain, with s = ``cross_attn_gain_scale``:
    s * g with layerscale (g per channel, starting at 1e-5) or rezero (g scalar, starting at 0), else
    exp(s * g) with g starting at log(init_gain) / s, so the branch starts scaled by ``cross_attn_init_gain``."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.scale, self.exp = cfg.cross_attn_gain_scale, False
        if cfg.cross_attn_use_layerscale:
            self.gain = nn.Parameter(torch.full((dim,), 1e-5))
        elif cfg.cross_attn_rezero:
            self.gain = nn.Parameter(torch.zeros(1))
        else:
            self.exp = True
            # shape [1], not 0-dim: DeepSpeed cannot broadcast 0-dim parameters
            self.gain = nn.Parameter(torch.full((1,), math.log(cfg.cross_attn_init_gain) / cfg.cross_attn_gain_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        g = self.scale * self.gain
        return x * (g.exp() if self.exp else g).to(x.dtype)


def _project(in_dim: int, out_dim: int, orth: bool) -> Linear:
    layer = Linear(in_dim, out_dim, bias=False)
    if orth and not layer.weight.is_meta:
        nn.init.orthogonal_(layer.weight)
    return layer


def _tokens(x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, H*W, C]
    return x.flatten(2).transpose(1, 2)


class TextToImage(nn.Module):
    """Image queries over text keys/values: forward(h [N, C, H, W], txt [N, L, T], txt_mask [N, L],
    pos [1, 2C, H, W], emb [N, E]) -> h + gain * attention, [N, C, H, W]."""

    def __init__(self, channels: int, txt_dim: int, qkv_dim: int, heads: int, emb_dim: int, cfg: ModelConfig):
        super().__init__()
        self.heads = heads
        prenorm = not cfg.cross_attn_rezero or cfg.cross_attn_rezero_keeps_prenorm
        self.img_norm = AdaptiveNorm(channels, emb_dim if cfg.cross_attn_q_t_emb else 0, prenorm,
                                     cfg.txt_avoid_groupnorm)
        self.txt_norm = nn.LayerNorm(txt_dim) if prenorm else nn.Identity()
        orth = cfg.cross_attn_orth_init
        self.q, self.k, self.v = (_project(channels, qkv_dim, orth), _project(txt_dim, qkv_dim, orth),
                                  _project(txt_dim, qkv_dim, orth))
        self.out = _project(qkv_dim, channels, orth)
        self.gain = BranchGain(channels, cfg)

    def forward(self, h: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor, pos: torch.Tensor,
                emb: torch.Tensor) -> torch.Tensor:
        q = self.q(_tokens(self.img_norm(h, pos, emb)))
        t = self.txt_norm(txt).to(q.dtype)
        out = self.gain(self.out(attention(q, self.k(t), self.v(t), self.heads, txt_mask)))
        return h + out.transpose(1, 2).reshape(h.shape)


class ImageToText(nn.Module):
    """Weave step: text queries over image keys/values, then an MLP on the text stream.

    forward(txt [N, L, T], txt_mask [N, L], h [N, C, H, W], pos, emb) -> updated txt [N, L, T].
    """

    def __init__(self, channels: int, txt_dim: int, qkv_dim: int, heads: int, emb_dim: int, cfg: ModelConfig):
        super().__init__()
        self.heads = heads
        self.txt_norm = nn.LayerNorm(txt_dim)
        self.img_norm = AdaptiveNorm(channels, emb_dim, True, cfg.txt_avoid_groupnorm)
        orth = cfg.cross_attn_orth_init
        self.q, self.k, self.v = (_project(txt_dim, qkv_dim, orth), _project(channels, qkv_dim, orth),
                                  _project(channels, qkv_dim, orth))
        self.out = _project(qkv_dim, txt_dim, orth)
        self.gain = BranchGain(txt_dim, cfg)
        self.ff = FeedForward(txt_dim, cfg.weave_ff_mult, cfg.weave_ff_glu)
        self.ff_norm = nn.Identity() if cfg.weave_ff_rezero else nn.LayerNorm(txt_dim)
        # weave_ff_rezero: the MLP starts switched off (a zero-init scalar, x-transformers' Rezero); weave_use_ff_gain:
        # a second gain of the attention branch's kind (exp(gain_scale * g), starting at cross_attn_init_gain)
        self.ff_rezero = nn.Parameter(torch.zeros(1)) if cfg.weave_ff_rezero else None
        self.ff_gain = BranchGain(txt_dim, cfg) if cfg.weave_use_ff_gain else None

    def forward(self, txt: torch.Tensor, txt_mask: torch.Tensor, h: torch.Tensor, pos: torch.Tensor,
                emb: torch.Tensor) -> torch.Tensor:
        img = _tokens(self.img_norm(h, pos, emb))
        q = self.q(self.txt_norm(txt).to(img.dtype))
        txt = txt + self.gain(self.out(attention(q, self.k(img), self.v(img), self.heads))).to(txt.dtype)
        f = self.ff(self.ff_norm(txt))
        if self.ff_rezero is not None:
            f = f * self.ff_rezero.to(f.dtype)
        return txt + (f if self.ff_gain is None else self.ff_gain(f))


def cross_attn_widths(channels: int, cfg: ModelConfig) -> tuple[int, int]:
    """(image-to-text width, text-to-image width) of the attention at a level of ``channels`` image channels.

    Text-to-image attention is ``txt_dim`` wide (the research code sizes it by its keys, the text). The weave's
    image-to-text attention is sized by its keys too, the image's ``channels``, unless
    ``weave_qkv_dim_always_text`` makes it ``txt_dim`` as well.
    """
    return (cfg.txt_dim if cfg.weave_qkv_dim_always_text else channels), cfg.txt_dim


class TextCrossAttnBlock(nn.Module):
    """Weave (optional) then text-to-image attention at one U-net position.

    forward(h [N, C, H, W], emb [N, E], txt [N, L, T], txt_mask [N, L], pos [1, 2C, H, W]) -> [N, C, H, W].
    """

    def __init__(self, channels: int, emb_dim: int, cfg: ModelConfig):
        super().__init__()
        heads, (weave_dim, cross_dim) = cfg.text_attn_heads, cross_attn_widths(channels, cfg)
        self.weave = ImageToText(channels, cfg.txt_dim, weave_dim, heads, emb_dim, cfg) if cfg.weave_attn else None
        self.cross = TextToImage(channels, cfg.txt_dim, cross_dim, heads, emb_dim, cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:
        if self.weave is not None:
            txt = self.weave(txt, txt_mask, h, pos, emb)
        return self.cross(h, txt, txt_mask, pos, emb)
