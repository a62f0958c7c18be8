"""The ADM U-net of textdiff and ``build_model``.

Path of one forward call: timestep (+ noise-conditioning step, + pooled caption) -> embedding stream;
transcription -> character encoder -> per-token features; caption -> frozen CLIP -> per-token activations;
image (+ upsampled low-res image) -> encoder levels -> middle -> decoder levels with skips -> eps (and the
variance interpolation with ``learn_sigma``).

Each U-net position is a :class:`Step`: a residual block (or a resampler), then optionally a text block
(:class:`TextCrossAttnBlock`) and a self-attention block that also attends to caption tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from textdiff.config import ModelConfig
from textdiff.models.blocks import AttentionBlock, Downsample, ResBlock, TimestepMLP, Upsample, zero_module
from textdiff.models.conv import Conv2d
from textdiff.models.cross_attn import AxialPositionTable, TextCrossAttnBlock
from textdiff.models.fused import GroupNormSiLU
from textdiff.models.linear import Linear
from textdiff.models.text_encoder import CharTokenizer, TextEncoder

# ITU-R BT.601 luma weights: the monochrome adapter starts as an RGB -> grey conversion
LUMA = (0.299, 0.587, 0.114)


@dataclass
class Context:
    """What every step may read besides the feature map (all batch-first)."""

    emb: torch.Tensor  # [N, E]
    txt: Optional[torch.Tensor] = None  # [N, L, txt_dim]
    txt_mask: Optional[torch.Tensor] = None  # [N, L] bool
    capt: Optional[torch.Tensor] = None  # [N, Lc, clip width]
    capt_mask: Optional[torch.Tensor] = None  # [N, Lc] bool
    pos: Optional[nn.ModuleDict] = None  # str(res) -> AxialPositionTable


class Step(nn.Module):
    """One U-net position: layers applied in order, each reading what it needs from the Context."""

    def __init__(self, *layers: nn.Module, res: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.res = res
        self.checkpoint = False  # recompute this position's activations in the backward pass

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._layers, h, ctx, use_reentrant=False)
        return self._layers(h, ctx)

    def _layers(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, ResBlock):
                h = layer(h, ctx.emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, ctx.capt, ctx.capt_mask)
            elif isinstance(layer, TextCrossAttnBlock):
                h = layer(h, ctx.emb, ctx.txt, ctx.txt_mask, ctx.pos[str(self.res)]())
            else:
                h = layer(h)
        return h


def _heads(channels: int, per_head: int, num_heads: int) -> int:
    return channels // per_head if per_head > 0 else num_heads


class TextdiffUNet(nn.Module):
    """U-net denoiser with transcription, caption, low-res and noise-level conditioning.

    ``prepare_cond`` turns strings into the tensors that ``forward`` takes as keyword arguments.
    """

    def __init__(self, cfg: ModelConfig, load_capt_weights: bool = True):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        nc, emb_dim = cfg.num_channels, 4 * cfg.num_channels
        self.image_channels = 1 if cfg.monochrome else cfg.in_channels
        out_mult = 2 if cfg.learn_sigma else 1
        self.time_embed = TimestepMLP(nc, emb_dim)
        self.noise_cond_embed = TimestepMLP(nc, emb_dim) if cfg.noise_cond else None

        self.tokenizer = self.text_encoder = self.pos_tables = self.txt_emb_proj = None
        if cfg.txt:
            self.tokenizer = CharTokenizer(cfg.max_seq_len, cfg.txt_vocab)
            self.text_encoder = TextEncoder(self.tokenizer.vocab_size, cfg.max_seq_len, cfg.txt_dim, cfg.txt_depth,
                                            cfg.txt_ff_mult, cfg.txt_ff_glu, cfg.txt_rezero, cfg.txt_t5,
                                            cfg.txt_timestep_emb,
                                            self.tokenizer.newline_id if cfg.txt_line_emb else None)
            widths = {cfg.feature_size // 2 ** i: nc * m for i, m in enumerate(cfg.channel_mult)}
            # Imagen/GLIDE-style global conditioning: the first token's encoding (START, which attends over the
            # string or over the null's MASK tokens) joins the timestep embedding, so every residual block sees it
            self.txt_emb_proj = (nn.Sequential(nn.LayerNorm(cfg.txt_dim), Linear(cfg.txt_dim, emb_dim))
                                 if cfg.txt_pooled_emb else None)
            self.pos_tables = nn.ModuleDict({str(r): AxialPositionTable(r, widths[r]) for r in cfg.txt_resolutions})
        self.capt_encoder = self.capt_emb_proj = self.null_capt_token = self.null_capt_pooled = None
        self.capt_norm = None
        capt_dim = 0
        if cfg.using_capt:
            from textdiff.models.caption import CaptionEncoder  # open_clip takes seconds to import; only when used

            self.capt_encoder = CaptionEncoder(cfg, load_weights=load_capt_weights)
            capt_dim = self.capt_encoder.width if cfg.glide_style_capt_attn else 0
            if capt_dim and cfg.clip_use_penultimate_layer:  # CLIP's ln_final was trained for the last layer
                self.capt_norm = nn.LayerNorm(capt_dim)
            if cfg.glide_style_capt_emb:
                self.capt_emb_proj = Linear(self.capt_encoder.embed_dim, emb_dim)
            if cfg.capt_null == "learned":
                self.null_capt_token = nn.Parameter(torch.randn(self.capt_encoder.width) * 0.02)
                self.null_capt_pooled = nn.Parameter(torch.randn(self.capt_encoder.embed_dim) * 0.02)

        self.rgb_in = self.rgb_out = None
        if cfg.monochrome_adapter:
            self.rgb_in = Conv2d(cfg.in_channels, 1, 1, bias=False)
            self.rgb_in.weight.data[:] = torch.tensor(LUMA[: cfg.in_channels])[None, :, None, None]
            self.rgb_out = Conv2d(out_mult, out_mult * cfg.in_channels, 1, bias=False)
            self.rgb_out.weight.data[:] = torch.eye(out_mult).repeat_interleave(cfg.in_channels, 0)[:, :, None, None]
        # space-to-depth stem: p x p pixel blocks become channels, so the first level runs at image_size / p
        in_ch = self.image_channels * (2 if cfg.low_res_size else 1) * cfg.stem_patch ** 2

        def text_block(ch: int, res: int, decoder: bool) -> list[nn.Module]:
            wanted = cfg.txt and res in cfg.txt_resolutions and (decoder or not cfg.txt_output_layers_only)
            return [TextCrossAttnBlock(ch, emb_dim, cfg)] if wanted else []

        def attn_block(ch: int, res: int, per_head: int) -> list[nn.Module]:
            wanted = res in cfg.attention_resolutions
            return [AttentionBlock(ch, _heads(ch, per_head, cfg.num_heads), capt_dim, cfg.num_groups)] if wanted else []

        def extras(ch: int, res: int, per_head: int, decoder: bool) -> list[nn.Module]:
            txt, attn = text_block(ch, res, decoder), attn_block(ch, res, per_head)
            return txt + attn if cfg.txt_attn_before_attn else attn + txt

        def res_block(ch: int, out: int, **kw) -> ResBlock:
            return ResBlock(ch, emb_dim, out, cfg.dropout, cfg.use_scale_shift_norm, silu_impl=cfg.silu_impl,
                            groups=cfg.num_groups, **kw)

        ch, res = nc * cfg.channel_mult[0], cfg.feature_size
        self.input_steps = nn.ModuleList([Step(Conv2d(in_ch, ch, 3, padding=1), res=res)])
        skips = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = nc * mult
                self.input_steps.append(Step(res_block(ch, out), *extras(out, res, cfg.channels_per_head, False),
                                             res=res))
                ch = out
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                down = res_block(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True)
                res //= 2
                self.input_steps.append(Step(down, res=res))
                skips.append(ch)
        self.middle = Step(res_block(ch, ch), AttentionBlock(ch, cfg.num_heads, capt_dim, cfg.num_groups),
                           res_block(ch, ch), res=res)
        up_per_head = cfg.channels_per_head if cfg.channels_per_head_upsample == -1 else cfg.channels_per_head_upsample
        self.output_steps = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out = nc * mult
                layers = [res_block(ch + skips.pop(), out), *extras(out, res, up_per_head, True)]
                ch = out
                if level and i == cfg.num_res_blocks:
                    layers.append(res_block(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True))
                self.output_steps.append(Step(*layers, res=res))
                if level and i == cfg.num_res_blocks:
                    res *= 2
        for step in [*self.input_steps, self.middle, *self.output_steps]:
            step.checkpoint = cfg.use_checkpoint or step.res <= cfg.use_checkpoint_below_res
        self.out_norm = GroupNormSiLU(ch, cfg.silu_impl, cfg.num_groups)
        self.out_conv = zero_module(Conv2d(ch, self.image_channels * out_mult * cfg.stem_patch ** 2, 3, padding=1))
        recompute_from = {"all": 0, "top": cfg.feature_size, "none": math.inf}[cfg.norm_recompute]
        for m in self.modules():
            if isinstance(m, GroupNormSiLU):
                m.recompute_from_width = recompute_from

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer should update (excludes a frozen caption encoder)."""
        return (p for p in self.parameters() if p.requires_grad)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare_cond(self, txt: Optional[Sequence[Optional[str]]], capt: Optional[Sequence[Optional[str]]],
                     low_res: Optional[torch.Tensor] = None,
                     noise_cond_t: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Strings (and upsampler inputs) -> the keyword tensors of ``forward``, batch first.

        txt: N transcriptions, ``None`` = null (dropped) transcription, ``""`` = no text. capt: N captions,
        ``None``/``""`` = null caption. For null conditions (guidance) pass ``[None] * N`` for both.
        low_res: [N, C, s, s] in [-1, 1] (upsamplers); noise_cond_t: [N] int steps (with ``noise_cond``).
        Returns txt_ids/txt_mask [N, max_seq_len], capt_ids [N, Lc] and capt_keep [N], low_res,
        noise_cond_t; only the keys this model uses.
        """
        cfg, device, cond = self.cfg, self._device(), {}
        if cfg.txt:
            if txt is None:
                raise ValueError("model.txt is true: prepare_cond needs txt (a list; None entries = null)")
            ids, mask = self.tokenizer.encode(list(txt))
            if cfg.txt_null == "empty":
                mask &= torch.tensor([t is not None for t in txt])[:, None]
            cond["txt_ids"], cond["txt_mask"] = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        if cfg.using_capt:
            if capt is None:
                raise ValueError("model.using_capt is true: prepare_cond needs capt (a list; None entries = null)")
            cond["capt_ids"] = self.capt_encoder.tokenize(list(capt)).to(device, non_blocking=True)
            cond["capt_keep"] = torch.tensor([bool(c) or cfg.capt_null == "placeholder" for c in capt]
                                             ).to(device, non_blocking=True)
        if cfg.low_res_size:
            if low_res is None:
                raise ValueError(f"model.low_res_size is {cfg.low_res_size}: prepare_cond needs low_res "
                                 f"[N, C, {cfg.low_res_size}, {cfg.low_res_size}]")
            cond["low_res"] = low_res.to(device, non_blocking=True)
        if cfg.noise_cond:
            if noise_cond_t is None:
                raise ValueError("model.noise_cond is true: prepare_cond needs noise_cond_t [N] (0 = clean low-res)")
            cond["noise_cond_t"] = torch.as_tensor(noise_cond_t).to(device, non_blocking=True).long().reshape(-1)
        return cond

    def _caption(self, capt_ids: torch.Tensor, keep: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLIP outputs with null captions (keep False) replaced as ``model.capt_null`` says.

        capt_ids [N, Lc], keep [N] bool -> tokens [N, Lc, width], key mask [N, Lc] bool, pooled [N, embed_dim].
        """
        tokens, pooled = self.capt_encoder(capt_ids)
        if self.capt_norm is not None:
            tokens = self.capt_norm(tokens.to(self.capt_norm.weight.dtype))
        mask, null = capt_ids != 0, ~keep[:, None]
        if self.null_capt_token is None:  # "empty" (with "placeholder" every caption is kept)
            return tokens, mask & ~null, pooled * keep[:, None].to(pooled.dtype)
        first = torch.arange(mask.shape[1], device=mask.device)[None] == 0
        tokens = torch.cat([torch.where(null, self.null_capt_token.to(tokens.dtype), tokens[:, 0])[:, None],
                            tokens[:, 1:]], dim=1)
        return tokens, torch.where(null, first, mask), torch.where(null, self.null_capt_pooled.to(pooled.dtype), pooled)

    def forward(self, x: torch.Tensor, t: torch.Tensor, txt_ids: Optional[torch.Tensor] = None,
                txt_mask: Optional[torch.Tensor] = None, capt_ids: Optional[torch.Tensor] = None,
                capt_keep: Optional[torch.Tensor] = None, low_res: Optional[torch.Tensor] = None,
                noise_cond_t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [N, C, H, W], t: [N] -> [N, C, H, W] (eps) or [N, 2C, H, W] with ``learn_sigma``.

        Keywords are those of ``prepare_cond``; ones this model does not use are ignored.
        """
        cfg = self.cfg
        emb = self.time_embed(t)
        if self.noise_cond_embed is not None:
            emb = emb + self.noise_cond_embed(noise_cond_t)
        ctx = Context(emb=emb, pos=self.pos_tables)
        if cfg.txt:
            ctx.txt, ctx.txt_mask = self.text_encoder(txt_ids, txt_mask, t), txt_mask
            if self.txt_emb_proj is not None:  # an "empty" null (no token kept) adds nothing
                first = ctx.txt[:, 0] * txt_mask[:, :1].to(ctx.txt.dtype)
                ctx.emb = ctx.emb + self.txt_emb_proj(first).to(ctx.emb.dtype)
        if cfg.using_capt:
            tokens, mask, pooled = self._caption(capt_ids, capt_keep.bool())
            if cfg.glide_style_capt_attn:
                ctx.capt, ctx.capt_mask = tokens, mask
            if self.capt_emb_proj is not None:
                ctx.emb = ctx.emb + self.capt_emb_proj(pooled.to(emb.dtype))
        # inputs arrive in float32; a model cast to fp16/bf16 (DeepSpeed) computes in its own dtype
        h = x.to(emb.dtype) if self.rgb_in is None else self.rgb_in(x.to(emb.dtype))
        if cfg.low_res_size:
            lr = low_res.to(emb.dtype) if self.rgb_in is None else self.rgb_in(low_res.to(emb.dtype))
            h = torch.cat([h, F.interpolate(lr, size=h.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
        if cfg.stem_patch > 1:
            h = F.pixel_unshuffle(h, cfg.stem_patch)
        skips = []
        for step in self.input_steps:
            h = step(h, ctx)
            skips.append(h)
        h = self.middle(h, ctx)
        for step in self.output_steps:
            h = step(torch.cat([h, skips.pop()], dim=1), ctx)
        out = self.out_conv(self.out_norm(h))
        if cfg.stem_patch > 1:
            out = F.pixel_shuffle(out, cfg.stem_patch)
        return out if self.rgb_out is None else self.rgb_out(out)


def build_model(cfg: ModelConfig, load_capt_weights: bool = True) -> TextdiffUNet:
    """The U-net for ``cfg`` (the ``model`` section). ``load_capt_weights=False`` keeps a caption encoder's
    random initialisation (parameter counts, tests); a ``clip_weights_path`` is still read."""
    return TextdiffUNet(cfg, load_capt_weights)
