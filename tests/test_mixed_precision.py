"""Under mixed precision (a bfloat16/float16 input to float32 BatchNorms, as autocast gives) the
NAM kernels compute in float32 and round once: each output is the float64 result rounded to the
input's dtype, where PyTorch's own operators round after every step."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import reference
from torch import nn

from nam_lightning import NAM, NAMSite, fold_nam

LOW = [torch.bfloat16, torch.float16]
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # spacing of the numbers in [1, 2)


def site(training: bool) -> NAMSite:
    torch.manual_seed(0)
    bn1, nam = nn.BatchNorm2d(6), NAM(6, detach_weights=False)
    with torch.no_grad():
        for bn in (bn1, nam.channel.bn):
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return NAMSite(bn1, nam).train(training)


def low_precision_input(dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    z = torch.randn(4, 6, 5, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    return z.contiguous(memory_format=torch.channels_last) if channels_last else z


def assert_rounded_once(y: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """Each element of ``y`` is within half a unit in the last place of ``exact`` (plus
    float32's error): ``exact`` rounded to ``dtype``, but for float32 noise at a tie."""
    assert y.dtype == dtype
    _, exponent = torch.frexp(exact)  # |exact| in [2^(e-1), 2^e): its ulp is 2^(e-1) * ULP
    half_ulp = torch.ldexp(torch.full_like(exact, ULP[dtype] / 4), exponent)
    error = (y.double() - exact).abs()
    bound = half_ulp + 1e-6 * exact.abs() + 1e-7
    assert bool((error <= bound).all()), (
        f"{int((error > bound).sum())} of {error.numel()} elements off by more than half an "
        f"ulp; worst {float((error / half_ulp).max()):.2f} ulp/2"
    )


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("part", ["site", "nam"], ids=["fused site", "NAM alone"])
def test_training_step_rounds_the_float64_result_once(dtype: torch.dtype, part: str) -> None:
    full = site(training=True)
    # the fused site (BatchNorm and NAM in one step), or NAM on its own input (NAM alone)
    ours: nn.Module = full if part == "site" else full.nam
    exact = copy.deepcopy(ours).double()
    bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    exact_bns = [m for m in exact.modules() if isinstance(m, nn.BatchNorm2d)]
    z = low_precision_input(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = ours(z)
    z64 = z.detach().double().requires_grad_()
    y64 = exact(z64)
    assert_rounded_once(y, y64, dtype)

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    params = [p for bn in bns for p in (bn.weight, bn.bias)]
    dz, *grads = torch.autograd.grad(y, [z, *params], dy)
    dz64, *grads64 = torch.autograd.grad(
        y64, [z64, *(p for bn in exact_bns for p in (bn.weight, bn.bias))], dy.double()
    )
    # dz is rounded twice (the gradient reaching the normalised input is stored in the input's
    # dtype between the two backward passes): within one unit of the largest gradient
    assert dz.dtype == dtype
    scale = dz64.abs().max().item()
    torch.testing.assert_close(dz.double(), dz64, rtol=ULP[dtype], atol=ULP[dtype] * scale)
    # the parameters' gradients are float32 sums of float32 terms: no low-precision rounding
    for i, (g, g64) in enumerate(zip(grads, grads64, strict=True)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-6, msg=f"parameter {i}")
    for bn, bn64 in zip(bns, exact_bns, strict=True):
        torch.testing.assert_close(bn.running_mean.double(), bn64.running_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(bn.running_var.double(), bn64.running_var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("form", ["eval", "folded"])
def test_inference_rounds_the_float64_result_once(dtype: torch.dtype, form: str) -> None:
    model = nn.Sequential(site(training=False)).eval()
    exact = copy.deepcopy(model).double()
    if form == "folded":
        fold_nam(model)
    z = low_precision_input(dtype, channels_last=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y = model(z)
    assert y.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_rounded_once(y, exact(z.double()), dtype)


def test_a_model_cast_to_low_precision_keeps_the_plain_operators() -> None:
    ours = site(training=True).to(torch.bfloat16)
    ref = copy.deepcopy(ours)
    ref.fuse = False
    z = low_precision_input(torch.bfloat16)
    torch.testing.assert_close(ours(z), ref.nam(ref.module(z)), rtol=0, atol=0)


def test_pytorch_operators_miss_the_bounds_the_kernels_meet() -> None:
    """The checks above tell the kernels from PyTorch's own operators: the NAM formula written
    with them, under the same autocast on the same site, rounds after every step, and some of
    its outputs land more than one unit in the last place from the float64 result; its bf16
    parameter gradients are more than 0.1% of the largest one off."""

    dtype = torch.bfloat16
    ours = site(training=True)
    exact = copy.deepcopy(ours).double()
    z = low_precision_input(dtype)
    with torch.autocast("cpu", dtype=dtype):
        y = reference(ours.module, ours.nam, z)
    y64 = reference(exact.module, exact.nam, z.double())

    error = (y.to(dtype).double() - y64).abs()
    _, exponent = torch.frexp(y64)
    ulp = torch.ldexp(torch.full_like(y64, ULP[dtype] / 2), exponent)
    assert float((error / ulp).max()) > 1
    with pytest.raises(AssertionError, match="off by more than half an ulp"):
        assert_rounded_once(y.to(dtype), y64, dtype)

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    params, params64 = (
        [p for m in (s.module, s.nam.channel.bn) for p in (m.weight, m.bias)] for s in (ours, exact)
    )
    grads = torch.autograd.grad(y, params, dy.to(y.dtype))
    grads64 = torch.autograd.grad(y64, params64, dy.double())
    worst = max(
        float((g.double() - g64).abs().max() / g64.abs().max())
        for g, g64 in zip(grads, grads64, strict=True)
    )
    assert worst > 1e-3
