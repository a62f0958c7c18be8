"""Tiny model configs shared by the model tests (CPU, a few hundred thousand parameters)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from textdiff.config import ModelConfig
from textdiff.models import build_model

from ..conftest import TINY_CLIP, tiny_model_cfg

def tiny_cfg(**overrides) -> ModelConfig:
    """The tiny model (tests/conftest.py) without a learned variance; with ``txt``, a one-layer transcription
    encoder read at both levels; with ``using_capt``, the tiny CLIP tower."""
    extra = dict(learn_sigma=False)
    if overrides.get("txt"):
        extra.update(txt_dim=32, txt_depth=1, max_seq_len=12, txt_resolutions=(8, 16), cross_attn_channels_per_head=16)
    if overrides.get("using_capt"):
        extra.update(clipname=TINY_CLIP, clip_pretrained="")
    return tiny_model_cfg(**{**extra, **overrides})


def perturbed(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """build_model(cfg) with every zero-initialised parameter made small and random, so that every branch
    (residual outputs, attention projections, rezero gains) already affects the output, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.1)
    return model.eval()


def inputs(n: int = 2, channels: int = 3, size: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, channels, size, size] and t [n] drawn from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)


def bf16_route_errors(emulated, plain, x, w, b, gy) -> list[dict[str, float]]:
    """For y, x's, w's and b's gradients in turn: the largest error of the fp32-kernel route ``emulated(x, w,
    b)`` and of PyTorch's own bf16 kernel ``plain(x, w, b)``, both on bf16 operands, against ``plain`` in
    fp64 on the same bf16-rounded values, as a fraction of the largest exact value."""
    results = {}
    for name, fn in (("emulated", emulated), ("bf16", plain)):
        xs, ws, bs = (t.to(torch.bfloat16).requires_grad_() for t in (x, w, b))
        y = fn(xs, ws, bs)
        y.backward(gy.to(torch.bfloat16))
        results[name] = [y.detach(), xs.grad, ws.grad, bs.grad]
    xd, wd, bd = (t.to(torch.bfloat16).double().requires_grad_() for t in (x, w, b))
    ref = plain(xd, wd, bd)
    ref.backward(gy.to(torch.bfloat16).double())
    return [{k: float((v[i].double() - exact).abs().max() / exact.abs().max()) for k, v in results.items()}
            for i, exact in enumerate((ref.detach(), xd.grad, wd.grad, bd.grad))]


@pytest.fixture
def tiny():
    """The helpers above: tiny.cfg(**overrides), tiny.model(cfg), tiny.inputs(...), tiny.clip (config path)."""
    return SimpleNamespace(cfg=tiny_cfg, model=perturbed, inputs=inputs, clip=TINY_CLIP)
