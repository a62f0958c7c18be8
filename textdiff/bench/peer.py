"""textdiff's U-net next to diffusers' ``UNet2DConditionModel`` of the same size, one training step each.

Both steps are the same plain PyTorch loop (forward, MSE against a fixed target, backward, AdamW), on the
same batch, in one process, timed in A-B-B-A rounds (:func:`textdiff.bench.train.step_seconds`). textdiff
reads its transcription through its own character encoder (part of its trainable size); diffusers' U-net
cross-attends to a random text sequence of the same length and width. diffusers is a benchmark peer only
(the ``bench`` extra): it is imported here, inside :func:`peer_unet`, and nowhere else in textdiff.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from textdiff.bench.train import (matmul_flops_per_s, page_faults, peak_step_bytes, step_flops, step_seconds,
                                  synthetic_batch, training_step)
from textdiff.config import ModelConfig, TextdiffConfig
from textdiff.models import build_model
from textdiff.models.conv import Conv2d, emulates_bf16
from textdiff.models.linear import Linear


def textdiff_heads(cfg: ModelConfig) -> dict:
    """The attention heads textdiff's U-net runs: per level (its width over ``channels_per_head``, or
    ``num_heads`` without one), in the middle block (``num_heads``), and their widths."""
    widths = [cfg.num_channels * m for m in cfg.channel_mult]
    per_level = [w // cfg.channels_per_head if cfg.channels_per_head > 0 else cfg.num_heads for w in widths]
    return {"heads": per_level, "head_width": [w // h for w, h in zip(widths, per_level)],
            "middle_heads": cfg.num_heads, "middle_head_width": widths[-1] // cfg.num_heads}


def peer_unet(cfg: ModelConfig) -> nn.Module:
    """diffusers' UNet2DConditionModel shaped like ``cfg``: the same widths per level, residual blocks per
    level, output channels, and cross-attention (to ``txt_dim``-wide tokens) at every level whose resolution
    has attention or text, with textdiff's heads head for head (:func:`textdiff_heads`). In this class
    ``attention_head_dim`` is, for historical reasons, the number of heads (diffusers' unet_2d_condition.py:
    ``num_attention_heads = num_attention_heads or attention_head_dim``, its issue #2011; setting
    ``num_attention_heads`` itself raises a ValueError), so it gets the per-level head counts; the middle block
    takes the last level's. Its trainable size lands within 10% of textdiff's."""
    from diffusers import UNet2DConditionModel  # deferred: the optional `bench` extra, a benchmark peer only

    res = [cfg.feature_size // 2 ** i for i in range(len(cfg.channel_mult))]
    attends = [r in cfg.attention_resolutions or r in cfg.txt_resolutions for r in res]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels,
        out_channels=cfg.in_channels * (2 if cfg.learn_sigma else 1),
        block_out_channels=tuple(cfg.num_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
        cross_attention_dim=cfg.txt_dim, attention_head_dim=tuple(textdiff_heads(cfg)["heads"]),
        norm_num_groups=cfg.num_groups)


def peer_heads(peer: nn.Module) -> dict:
    """The heads the peer's attention layers run, read from the built modules: per level (its first
    attention layer's; None for a level without one), in the middle block, and their widths."""
    def first_attention(block: nn.Module):
        return next((m for name, m in block.named_modules() if name.endswith("attn1")), None)

    levels = [first_attention(b) for b in peer.down_blocks]
    middle = first_attention(peer.mid_block)
    return {"heads": [a.heads if a is not None else None for a in levels],
            "head_width": [a.inner_dim // a.heads if a is not None else None for a in levels],
            "middle_heads": middle.heads, "middle_head_width": middle.inner_dim // middle.heads}


def with_textdiff_kernels(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Conv2d`` and ``nn.Linear`` modules run textdiff's
    :class:`~textdiff.models.conv.Conv2d` and :class:`~textdiff.models.linear.Linear` forwards (the same
    weights): the peer on textdiff's bf16 convolution and matrix-product route, to separate what those
    kernels buy from what the rest of the step does."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = Conv2d
        elif type(m) is nn.Linear:
            m.__class__ = Linear
    return out


def trainable_size(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peer_bench(cfg: TextdiffConfig, dtype: torch.dtype, steps: int = 6, warmup: int = 2, compile: bool = False,
               device: torch.device = torch.device("cpu"), seed: int = 0) -> dict:
    """Images/s of textdiff's and diffusers' training step at ``cfg``'s model and micro-batch, their
    ratio (textdiff over diffusers: > 1 means textdiff is faster), each step's peak memory, page faults
    (after the timed rounds), FLOPs, and MFU (FLOPs per second over the measured matmul rate in ``dtype``
    on ``device``).

    Where textdiff computes bf16 through the fp32 kernels (bf16 on a CPU without bf16 kernels,
    :mod:`textdiff.models.conv`, :mod:`textdiff.models.linear`), the peer is also timed with its convolutions
    and linear layers on that route, in the same rounds: ``img_s_peer_same_kernels`` and
    ``ratio_same_kernels``, textdiff over that."""
    torch.manual_seed(seed)
    n = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 8))
    batch = synthetic_batch(cfg, n, torch.Generator().manual_seed(seed))
    mine = build_model(cfg.model, load_capt_weights=False).to(device).train()
    peer = peer_unet(cfg.model).to(device).train()
    x = batch["image"].to(device)
    t = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    cond = mine.prepare_cond(batch["txt"], batch["capt"])
    txt = torch.randn(n, cfg.model.max_seq_len, cfg.model.txt_dim, generator=torch.Generator().manual_seed(seed))
    txt = txt.to(device)
    target = torch.randn(n, cfg.model.in_channels * (2 if cfg.model.learn_sigma else 1), *x.shape[2:],
                         generator=torch.Generator().manual_seed(seed + 1)).to(device)
    run_mine, run_peer = (torch.compile(mine), torch.compile(peer)) if compile else (mine, peer)
    mine_step = training_step(mine, lambda: run_mine(x, t, **cond), target, dtype, device)
    peer_step = training_step(peer, lambda: run_peer(x, t, encoder_hidden_states=txt).sample, target, dtype, device)
    timed = {"textdiff": mine_step, "peer": peer_step}
    same_kernels = emulates_bf16(x.to(dtype))
    if same_kernels:
        peer2 = with_textdiff_kernels(peer)
        run_peer2 = torch.compile(peer2) if compile else peer2
        timed["peer_same_kernels"] = training_step(peer2, lambda: run_peer2(x, t, encoder_hidden_states=txt).sample,
                                                   target, dtype, device)
    seconds = step_seconds(timed, steps, warmup, device)
    both = (("textdiff", mine_step), ("peer", peer_step))
    faults = {name: page_faults(step) for name, step in both}
    peak = {name: peak_step_bytes(step, device) for name, step in both}
    flops = {name: step_flops(step) for name, step in both}
    rate = matmul_flops_per_s(dtype, device)
    heads = {f"{k}_textdiff": v for k, v in textdiff_heads(cfg.model).items()}
    heads.update({f"{k}_peer": v for k, v in peer_heads(peer).items()})
    return {"dtype": str(dtype).removeprefix("torch."), "compile": compile, "device": str(device), "batch": n,
            **heads,
            "image_size": cfg.model.image_size, "params_textdiff": trainable_size(mine),
            "params_peer": trainable_size(peer), "img_s_textdiff": n / seconds["textdiff"],
            "img_s_peer": n / seconds["peer"], "ratio": seconds["peer"] / seconds["textdiff"],
            "peak_mb_textdiff": peak["textdiff"] / 2 ** 20, "peak_mb_peer": peak["peer"] / 2 ** 20,
            "faults_textdiff": faults["textdiff"], "faults_peer": faults["peer"],
            "gflop_textdiff": flops["textdiff"] / 1e9, "gflop_peer": flops["peer"] / 1e9,
            "matmul_gflop_s": rate / 1e9, "mfu_textdiff": flops["textdiff"] / seconds["textdiff"] / rate,
            "mfu_peer": flops["peer"] / seconds["peer"] / rate,
            **({"img_s_peer_same_kernels": n / seconds["peer_same_kernels"],
                "ratio_same_kernels": seconds["peer_same_kernels"] / seconds["textdiff"]} if same_kernels else {})}
