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
import torch.nn.functional as F
from torch import nn

from textdiff.config import ModelConfig
from textdiff.models.blocks import attention
from textdiff.models.text_encoder import FeedForward


class AxialPositionTable(nn.Module):
    """Learned row and column tables summed into a [1, 2C, res, res] map (C scales and C shifts)."""

    def __init__(self, res: int, channels: int):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(2 * channels, res, 1) * 0.02)
        self.cols = nn.Parameter(torch.randn(2 * channels, 1, res) * 0.02)

    def forward(self) -> torch.Tensor:
        return (self.rows + self.cols).unsqueeze(0)


class AdaptiveNorm(nn.Module):
    """Normalise an image feature map, then h * (1 + scale) + shift with (scale, shift) from the position
    table plus, when ``emb_dim`` > 0, a projection of the timestep embedding.

    forward(x [N, C, H, W], pos [1, 2C, H, W], emb [N, E] or None) -> [N, C, H, W].
    ``layer_norm`` normalises each position over channels instead of GroupNorm(1) over the whole map.
    """

    def __init__(self, channels: int, emb_dim: int, do_norm: bool, layer_norm: bool):
        super().__init__()
        self.do_norm, self.layer_norm = do_norm, layer_norm
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * channels)) if emb_dim else None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, emb: Optional[torch.Tensor]) -> torch.Tensor:
        if self.do_norm and self.layer_norm:
            x = F.layer_norm(x.transpose(1, -1), x.shape[1:2]).transpose(1, -1)
        elif self.do_norm:
            x = F.group_norm(x, 1)
        mod = pos.to(x.dtype)
        if self.emb_proj is not None:
            mod = mod + self.emb_proj(emb)[:, :, None, None].to(x.dtype)
        scale, shift = mod.chunk(2, dim=1)
        return x * (1 + scale) + shift


class BranchGain(nn.Module):
    """Scales a residual branch: layerscale (per channel, 1e-5), rezero (scalar, 0), or
    exp(gain_scale * g) with g initialised to log(init_gain) / gain_scale."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.exp_scale = None
        if cfg.cross_attn_use_layerscale:
            self.gain = nn.Parameter(torch.full((dim,), 1e-5))
        elif cfg.cross_attn_rezero:
            self.gain = nn.Parameter(torch.zeros(1))
        else:
            self.exp_scale = cfg.cross_attn_gain_scale
            # shape [1], not 0-dim: DeepSpeed cannot broadcast 0-dim parameters
            self.gain = nn.Parameter(torch.full((1,), math.log(cfg.cross_attn_init_gain) / cfg.cross_attn_gain_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        g = self.gain if self.exp_scale is None else torch.exp(self.exp_scale * self.gain)
        return x * g.to(x.dtype)


def _project(in_dim: int, out_dim: int, orth: bool) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=False)
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
        # rezero: the MLP starts switched off; ff gain: a learned log-gain starting at 1; else no gain
        self.ff_gain = (nn.Parameter(torch.zeros(1)) if cfg.weave_ff_rezero
                        else nn.Parameter(torch.zeros(1)) if cfg.weave_use_ff_gain else None)
        self.ff_gain_is_log = not cfg.weave_ff_rezero and cfg.weave_use_ff_gain

    def forward(self, txt: torch.Tensor, txt_mask: torch.Tensor, h: torch.Tensor, pos: torch.Tensor,
                emb: torch.Tensor) -> torch.Tensor:
        img = _tokens(self.img_norm(h, pos, emb))
        q = self.q(self.txt_norm(txt).to(img.dtype))
        txt = txt + self.gain(self.out(attention(q, self.k(img), self.v(img), self.heads))).to(txt.dtype)
        f = self.ff(self.ff_norm(txt))
        if self.ff_gain is not None:
            f = f * (self.ff_gain.exp() if self.ff_gain_is_log else self.ff_gain)
        return txt + f


def cross_attn_heads(channels: int, cfg: ModelConfig) -> tuple[int, int]:
    """(attention width, heads) of the text blocks at a level of ``channels`` image channels."""
    per_head = cfg.channels_per_head if cfg.cross_attn_channels_per_head == -1 else cfg.cross_attn_channels_per_head
    qkv_dim = cfg.txt_dim if (cfg.weave_attn and cfg.weave_qkv_dim_always_text) else channels
    return qkv_dim, max(1, qkv_dim // per_head)


class TextCrossAttnBlock(nn.Module):
    """Weave (optional) then text-to-image attention at one U-net position.

    forward(h [N, C, H, W], emb [N, E], txt [N, L, T], txt_mask [N, L], pos [1, 2C, H, W]) -> [N, C, H, W].
    """

    def __init__(self, channels: int, emb_dim: int, cfg: ModelConfig):
        super().__init__()
        qkv_dim, heads = cross_attn_heads(channels, cfg)
        self.weave = ImageToText(channels, cfg.txt_dim, qkv_dim, heads, emb_dim, cfg) if cfg.weave_attn else None
        self.cross = TextToImage(channels, cfg.txt_dim, qkv_dim, heads, emb_dim, cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                pos: torch.Tensor) -> torch.Tensor:
        if self.weave is not None:
            txt = self.weave(txt, txt_mask, h, pos, emb)
        return self.cross(h, txt, txt_mask, pos, emb)
