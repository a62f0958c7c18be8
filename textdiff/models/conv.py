"""2-D convolution that stays fast in bf16 on CPUs without a bf16 convolution kernel.

oneDNN convolves bf16 only on CPUs with AVX-512 (BF16) or AMX. Elsewhere (AVX2 machines) PyTorch's bf16
convolution falls back to its reference kernel (``aten::_slow_conv2d_forward``), about 15x slower than fp32:
93% of a bf16 demo training step. There, :func:`conv2d` computes the same bf16 convolution with the fp32
kernel: inputs and weights rounded to bf16 (what a bf16 kernel reads), products and sums in fp32 (a product of
two bf16 numbers is exact in fp32, and bf16 kernels accumulate in fp32 too), the result rounded to bf16. The
backward pass does the same, and only the bf16 input is kept for it, so memory is that of a bf16 convolution.
Everywhere else (fp32, CUDA, CPUs with a bf16 kernel) it is ``F.conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# whether oneDNN has bf16 kernels on this CPU (AVX-512 BF16 or AMX); read once here so that torch.compile sees
# a constant. It is also the switch of the route: tests set it to False to run the fp32-kernel route on a CPU
# with bf16 kernels, and to True to run PyTorch's own bf16 kernels on one without, so both CPU kinds test both.
NATIVE_BF16_CPU = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulates_bf16(x: torch.Tensor, native: bool | None = None) -> bool:
    """Whether a convolution or matrix product of ``x`` runs in bf16 on a CPU that has no bf16 kernel for it
    (``native``, by default :data:`NATIVE_BF16_CPU`; oneDNN's bf16 convolution and matmul need the same CPU
    features): ``x`` is bf16, or CPU autocast is on in bf16 (it would cast ``x`` to bf16)."""
    if native is None:
        native = NATIVE_BF16_CPU
    if native or x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def bf16_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16, held in fp32."""
    return t.to(torch.bfloat16).float()


def bf16_grad(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient rounded to bf16 first, as a bf16 kernel returns it, then given its input's ``dtype``
    (None stays None)."""
    return None if g is None else g.to(torch.bfloat16).to(dtype)


class _Bf16ConvByFp32(torch.autograd.Function):
    """The bf16 convolution ``y = conv(bf16(x), bf16(w)) + bf16(b)``, rounded to bf16, computed by the fp32 kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.conf = (stride, padding, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with torch.autocast("cpu", enabled=False):
            y = F.conv2d(xb.float(), wb.float(), None if bias is None else bf16_exact(bias), stride, padding)
        return y.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        stride, padding, x_dtype, w_dtype, b_dtype = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast("cpu", enabled=False):
            gx, gw, gb = torch.ops.aten.convolution_backward(
                bf16_exact(grad), xb.float(), wb.float(), [wb.shape[0]] if b_dtype is not None else None,
                list(stride), list(padding), [1, 1], False, [0, 0], 1, [need_x, need_w, need_b and b_dtype is not None])
        return (bf16_grad(gx, x_dtype) if need_x else None, bf16_grad(gw, w_dtype) if need_w else None,
                bf16_grad(gb, b_dtype) if need_b and b_dtype is not None else None, None, None)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0
           ) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (dilation 1, one group); in bf16 on a CPU without a bf16
    kernel, the same bf16 arithmetic through the fp32 kernel (module docstring).
    x: [N, C_in, H, W]; weight: [C_out, C_in, kh, kw] -> [N, C_out, H', W']."""
    if not emulates_bf16(x):
        return F.conv2d(x, weight, bias, stride, padding)
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
    return _Bf16ConvByFp32.apply(x, weight, bias, pair(stride), pair(padding))


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) whose forward is :func:`conv2d`."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or self.groups != 1 or self.dilation != (1, 1) or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, self.padding)
