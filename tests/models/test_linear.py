"""bf16 linear layers on CPUs without a bf16 kernel: the fp32 kernel computes the same bf16 arithmetic."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from textdiff.models import conv
from textdiff.models.linear import Linear, _Bf16LinearByFp32, linear

from .conftest import bf16_route_errors

BF16_U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)
FP32_U = 2.0 ** -24
N, L, IN, OUT = 3, 5, 48, 20  # x [N, L, IN]: a product sums IN terms; a weight gradient N * L


def operands(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, L, IN, generator=g), torch.randn(OUT, IN, generator=g) / 7, torch.randn(OUT, generator=g),
            torch.randn(N, L, OUT, generator=g))


def bf16_exact64(t):
    return t.to(torch.bfloat16).double()


def test_forward_and_gradients_are_bf16_rounded_exact_values():
    """Each result is the exact (fp64) product of the bf16-rounded operands, rounded once to bf16: within
    bf16's unit roundoff of it, plus fp32 accumulation error of at most K * 2^-24 times the sum of |terms|
    (K products summed into one entry: IN for y, OUT for x's gradient, N * L for the weight's and bias's)."""
    x, w, b, gy = operands()
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = _Bf16LinearByFp32.apply(x, w, b)
    y.backward(gy.to(torch.bfloat16))
    xd, wd, bd = (bf16_exact64(t.detach()).requires_grad_() for t in (x, w, b))
    ref = F.linear(xd, wd, bd)
    ref.backward(bf16_exact64(gy))
    assert y.dtype == torch.bfloat16 and x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    terms = F.linear(xd.detach().abs(), wd.detach().abs(), bd.detach().abs())
    assert ((y.double() - ref).abs() <= BF16_U * ref.abs() + (IN + 1) * FP32_U * terms).all()
    ga = bf16_exact64(gy).abs()
    bounds = {"x": (OUT, ga @ wd.detach().abs()),
              "w": (N * L, ga.reshape(-1, OUT).t() @ xd.detach().abs().reshape(-1, IN)),
              "b": (N * L, ga.reshape(-1, OUT).sum(0))}
    for name, got, exact in (("x", x.grad, xd.grad), ("w", w.grad, wd.grad), ("b", b.grad, bd.grad)):
        k, bound = bounds[name]
        assert ((got.double() - exact).abs() <= BF16_U * exact.abs() + k * FP32_U * bound).all(), name


def test_it_is_at_least_as_accurate_as_the_bf16_reference_kernel():
    """Against the exact product of the same bf16 operands, the fp32-kernel route's largest error (as a
    fraction of the largest value) is no larger than PyTorch's own bf16 linear's, forward and backward."""
    for i, errs in enumerate(bf16_route_errors(_Bf16LinearByFp32.apply, F.linear, *operands(1))):
        assert errs["emulated"] <= errs["bf16"] + FP32_U * 64 and errs["emulated"] <= BF16_U, (i, errs)


def test_only_bf16_tensors_are_kept_for_the_backward_pass():
    """Memory of a bf16 linear layer: it saves the bf16 input and weight (2 bytes an element), no fp32 copy."""
    x, w, b, _ = operands(2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _Bf16LinearByFp32.apply(x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert sorted(t.numel() * t.element_size() for t in saved) == sorted([2 * x.numel(), 2 * w.numel()])


def test_without_bias_and_without_grad_for_the_input():
    x, w, _, gy = operands(3)
    w.requires_grad_()
    y = _Bf16LinearByFp32.apply(x, w, None)
    y.backward(gy.to(torch.bfloat16))
    exact = bf16_exact64(gy).reshape(-1, OUT).t() @ bf16_exact64(x).reshape(-1, IN)
    bound = bf16_exact64(gy).abs().reshape(-1, OUT).t() @ bf16_exact64(x).abs().reshape(-1, IN)
    assert ((w.grad.double() - exact).abs() <= BF16_U * exact.abs() + N * L * FP32_U * bound).all()


class MatmulInputDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def _matmul_dtypes(model, x, t, cond) -> list[torch.dtype]:
    mode = MatmulInputDtypes()
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, **cond)
        out.float().square().mean().backward()
    return mode.dtypes


def test_a_bf16_unet_step_multiplies_in_fp32_exactly_where_the_cpu_has_no_bf16_kernel(tiny, monkeypatch):
    """Every linear layer of a U-net with a transcription encoder, cross-attention and the timestep MLP
    goes through the fp32 kernel under bf16 autocast on a CPU without bf16 kernels, forward and backward: the
    same matrix products as on a CPU with bf16 kernels, where they are bf16 (but those autocast keeps in fp32).
    The switch stands in for the CPU, so both CPU kinds run both routes."""
    cfg = tiny.cfg(txt=True)
    model = tiny.model(cfg).train()
    x, t = tiny.inputs()
    cond = model.prepare_cond(["ab", "cde"], None)
    monkeypatch.setattr(conv, "NATIVE_BF16_CPU", True)
    native = _matmul_dtypes(model, x, t, cond)
    monkeypatch.setattr(conv, "NATIVE_BF16_CPU", False)
    emulated = _matmul_dtypes(model, x, t, cond)
    assert sum(d == torch.bfloat16 for d in native) > 20
    assert emulated == [torch.float32] * len(native)


def test_the_module_keeps_nn_linears_state_dict_and_is_f_linear_in_fp32():
    plain = torch.nn.Linear(4, 6)
    mine = Linear(4, 6)
    mine.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(mine(x), plain(x)) and torch.equal(linear(x, plain.weight), F.linear(x, plain.weight))
