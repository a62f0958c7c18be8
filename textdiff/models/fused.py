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
    [N, groups] statistics and, unless ``recompute``, the normalised map; never a second copy for SiLU
    (``silu_backward`` reads the map it kept or recomputed). With ``recompute`` the backward recomputes the
    map (one group_norm pass), so only the input is kept.

    Where x is contiguous the modulation is folded into the norm's affine step (:func:`_folded_affine`):
    one group_norm pass normalises and modulates, where a separate multiply and add would read and write
    the map twice more, and its backward returns the per-(sample, channel) weight and bias gradients from
    which those of weight, bias, scale and shift follow. Otherwise (channels-last x) the normalised map is
    modulated by :func:`_modulate`.
    x: [N, C, ...]; weight, bias: [C]; scale, shift: broadcastable to x or None -> [N, C, ...] in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, recompute):
        n, c, hw = x.shape[0], x.shape[1], x[0, 0].numel()
        fold = scale is None or _foldable(x, scale, shift)
        with _autocast_off(x):
            if fold:
                w, b, s1 = _folded_affine(weight, bias, scale, shift, n, c, x.dtype)
                dims = (n, c, hw, groups) if scale is None else (1, n * c, hw, n * groups)
                h, mean, rstd = torch.ops.aten.native_group_norm(_as_norm_input(x, dims), w, b, *dims, eps)
                h = h.view(x.shape)
                y = F.silu(h, inplace=recompute)  # with recompute, h is not kept: overwrite it
            else:
                w, b, s1, dims = weight.to(x.dtype), bias.to(x.dtype), None, (n, c, hw, groups)
                h, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, *dims, eps)
                y = F.silu(_modulate(h, scale, shift))
        ctx.save_for_backward(x, w, b, mean, rstd, weight, bias, scale, shift, s1, None if recompute else h)
        ctx.conf = (dims, eps, fold)  # no tensor here: torch.compile traces the Function whole
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, b, mean, rstd, weight, bias, scale, shift, s1, h = ctx.saved_tensors
        dims, eps, fold = ctx.conf
        need_x, need_w, need_b, need_scale, need_shift = ctx.needs_input_grad[:5]
        with _autocast_off(x):
            if h is None:
                h = torch.ops.aten.native_group_norm(_as_norm_input(x, dims), w, b, *dims, eps)[0].view(x.shape)
            if fold:
                dh = torch.ops.aten.silu_backward(grad, h)
                dx, dw, db = torch.ops.aten.native_group_norm_backward(
                    _as_norm_input(dh, dims), _as_norm_input(x, dims), mean, rstd, w, *dims,
                    [need_x, need_w or need_scale, need_b or need_scale or need_shift])
                dx = None if dx is None else dx.view(x.shape)
                if scale is not None:
                    grads = _unfold_affine_grads(dw, db, weight, bias, s1, scale, shift)
                    needs = (need_w, need_b, need_scale, need_shift)
                    return (dx, *(g if need else None for g, need in zip(grads, needs)), None, None, None)
                d_scale = d_shift = None
            else:
                dh = torch.ops.aten.silu_backward(grad, _modulate(h, scale, shift))
                d_scale = (dh * h).sum_to_size(scale.shape).to(scale.dtype) if need_scale else None
                d_shift = dh.sum_to_size(shift.shape).to(shift.dtype) if need_shift else None
                dx, dw, db = torch.ops.aten.native_group_norm_backward(dh * (1 + scale.to(x.dtype)), x, mean, rstd,
                                                                       w, *dims, [need_x, need_w, need_b])
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                d_scale, d_shift, None, None, None)


def _as_norm_input(t: torch.Tensor, dims: tuple) -> torch.Tensor:
    """t as the [N', C', HW] tensor that native_group_norm's (N', C', HW, groups') ``dims`` describe: itself
    where those are t's own sample and channel counts, else (the folded modulation) one sample of N * C
    channels, which torch.compile's shape rules need spelled out."""
    return t if t.shape[:2] == dims[:2] else t.reshape(dims[0], dims[1], dims[2])


def _foldable(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """Whether x is contiguous and scale and shift are per (sample, channel): [N, C, 1, ...] or [1, C, 1, ...]."""
    return x.is_contiguous() and all(t.dim() == x.dim() and t.shape[1] == x.shape[1] and t.shape[0] in (1, x.shape[0])
                                     and all(d == 1 for d in t.shape[2:]) for t in (scale, shift))


def _folded_affine(weight: torch.Tensor, bias: torch.Tensor, scale: Optional[torch.Tensor],
                   shift: Optional[torch.Tensor], n: int, c: int, dtype: torch.dtype):
    """GroupNorm's affine weight and bias that also modulate, in ``dtype``, and ``1 + scale``.

    Normalised x times ``weight * (1 + scale)`` plus ``bias * (1 + scale) + shift`` is the reference's
    ``(normalised x * weight + bias) * (1 + scale) + shift``. weight, bias: [C]; scale, shift: [N or 1, C,
    1, ...] -> (weight', bias' [N * C], computed in float32 (or dtype, if wider) and rounded once; 1 + scale
    [N, C] in that precision), or
    (weight, bias [C], None) without modulation."""
    if scale is None:
        return weight.to(dtype), bias.to(dtype), None
    acc = torch.promote_types(dtype, torch.float32)
    s1 = 1 + scale.to(acc).reshape(-1, c).expand(n, c)
    w = weight.to(acc) * s1
    b = torch.addcmul(shift.to(acc).reshape(-1, c), bias.to(acc), s1)
    return w.reshape(-1).to(dtype), b.reshape(-1).to(dtype), s1


def _unfold_affine_grads(dw: Optional[torch.Tensor], db: Optional[torch.Tensor], weight: torch.Tensor,
                         bias: torch.Tensor, s1: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor):
    """The gradients of (weight [C], bias [C], scale, shift) from those of the folded affine weight and
    bias (dw, db: [N * C] or None) by the chain rule through :func:`_folded_affine`; s1: 1 + scale [N, C]."""
    n, c = s1.shape
    dw = None if dw is None else dw.to(s1.dtype).view(n, c)
    db = None if db is None else db.to(s1.dtype).view(n, c)
    d_weight = None if dw is None else (dw * s1).sum(0).to(weight.dtype)
    d_bias = None if db is None else (db * s1).sum(0).to(bias.dtype)
    d_scale = None
    if dw is not None and db is not None:
        d_scale = dw * weight.to(s1.dtype) + db * bias.to(s1.dtype)
        d_scale = d_scale.view(n, c, *scale.shape[2:]).sum_to_size(scale.shape)
        d_scale = d_scale.to(scale.dtype)
    d_shift = None if db is None else db.view(n, c, *shift.shape[2:]).sum_to_size(shift.shape).to(shift.dtype)
    return d_weight, d_bias, d_scale, d_shift


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
