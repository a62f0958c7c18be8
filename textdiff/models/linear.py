"""Linear layers that stay fast in bf16 on CPUs without bf16 kernels, as :mod:`textdiff.models.conv` does
for convolutions.

Where oneDNN has no bf16 kernel (AVX2 CPUs), a bf16 matrix product runs PyTorch's reference kernel: an
attention projection's [512, 64] x [64, 64] product took 1.4 ms there, and ``aten::mm`` was 16% of a bf16
demo training step once the convolutions ran fast. :func:`linear` computes the same bf16 product with the
fp32 kernel: operands rounded to bf16, products (exact in fp32) summed in fp32, as a bf16 kernel sums them,
the result rounded to bf16. The backward pass does the same, and keeps only the bf16 input and weight.
Everywhere else (fp32, CUDA, CPUs with bf16 kernels) it is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textdiff.models.conv import bf16_exact, bf16_grad, emulates_bf16


class _Bf16LinearByFp32(torch.autograd.Function):
    """The bf16 product ``y = bf16(x) bf16(w)^T + bf16(b)``, rounded to bf16, computed by the fp32 kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.conf = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with torch.autocast("cpu", enabled=False):
            y = F.linear(xb.float(), wb.float(), None if bias is None else bf16_exact(bias))
        return y.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad
        with torch.autocast("cpu", enabled=False):
            g = bf16_exact(grad)
            rows = g.reshape(-1, g.shape[-1])
            gx = g @ wb.float() if need_x else None
            gw = rows.t() @ xb.float().reshape(-1, xb.shape[-1]) if need_w else None
            gb = rows.sum(0) if need_b and b_dtype is not None else None
        return bf16_grad(gx, x_dtype), bf16_grad(gw, w_dtype), bf16_grad(gb, b_dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; in bf16 on a CPU without bf16 kernels, the same bf16 arithmetic through
    the fp32 kernel (module docstring). x: [..., in]; weight: [out, in]; bias: [out] -> [..., out]."""
    if not emulates_bf16(x):
        return F.linear(x, weight, bias)
    return _Bf16LinearByFp32.apply(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose forward is :func:`linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)
