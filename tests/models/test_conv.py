"""bf16 convolution on CPUs without a bf16 kernel: the fp32 kernel computes the same bf16 arithmetic."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from textdiff.models import conv
from textdiff.models.conv import Conv2d, _Bf16ConvByFp32, emulates_bf16

from .conftest import bf16_route_errors

BF16_U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)
FP32_U = 2.0 ** -24


def operands(seed=0, n=2, c_in=16, c_out=24, hw=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, hw, hw, generator=g)
    w = torch.randn(c_out, c_in, 3, 3, generator=g) / 12
    b = torch.randn(c_out, generator=g)
    gy_shape = (n, c_out, (hw + 1) // 2, (hw + 1) // 2)  # stride 2, padding 1
    return x, w, b, torch.randn(gy_shape, generator=g)


def bf16_exact64(t):
    return t.to(torch.bfloat16).double()


def test_emulation_is_chosen_only_for_bf16_on_a_cpu_without_a_bf16_kernel():
    x32, x16 = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    assert emulates_bf16(x16, native=False) and not emulates_bf16(x32, native=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emulates_bf16(x32, native=False)
        assert not emulates_bf16(x32, native=True)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not emulates_bf16(x32, native=False)
    assert not emulates_bf16(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16, device="meta"), native=False)


def test_forward_and_gradients_are_bf16_rounded_exact_values():
    """Each result is the exact (fp64) convolution of the bf16-rounded operands, rounded once to bf16: within
    bf16's unit roundoff of it, plus fp32 accumulation error of at most K * 2^-24 times the sum of |terms|
    (K = 16 * 9 products per output), elementwise."""
    x, w, b, gy = operands()
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = _Bf16ConvByFp32.apply(x, w, b, (2, 2), (1, 1))
    y.backward(gy.to(torch.bfloat16))
    xd, wd, bd = (bf16_exact64(t.detach()).requires_grad_() for t in (x, w, b))
    ref = F.conv2d(xd, wd, bd, 2, 1)
    ref.backward(bf16_exact64(gy))
    k = 16 * 9
    terms = F.conv2d(xd.detach().abs(), wd.detach().abs(), bd.detach().abs(), 2, 1)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    assert ((y.double() - ref).abs() <= BF16_U * ref.abs() + k * FP32_U * terms).all()
    abs_grads = torch.ops.aten.convolution_backward(
        bf16_exact64(gy).abs(), xd.detach().abs(), wd.detach().abs(), [24], [2, 2], [1, 1], [1, 1], False, [0, 0], 1,
        [True, True, True])
    n_terms = {"x": 24 * 9, "w": 2 * 5 * 5, "b": 2 * 5 * 5}  # products summed into one gradient entry
    for (name, got, exact), bound in zip((("x", x.grad, xd.grad), ("w", w.grad, wd.grad), ("b", b.grad, bd.grad)),
                                         abs_grads):
        err = (got.double() - exact).abs()
        assert (err <= BF16_U * exact.abs() + n_terms[name] * FP32_U * bound).all(), name


def test_it_is_at_least_as_accurate_as_the_bf16_reference_kernel():
    """Against the exact convolution of the same bf16 operands, the fp32-kernel route's largest error (as a
    fraction of the largest value) is no larger than PyTorch's own bf16 convolution's, forward and backward."""
    errors = bf16_route_errors(lambda x, w, b: _Bf16ConvByFp32.apply(x, w, b, (2, 2), (1, 1)),
                               lambda x, w, b: F.conv2d(x, w, b, 2, 1), *operands(1))
    for i, errs in enumerate(errors):
        assert errs["emulated"] <= errs["bf16"] + FP32_U * 64 and errs["emulated"] <= BF16_U, (i, errs)


def test_only_bf16_tensors_are_kept_for_the_backward_pass():
    """Memory of a bf16 convolution: it saves the bf16 input and weight (2 bytes an element), no fp32 copy."""
    x, w, b, _ = operands(2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _Bf16ConvByFp32.apply(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), (1, 1), (1, 1))
    assert sorted(t.numel() * t.element_size() for t in saved) == sorted([2 * x.numel(), 2 * w.numel()])


class ConvInputDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def _conv_dtypes(model, x, t) -> list[torch.dtype]:
    mode = ConvInputDtypes()
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
        out.float().square().mean().backward()
    return mode.dtypes


def test_a_bf16_unet_step_convolves_in_fp32_exactly_where_the_cpu_has_no_bf16_kernel(tiny, monkeypatch):
    """Every convolution of the U-net (3x3, strided, 1x1 skips, sub-pixel upsampling) goes through the fp32
    kernel under bf16 autocast on a CPU without bf16 kernels, forward and backward: none is left on the
    reference bf16 kernel; on a CPU with them, the same convolutions are all bf16. The switch stands in for
    the CPU, so both CPU kinds run both routes (PyTorch computes bf16 on any CPU, only slower without them)."""
    cfg = tiny.cfg(resblock_updown=True)
    model = tiny.model(cfg).train()
    x, t = tiny.inputs()
    monkeypatch.setattr(conv, "NATIVE_BF16_CPU", True)
    native = _conv_dtypes(model, x, t)
    monkeypatch.setattr(conv, "NATIVE_BF16_CPU", False)
    emulated = _conv_dtypes(model, x, t)
    assert len(native) > 10 and native == [torch.bfloat16] * len(native)
    assert emulated == [torch.float32] * len(native)


def test_the_module_keeps_nn_conv2ds_state_dict():
    plain = torch.nn.Conv2d(4, 6, 3, padding=1)
    mine = Conv2d(4, 6, 3, padding=1)
    mine.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 5, 5)
    assert torch.equal(mine(x), plain(x))
