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


def test_training_recomputes_the_norm_with_the_reference_gradients():
    x, weight, bias, scale, shift = operands(6)
    module = GroupNormSiLU(64)
    module.weight.data.copy_(weight), module.bias.data.copy_(bias)
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    module(leaves[0], leaves[1], leaves[2]).square().sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, weight, bias, scale, shift)]
    group_norm_silu_reference(ref[0], ref[1], ref[2], 32, 1e-5, ref[3], ref[4]).square().sum().backward()
    for got, want in zip([leaves[0], module.weight, module.bias, leaves[1], leaves[2]], ref):
        assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("modulated", [False, True])
def test_the_hand_written_backward_equals_autograd_of_the_reference(recompute, modulated):
    """In float64 the two differ only by rounding: within 1e-12 of the largest gradient."""
    from textdiff.models.fused import _GroupNormSiLUFunction

    x, weight, bias, scale, shift = (t.double().requires_grad_() for t in operands(3))
    scale, shift = (scale, shift) if modulated else (None, None)
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
