"""NAM modules against a straightforward reference of the formulas in arXiv:2111.12419."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nam_lightning import NAM, NAMChannelAttention, NAMSpatialAttention

EPS = 1e-5


def ref_weights(scale: torch.Tensor, detach: bool) -> torch.Tensor:
    """``|s| / sum |s|``: the NAM weighting of the scale factors."""
    s = scale.detach() if detach else scale
    return s.abs() / s.abs().sum()


def ref_channel(x, gamma, beta, *, detach=True, eps=EPS, running=None):
    """``x * sigmoid(w * BN(x))`` with ``w = |gamma| / sum |gamma|``, per channel."""
    mean, var = running if running is not None else (None, None)
    z = F.batch_norm(x, mean, var, gamma, beta, training=running is None, eps=eps)
    w = ref_weights(gamma, detach)
    return x * torch.sigmoid(w[None, :, None, None] * z)


def ref_spatial(x, lam, beta, *, detach=True, eps=EPS):
    """``x * sigmoid(W_lambda * BN_pixel(x))``: one scale factor per position of the map."""
    n, c, h, w = x.shape
    z = F.batch_norm(x.reshape(n * c, h * w), None, None, lam, beta, training=True, eps=eps)
    gate = torch.sigmoid(ref_weights(lam, detach)[None, :] * z)
    return x * gate.reshape(n, c, h, w)


def randomize_affine(bn: nn.Module) -> None:
    """Scale factors of both signs and a non-zero shift, so every term of the formula matters."""
    with torch.no_grad():
        bn.weight.copy_(torch.randn_like(bn.weight))
        bn.bias.copy_(torch.randn_like(bn.bias))


def module_and_reference_grads(module, ref, x, *, detach):
    """Output and input/weight/bias gradients of ``module`` and of ``ref``, same upstream grad."""
    bn = module.bn
    x_mod = x.clone().requires_grad_()
    y_mod = module(x_mod)
    upstream = torch.randn_like(y_mod)
    y_mod.backward(upstream)
    got = (y_mod, x_mod.grad, bn.weight.grad, bn.bias.grad)

    x_ref = x.clone().requires_grad_()
    gamma = bn.weight.detach().clone().requires_grad_()
    beta = bn.bias.detach().clone().requires_grad_()
    y_ref = ref(x_ref, gamma, beta, detach=detach)
    y_ref.backward(upstream)
    return got, (y_ref, x_ref.grad, gamma.grad, beta.grad)


@pytest.mark.parametrize("detach", [True, False])
def test_channel_attention_matches_reference_forward_and_grads(detach):
    x = torch.randn(4, 6, 5, 7)
    module = NAMChannelAttention(6, detach_weights=detach)
    randomize_affine(module.bn)

    got, want = module_and_reference_grads(module, ref_channel, x, detach=detach)

    for name, g, w in zip(["output", "x.grad", "gamma.grad", "beta.grad"], got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


def test_channel_attention_detach_changes_only_the_gamma_gradient():
    """Guards the references above: detaching w must matter, and only for gamma."""
    x = torch.randn(4, 6, 5, 7)
    grads = {}
    for detach in (True, False):
        module = NAMChannelAttention(6, detach_weights=detach)
        torch.manual_seed(1)
        randomize_affine(module.bn)
        got, _ = module_and_reference_grads(module, ref_channel, x, detach=detach)
        grads[detach] = got

    for i in (0, 1, 3):  # output, x.grad, beta.grad: w has no effect on them
        torch.testing.assert_close(grads[True][i], grads[False][i])
    assert not torch.allclose(grads[True][2], grads[False][2], rtol=1e-3, atol=1e-6)


def test_channel_attention_running_stats_follow_batchnorm2d():
    module = NAMChannelAttention(6)
    randomize_affine(module.bn)
    reference_bn = nn.BatchNorm2d(6, eps=EPS)
    for _ in range(3):
        x = torch.randn(4, 6, 5, 7) * 3 + 1
        module(x)
        reference_bn(x)

    torch.testing.assert_close(module.bn.running_mean, reference_bn.running_mean)
    torch.testing.assert_close(module.bn.running_var, reference_bn.running_var)
    assert module.bn.num_batches_tracked.item() == 3

    module.eval()
    x = torch.randn(4, 6, 5, 7)
    running = (reference_bn.running_mean, reference_bn.running_var)
    want = ref_channel(x, module.bn.weight, module.bn.bias, running=running)
    torch.testing.assert_close(module(x), want)


@pytest.mark.parametrize("detach", [True, False])
def test_spatial_attention_matches_reference_forward_and_grads(detach):
    x = torch.randn(4, 6, 5, 7)  # H != W
    module = NAMSpatialAttention((5, 7), detach_weights=detach)
    assert module.bn.num_features == 35
    randomize_affine(module.bn)

    got, want = module_and_reference_grads(module, ref_spatial, x, detach=detach)

    for name, g, w in zip(["output", "x.grad", "lambda.grad", "beta.grad"], got, want, strict=True):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


def test_spatial_attention_rejects_another_resolution():
    module = NAMSpatialAttention((5, 7))
    module(torch.randn(2, 3, 5, 7))

    with pytest.raises(ValueError) as excinfo:
        module(torch.randn(2, 3, 7, 5))

    message = str(excinfo.value)
    assert "5x7" in message
    assert "7x5" in message


def test_nam_is_channel_then_spatial():
    x = torch.randn(4, 6, 5, 7)
    nam = NAM(6, spatial_size=(5, 7))
    randomize_affine(nam.channel.bn)
    randomize_affine(nam.spatial.bn)

    channel = ref_channel(x, nam.channel.bn.weight, nam.channel.bn.bias)
    want = ref_spatial(channel, nam.spatial.bn.weight, nam.spatial.bn.bias)
    torch.testing.assert_close(nam(x), want)


def test_nam_without_spatial_size_is_channel_attention_only():
    x = torch.randn(4, 6, 5, 7)
    nam = NAM(6)
    randomize_affine(nam.channel.bn)

    assert nam.spatial is None
    assert all(key.startswith("channel.") for key in nam.state_dict())
    want = ref_channel(x, nam.channel.bn.weight, nam.channel.bn.bias)
    torch.testing.assert_close(nam(x), want)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_all_zero_scale_factors_give_a_neutral_gate(kind, detach):
    """sum |gamma| = 0 must not produce NaN: w = 0 and the gate is sigmoid(0) = 0.5."""
    x = torch.randn(4, 6, 5, 7, requires_grad=True)
    if kind == "channel":
        module = NAMChannelAttention(6, detach_weights=detach)
    else:
        module = NAMSpatialAttention((5, 7), detach_weights=detach)
    with torch.no_grad():
        module.bn.weight.zero_()
        module.bn.bias.normal_()

    y = module(x)
    upstream = torch.randn_like(y) * 10  # a loss of ordinary size, not a tiny one
    y.backward(upstream)

    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, x * 0.5)
    # With w = 0 the gate is constant, so only the input gets gradient.
    torch.testing.assert_close(x.grad, upstream * 0.5)
    torch.testing.assert_close(module.bn.weight.grad, torch.zeros_like(module.bn.weight))
    torch.testing.assert_close(module.bn.bias.grad, torch.zeros_like(module.bn.bias))


def test_channel_attention_works_after_its_batchnorm_is_pruned():
    module = NAMChannelAttention(6)
    randomize_affine(module.bn)
    for _ in range(2):  # non-trivial running statistics
        module(torch.randn(4, 6, 5, 7) * 2 + 1)

    keep = torch.tensor([0, 2, 5])
    old = module.bn
    pruned = nn.BatchNorm2d(len(keep), eps=old.eps)
    with torch.no_grad():
        pruned.weight.copy_(old.weight[keep])
        pruned.bias.copy_(old.bias[keep])
        pruned.running_mean.copy_(old.running_mean[keep])
        pruned.running_var.copy_(old.running_var[keep])
        pruned.num_batches_tracked.copy_(old.num_batches_tracked)
    module.bn = pruned

    x = torch.randn(4, 3, 5, 7)
    gamma, beta = old.weight[keep].detach(), old.bias[keep].detach()
    running = (old.running_mean[keep], old.running_var[keep])
    module.eval()
    torch.testing.assert_close(module(x), ref_channel(x, gamma, beta, running=running))

    module.train()
    torch.testing.assert_close(module(x), ref_channel(x, gamma, beta))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: NAMChannelAttention(0), r"`channels`.*0"),
        (lambda: NAMChannelAttention(2.5), r"`channels`.*2\.5"),
        (lambda: NAMChannelAttention(True), r"`channels`.*True"),
        (lambda: NAM(0), r"`channels`"),
        (lambda: NAMSpatialAttention((0, 3)), r"`size\[0\]`.*0"),
        (lambda: NAMSpatialAttention((3, 0)), r"`size\[1\]`.*0"),
        (lambda: NAMSpatialAttention((3,)), r"`size`.*\(3,\)"),
        (lambda: NAM(4, spatial_size=(3,)), r"`spatial_size`.*\(3,\)"),
    ],
    ids=[
        "channels=0",
        "channels=2.5",
        "channels=True",
        "NAM-channels=0",
        "size=(0,3)",
        "size=(3,0)",
        "size=(3,)",
        "NAM-spatial_size=(3,)",
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: NAMChannelAttention(6),
        lambda: NAMSpatialAttention((5, 7)),
        lambda: NAM(6, spatial_size=(5, 7)),
    ],
    ids=["channel", "spatial", "nam"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_output_dtype_follows_input_under_bf16_autocast(build, dtype):
    module = build()
    for bn in (m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        randomize_affine(bn)
    x = torch.randn(4, 6, 5, 7).to(dtype)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)

    assert y.dtype == dtype
    assert y.shape == x.shape
    want = module.float()(x.float())  # same module and weights, no autocast, float32
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
