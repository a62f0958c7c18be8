"""GroupNorm (+ optional scale-shift) + SiLU, the normalisation that opens every ADM residual branch.

``silu_impl="torch"`` runs the three ops one after another. ``silu_impl="fused"`` runs the same function
through ``torch.compile`` (Inductor emits one Triton kernel for the normalise, modulate and activate steps,
so the activations are read from memory once instead of three times) on CUDA; on CPU, where compiling
costs ~30 s per shape for no training benefit, it falls back to the reference path.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def group_norm_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                              eps: float = 1e-5, scale: Optional[torch.Tensor] = None,
                              shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SiLU(GroupNorm(x) * (1 + scale) + shift), computed in x's dtype.

    x: [N, C, ...]; weight, bias: [C]; scale, shift: broadcastable to x (e.g. [N, C, 1, 1]) or None.
    Returns a tensor of x's shape and dtype. The group statistics are accumulated in float32 by the
    group_norm kernels for 16-bit inputs, so nothing is cast to float32 and back (under bf16 that was two
    full copies of every activation per norm, and float32 activations kept for the backward pass);
    autocast is off inside, so CUDA's float32 policy for group_norm does not upcast it either.
    """
    # (devices without autocast, like the meta device of the model summary and the sync tests, skip it)
    off = (torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type)
           else contextlib.nullcontext())
    with off:
        h = F.group_norm(x, groups, weight.to(x.dtype), bias.to(x.dtype), eps)
        if scale is not None:
            h = h * (1 + scale.to(x.dtype)) + shift.to(x.dtype)
        return F.silu(h)


@functools.cache
def compiled_group_norm_silu() -> Callable[..., torch.Tensor]:
    """The torch.compile'd :func:`group_norm_silu_reference` (compiled lazily, once per process).

    Shapes are left to Dynamo's default: the first call specialises, a second shape recompiles with
    symbolic sizes, so the U-net's many (channels, resolution) pairs do not exhaust the recompile limit.
    """
    return torch.compile(group_norm_silu_reference)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float = 1e-5,
                    scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                    impl: str = "torch") -> torch.Tensor:
    """Dispatch to the fused kernel (``impl="fused"`` on CUDA) or the reference; same shapes as the reference.

    On CPU ``"fused"`` runs the reference (see the module docstring).
    """
    if impl not in ("torch", "fused"):
        raise ValueError(f"model.silu_impl is {impl!r}; choose 'torch' or 'fused'")
    if impl == "fused" and x.is_cuda:
        return compiled_group_norm_silu()(x, weight, bias, groups, eps, scale, shift)
    return group_norm_silu_reference(x, weight, bias, groups, eps, scale, shift)


class GroupNormSiLU(nn.Module):
    """GroupNorm(32) with affine weights, optional scale-shift modulation, then SiLU.

    forward(x [N, C, H, W], scale=None, shift=None [N, C, 1, 1]) -> [N, C, H, W].
    """

    def __init__(self, channels: int, impl: str = "torch", groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps, self.impl = min(groups, channels), eps, impl
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        # inputs at least this wide keep only themselves for the backward pass (model.norm_recompute)
        self.recompute_from_width: float = 0

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.is_grad_enabled() and self.impl == "torch" and x.shape[-1] >= self.recompute_from_width:
            # keep only the input for the backward pass and recompute the norm, modulation and SiLU there:
            # the normalised and modulated maps are not kept (demo step, every level: peak 81 -> 54 MB)
            return checkpoint(group_norm_silu_reference, x, self.weight, self.bias, self.groups, self.eps, scale,
                              shift, use_reentrant=False)
        return group_norm_silu(x, self.weight, self.bias, self.groups, self.eps, scale, shift, self.impl)
