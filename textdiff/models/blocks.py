"""The ADM U-net's building blocks: timestep embedding, residual blocks, resampling, self-attention.

Self-attention can also attend to caption token activations (Imagen style): the caption tokens are projected
to extra keys and values that are appended to the image's own, so no new attention layer is added.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from textdiff.models.conv import Conv2d, conv2d
from textdiff.models.fused import GroupNormSiLU
from textdiff.models.linear import Linear, linear


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: t [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so its residual branch starts as the identity; returns the module."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepMLP(nn.Sequential):
    """Sinusoid of width ``dim`` -> the U-net's embedding stream [N, emb_dim] (Linear, SiLU, Linear)."""

    def __init__(self, dim: int, emb_dim: int):
        super().__init__(Linear(dim, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: [N] -> [N, emb_dim], in the weights' dtype
        return super().forward(timestep_embedding(t, self.dim).to(self[0].weight.dtype))


class Downsample(nn.Module):
    """Halve H and W: strided 3x3 conv, or average pooling when ``use_conv`` is False (keeps channels)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


def upsample_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3 conv with padding 1, computed
    without the upsampled map: each of the four output phases (row, column parity) sees only 2x2 input
    pixels, so it is a 2x2 conv of x with the 3x3 taps that land on the same pixel summed, and the phases
    are interleaved with pixel_shuffle. 16 instead of 36 multiply-adds per input pixel and channel pair,
    forward and backward. x: [N, C, H, W] -> [N, C_out, 2H, 2W]."""
    w, (h, wd) = conv.weight, x.shape[-2:]
    # tap rows (cols) of the 3x3 kernel seen by an even / odd output row: even -> input rows i-1, i with
    # taps 0 and 1+2; odd -> rows i, i+1 with taps 0+1 and 2
    rows = [torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2)]
    padded = F.pad(x, (1, 1, 1, 1))
    phases = []
    for a in (0, 1):
        for b in (0, 1):
            r = rows[a]  # [Co, Ci, 2, 3]
            k = (torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1) if b == 0
                 else torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))
            phases.append(conv2d(padded[:, :, a:a + h + 1, b:b + wd + 1], k, conv.bias))
    out = torch.stack(phases, 2)  # [N, Co, 4, H, W], phase index 2a + b
    return F.pixel_shuffle(out.flatten(1, 2), 2)


class Upsample(nn.Module):
    """Double H and W with nearest-neighbour upsampling, then a 3x3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.conv, nn.Conv2d):
            return upsample_conv3x3(x, self.conv)
        return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlock(nn.Module):
    """ADM residual block conditioned on the embedding stream, optionally resampling (``up``/``down``).

    forward(x [N, C, H, W], emb [N, E]) -> [N, C_out, H', W'] with H' = 2H (up), H/2 (down) or H.
    With ``use_scale_shift_norm`` the embedding modulates the second norm (h * (1 + scale) + shift);
    otherwise it is added to the features.
    """

    def __init__(self, channels: int, emb_dim: int, out_channels: int, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, up: bool = False, down: bool = False,
                 silu_impl: str = "torch", groups: int = 32):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = GroupNormSiLU(channels, silu_impl, groups)
        self.in_conv = Conv2d(channels, out_channels, 3, padding=1)
        if up:
            self.h_resample, self.x_resample = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_resample, self.x_resample = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_resample = self.x_resample = nn.Identity()
        self.emb_proj = nn.Sequential(nn.SiLU(), Linear(emb_dim, 2 * out_channels if use_scale_shift_norm
                                                         else out_channels))
        self.out_norm = GroupNormSiLU(out_channels, silu_impl, groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(self.h_resample, Upsample):  # upsample + conv as one sub-pixel conv, 2.25x fewer FLOPs
            h = upsample_conv3x3(self.in_norm(x), self.in_conv)
        else:
            h = self.in_conv(self.h_resample(self.in_norm(x)))
        e = self.emb_proj(emb)[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h, scale, shift)
        else:
            h = self.out_norm(h + e)
        return self.skip(self.x_resample(x)) + self.out_conv(self.dropout(h))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              key_mask: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention over channel-last tokens.

    q: [N, Lq, D], k, v: [N, Lk, D] (D divisible by ``heads``); key_mask: [N, Lk] bool (True = attend) or
    None; bias: [heads, Lq, Lk] additive or None. Returns [N, Lq, D]. A query whose keys are all masked
    gets zeros (an "empty" condition adds nothing) instead of NaN.
    """
    n, lq, d = q.shape
    split = lambda x: x.reshape(n, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype).unsqueeze(0).expand(n, -1, -1, -1)
    if key_mask is not None:
        # rows with no key attend everywhere (then get zeroed below), so no NaN enters the backward pass
        keep = (key_mask | ~key_mask.any(dim=1, keepdim=True))[:, None, None, :]
        additive = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        mask = additive if mask is None else mask + additive
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    out = out.transpose(1, 2).reshape(n, lq, d)
    if key_mask is not None:
        out = out.masked_fill(~key_mask.any(dim=1)[:, None, None], 0.0)
    return out


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map, plus optional caption keys/values.

    forward(x [N, C, H, W], capt_tokens [N, Lc, Dc] or None, capt_mask [N, Lc] bool or None) -> x's shape.
    """

    def __init__(self, channels: int, heads: int, capt_dim: int = 0, groups: int = 32):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.capt_kv = Linear(capt_dim, 2 * channels) if capt_dim else None
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, capt_tokens: Optional[torch.Tensor] = None,
                capt_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, c, hh, ww = x.shape
        # the 1x1 Conv1d's weights applied as a linear map over channel-last tokens: q, k and v come out
        # [N, HW, C] with a contiguous last dimension, which scaled_dot_product_attention's fused kernels
        # need (a transposed Conv1d output sends it to the math path, which keeps the attention matrix)
        tokens = self.norm(x).reshape(n, c, -1).transpose(1, 2)
        q, k, v = linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias).chunk(3, dim=-1)
        key_mask = None
        if self.capt_kv is not None and capt_tokens is not None:
            ck, cv = self.capt_kv(capt_tokens.to(q.dtype)).chunk(2, dim=-1)
            k, v = torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
            own = torch.ones(n, hh * ww, dtype=torch.bool, device=x.device)
            key_mask = torch.cat([own, capt_mask], dim=1)
        h = attention(q, k, v, self.heads, key_mask)
        out = linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)  # [N, HW, C]
        return x + out.transpose(1, 2).reshape(n, c, hh, ww)
