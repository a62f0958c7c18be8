"""GroupNorm + scale-shift + SiLU: the fused path equals the reference."""

import os

import pytest
import torch
import torch.nn.functional as F

from textdiff.models.fused import (GroupNormSiLU, compiled_group_norm_silu, group_norm_silu,
                                   group_norm_silu_reference)


def operands(seed=0, n=2, c=64, hw=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g) * 3 + 1
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    scale, shift = torch.randn(n, c, 1, 1, generator=g), torch.randn(n, c, 1, 1, generator=g)
    return x, weight, bias, scale, shift


def test_reference_matches_a_hand_written_group_norm_and_silu():
    x, weight, bias, scale, shift = operands()
    groups = x.reshape(2, 32, -1)
    normed = ((groups - groups.mean(-1, keepdim=True)) / (groups.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt())
    h = normed.reshape(x.shape) * weight[:, None, None] + bias[:, None, None]
    h = h * (1 + scale) + shift
    expected = h * torch.sigmoid(h)
    assert torch.allclose(group_norm_silu_reference(x, weight, bias, 32, 1e-5, scale, shift), expected, atol=1e-5)


def test_fused_impl_on_cpu_falls_back_to_the_reference_exactly():
    x, weight, bias, scale, shift = operands(1)
    assert torch.equal(group_norm_silu(x, weight, bias, 32, 1e-5, scale, shift, impl="fused"),
                       group_norm_silu_reference(x, weight, bias, 32, 1e-5, scale, shift))


def test_module_without_scale_shift_is_group_norm_then_silu():
    x = operands(2)[0]
    module = GroupNormSiLU(64, impl="fused")
    assert torch.allclose(module(x), F.silu(F.group_norm(x, 32, module.weight, module.bias)), atol=1e-6)


def test_half_precision_input_keeps_its_dtype_and_stays_close():
    x, weight, bias, scale, shift = operands(3)
    out = group_norm_silu(x.half(), weight, bias, 32, 1e-5, scale.half(), shift.half(), impl="fused")
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), group_norm_silu_reference(x, weight, bias, 32, 1e-5, scale, shift), atol=1e-2)


def test_unknown_impl_names_the_config_key():
    x, weight, bias, _, _ = operands()
    with pytest.raises(ValueError, match="model.silu_impl is 'triton'"):
        group_norm_silu(x, weight, bias, 32, impl="triton")


# The compiled kernel is what silu_impl="fused" runs on CUDA. On a CPU-only machine (CI) Inductor compiles
# the same graph to C++ in ~30 s, which still checks the fused graph's numerics; TEXTDIFF_SKIP_COMPILE=1
# skips it for quick local runs.
@pytest.mark.skipif(os.environ.get("TEXTDIFF_SKIP_COMPILE") == "1", reason="TEXTDIFF_SKIP_COMPILE=1")
def test_compiled_kernel_equals_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, weight, bias, scale, shift = (a.to(device) for a in operands(4))
    fused = compiled_group_norm_silu()(x, weight, bias, 32, 1e-5, scale, shift)
    assert torch.allclose(fused, group_norm_silu_reference(x, weight, bias, 32, 1e-5, scale, shift), atol=1e-5)


