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


def _autocast_off(x: torch.Tensor):
    """Autocast switched off on x's device (a no-op context on devices without autocast: the meta device of
    the model summary and the sync tests)."""
    return (torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type)
            else contextlib.nullcontext())


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
    with _autocast_off(x):
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


class _GroupNormSiLUFunction(torch.autograd.Function):
    """:func:`group_norm_silu_reference` with a hand-written backward that keeps less: the input, the
    [N, groups] statistics and, unless ``recompute``, the normalised map ``out``; never the modulated map
    (:func:`_modulate` recomputes it) nor a second copy for SiLU (``silu_backward`` reads the recomputed map).
    With ``recompute`` the backward recomputes ``out`` too (one group_norm pass), so only the input is kept.
    x: [N, C, ...]; weight, bias: [C]; scale, shift: broadcastable to x or None -> [N, C, ...] in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, recompute):
        n, c = x.shape[:2]
        with _autocast_off(x):
            w, b = weight.to(x.dtype), bias.to(x.dtype)
            out, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, n, c, x[0, 0].numel(), groups, eps)
            y = F.silu(_modulate(out, scale, shift))
        ctx.save_for_backward(x, w, b, mean, rstd, scale, shift, None if recompute else out)
        ctx.conf = (groups, eps, weight.dtype, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, b, mean, rstd, scale, shift, out = ctx.saved_tensors
        groups, eps, w_dtype, b_dtype = ctx.conf
        n, c, hw = x.shape[0], x.shape[1], x[0, 0].numel()
        need_x, need_w, need_b, need_scale, need_shift = ctx.needs_input_grad[:5]
        with _autocast_off(x):
            if out is None:
                out = torch.ops.aten.native_group_norm(x, w, b, n, c, hw, groups, eps)[0]
            dh = torch.ops.aten.silu_backward(grad, _modulate(out, scale, shift))
            d_scale = (dh * out).sum_to_size(scale.shape).to(scale.dtype) if need_scale else None
            d_shift = dh.sum_to_size(shift.shape).to(shift.dtype) if need_shift else None
            d_out = dh if scale is None else dh * (1 + scale.to(x.dtype))
            dx, dw, db = torch.ops.aten.native_group_norm_backward(d_out, x, mean, rstd, w, n, c, hw, groups,
                                                                   [need_x, need_w, need_b])
        return (dx, None if dw is None else dw.to(w_dtype), None if db is None else db.to(b_dtype), d_scale,
                d_shift, None, None, None)


def _modulate(out: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> torch.Tensor:
    """``out * (1 + scale) + shift`` (``out`` when there is no modulation); not ``addcmul``, which broadcasts
    the [N, C, 1, 1] factors 2-5x slower on CPU than a mul and an add."""
    return out if scale is None else out * (1 + scale.to(out.dtype)) + shift.to(out.dtype)


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
        if torch.is_grad_enabled() and self.impl == "torch":
            # the maps at least recompute_from_width wide keep only the input for the backward pass (demo
            # step with every level so: peak 81 -> 54 MB); the others keep the input and the normalised map
            return _GroupNormSiLUFunction.apply(x, self.weight, self.bias, scale, shift, self.groups, self.eps,
                                                x.shape[-1] >= self.recompute_from_width)
        return group_norm_silu(x, self.weight, self.bias, self.groups, self.eps, scale, shift, self.impl)