def test_bf16_under_autocast_is_normalised_in_bf16_close_to_float32():
    x, weight, bias, scale, shift = operands(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = group_norm_silu(x.bfloat16(), weight, bias, 32, 1e-5, scale.bfloat16(), shift.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = group_norm_silu_reference(x, weight, bias, 32, 1e-5, scale, shift)
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_training_gradients_are_within_float32_rounding_of_exact_ones():
    """The module's float32 gradients (the modulation folded into the norm) and autograd's of the float32
    reference both lie within the rounding bound of their largest reduction, a group's 2 x 64 = 128
    elements (128 units of 2^-24), of the float64 gradients, relative to the largest of each."""
    x, weight, bias, scale, shift = operands(6)

    def gradients(dtype, module):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (x, weight, bias, scale, shift)]
        if not module:
            group_norm_silu_reference(*leaves[:3], 32, 1e-5, *leaves[3:]).square().sum().backward()
            return [t.grad for t in leaves]
        norm = GroupNormSiLU(64).to(dtype)
        norm.weight.data.copy_(weight), norm.bias.data.copy_(bias)
        norm(leaves[0], leaves[3], leaves[4]).square().sum().backward()
        return [leaves[0].grad, norm.weight.grad, norm.bias.grad, leaves[3].grad, leaves[4].grad]

    exact = gradients(torch.float64, module=False)
    for module in (True, False):
        for got, want in zip(gradients(torch.float32, module), exact):
            assert float((got.double() - want).abs().max()) <= 128 * 2 ** -24 * float(want.abs().max())


def test_the_folded_forward_passes_over_the_map_twice():
    """Normalise-and-modulate is one group_norm call, then SiLU: no multiply or add over the whole map."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FullSizeOps(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.ops = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, torch.Tensor) and first.numel() == self.numel and not func.is_view:
                self.ops.append(func.__name__.split(".")[0].rstrip("_"))  # silu_: in place where it recomputes
            return out

    x, weight, bias, scale, shift = (t.requires_grad_() for t in operands(7))
    norm = GroupNormSiLU(64)
    with FullSizeOps(x.numel()) as mode:
        norm(x, scale, shift)
    assert mode.ops == ["native_group_norm", "silu"]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("modulated", [False, True, "per channel", "channels last"])
def test_the_hand_written_backward_equals_autograd_of_the_reference(recompute, modulated):
    """In float64 the two differ only by rounding: within 1e-12 of the largest gradient."""
    from textdiff.models.fused import _GroupNormSiLUFunction

    x, weight, bias, scale, shift = (t.double().requires_grad_() for t in operands(3))
    if modulated == "per channel":
        scale, shift = (t[:1].detach().requires_grad_() for t in (scale, shift))
    elif modulated == "channels last":  # not folded: the normalised map is modulated after the norm
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    elif not modulated:
        scale, shift = None, None
    inputs = [x, weight, bias] + ([scale, shift] if modulated else [])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mine = _GroupNormSiLUFunction.apply(x, weight, bias, scale, shift, 32, 1e-5, recompute)
    ref = group_norm_silu_reference(x, weight, bias, 32, 1e-5, scale, shift)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(mine, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize("recompute, maps", [(True, 1), (False, 2)])
def test_backward_keeps_the_input_and_the_normalised_map_unless_it_recomputes(recompute, maps):
    """Full-size tensors kept for the backward pass: the input, plus the normalised map without recompute;
    never the modulated map (autograd of the reference keeps three: input, normalised, modulated)."""
    from textdiff.models.fused import _GroupNormSiLUFunction

    x, weight, bias, scale, shift = (t.requires_grad_() for t in operands(5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _GroupNormSiLUFunction.apply(x, weight, bias, scale, shift, 32, 1e-5, recompute)
    assert sum(t.numel() == x.numel() for t in saved if t is not None) == maps



def test_torch_compile_traces_the_function_whole_with_the_eager_values():
    """No graph break (a break runs the norm eagerly between compiled pieces, slower than no compile at
    the demo size); outputs and gradients within the 128-element float32 rounding bound of eager ones."""
    x, weight, bias, scale, shift = (t.requires_grad_() for t in operands(8))
    norm = GroupNormSiLU(64)

    def loss(x, scale, shift):
        return norm(x, scale, shift).square().sum()

    assert torch._dynamo.explain(loss)(x, scale, shift).graph_break_count == 0
    compiled = torch.autograd.grad(torch.compile(loss)(x, scale, shift), [x, scale, shift])
    for got, want in zip(compiled, torch.autograd.grad(loss(x, scale, shift), [x, scale, shift])):
        assert float((got - want).abs().max()) <= 128 * 2 ** -24 * float(want.abs().max())
