"""Tests for nam_lightning.sparsity against references written here.

The references find scale factors by module *name* (a NAM BatchNorm is the child ``bn`` of a
NAMChannelAttention / NAMSpatialAttention), independently of the library's walk by type.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Sequence

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nam_lightning import add_l1_subgradient_, inject_nam, l1_penalty, scale_factors, sparsity
from nam_lightning.attention import NAMChannelAttention, NAMSpatialAttention
from nam_lightning.sparsity import Targets

TARGETS: tuple[Targets, ...] = ("nam", "bn", "all")
BAD_TARGETS = ["NAM", "", "both", None, ["nam"]]


def reference_scale_factors(model: nn.Module, targets: Targets) -> list[torch.Tensor]:
    """Affine BatchNorm weights by name: NAM's are the ``bn`` child of a NAM attention module."""
    nam_names = {
        name
        for name, m in model.named_modules()
        if isinstance(m, (NAMChannelAttention, NAMSpatialAttention))
    }
    nam: list[torch.Tensor] = []
    other: list[torch.Tensor] = []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm) or m.weight is None:
            continue
        parent, _, leaf = name.rpartition(".")
        (nam if leaf == "bn" and parent in nam_names else other).append(m.weight)
    return {"nam": nam, "bn": other, "all": nam + other}[targets]


def ids(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {id(t) for t in tensors}


@functools.cache
def _resnet18_nam(spatial: bool) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    example = torch.randn(2, 3, 32, 32) if spatial else None
    inject_nam(model, spatial=spatial, example_inputs=example)
    return model


def resnet18_nam(spatial: bool = False) -> nn.Module:
    """A fresh copy each call: tests change weights, and SyncBatchNorm conversion the modules."""
    return copy.deepcopy(_resnet18_nam(spatial))


def signed_with_zeros_(model: nn.Module) -> None:
    """Give every BatchNorm weight negative, positive and exactly-zero entries."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                w = torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype)
                w[::3] = 0.0
                m.weight.copy_(w)


class Holder(nn.Module):
    """Stands for a LightningModule holding the network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


WRAPPERS = {
    "holder": Holder,
    "sequential": lambda m: nn.Sequential(m),
    "data_parallel": nn.DataParallel,
    "sync_batchnorm": lambda m: nn.SyncBatchNorm.convert_sync_batchnorm(Holder(m)),
}


# --- scale_factors -------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [False, True], ids=["channel", "channel+spatial"])
@pytest.mark.parametrize("targets", TARGETS)
def test_scale_factors_resnet18_matches_reference(targets: Targets, spatial: bool) -> None:
    model = resnet18_nam(spatial)
    got = scale_factors(model, targets)
    expected = reference_scale_factors(model, targets)
    # resnet18: 20 backbone BatchNorms; NAM after each of the 8 BasicBlocks (x2 with spatial).
    n_nam = 16 if spatial else 8
    assert len(expected) == {"nam": n_nam, "bn": 20, "all": n_nam + 20}[targets]
    assert len(got) == len(expected)
    assert ids(got) == ids(expected)


def test_scale_factors_nam_is_exactly_the_nam_bn_weights() -> None:
    model = resnet18_nam(spatial=True)
    nam_weights = [
        m.bn.weight
        for m in model.modules()
        if isinstance(m, (NAMChannelAttention, NAMSpatialAttention))
    ]
    assert ids(scale_factors(model, "nam")) == ids(nam_weights)
    assert not ids(scale_factors(model, "bn")) & ids(nam_weights)
    assert scale_factors(model) == scale_factors(model, "all")


@pytest.mark.parametrize("wrap", list(WRAPPERS.values()), ids=list(WRAPPERS))
@pytest.mark.parametrize("targets", TARGETS)
def test_scale_factors_through_wrappers(targets: Targets, wrap) -> None:
    model = resnet18_nam(spatial=True)
    bare = ids(scale_factors(model, targets))
    wrapped = wrap(model)
    got = scale_factors(wrapped, targets)
    assert len(got) == len(bare)
    assert ids(got) == bare == ids(reference_scale_factors(wrapped, targets))


def test_scale_factors_after_sync_batchnorm_conversion_sees_sync_bns() -> None:
    wrapped = nn.SyncBatchNorm.convert_sync_batchnorm(Holder(resnet18_nam(spatial=True)))
    bns = [m for m in wrapped.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert ids(scale_factors(wrapped, "all")) == ids(m.weight for m in bns)


def test_scale_factors_skips_non_affine_batchnorms() -> None:
    nam_plain = NAMChannelAttention(4)
    nam_no_affine = NAMChannelAttention(4)
    nam_no_affine.bn = nn.BatchNorm2d(4, affine=False)
    affine = nn.BatchNorm2d(4)
    model = nn.Sequential(
        nn.BatchNorm2d(4, affine=False), affine, nam_plain, nam_no_affine, nn.BatchNorm1d(4)
    )
    bn1d = model[4]
    assert ids(scale_factors(model, "nam")) == {id(nam_plain.bn.weight)}
    assert ids(scale_factors(model, "bn")) == {id(affine.weight), id(bn1d.weight)}
    assert ids(scale_factors(model, "all")) == ids(reference_scale_factors(model, "all"))
    assert len(scale_factors(model, "all")) == 3


def test_scale_factors_ignores_other_norms() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True),
        nn.LayerNorm([4, 6, 6]),
    )
    for targets in TARGETS:
        assert scale_factors(model, targets) == []


@pytest.mark.parametrize("bad", BAD_TARGETS, ids=repr)
@pytest.mark.parametrize("fn", [scale_factors, l1_penalty])
def test_bad_targets_raise_value_error(fn, bad) -> None:
    model = nn.Sequential(nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match=r"`targets`.*'nam'.*'bn'.*'all'") as info:
        fn(model, bad)
    assert repr(bad) in str(info.value)


# --- l1_penalty ----------------------------------------------------------------------------


@pytest.mark.parametrize("targets", TARGETS)
def test_l1_penalty_value_and_gradient(targets: Targets) -> None:
    model = resnet18_nam(spatial=True)
    signed_with_zeros_(model)
    expected_params = reference_scale_factors(model, targets)
    expected = sum(p.detach().abs().sum() for p in expected_params)

    penalty = l1_penalty(model, targets)
    assert penalty.dim() == 0
    torch.testing.assert_close(penalty, expected)

    flat = torch.cat([p.detach().reshape(-1) for p in expected_params])
    assert (flat == 0).any() and (flat < 0).any() and (flat > 0).any()

    penalty.backward()
    selected = ids(expected_params)
    for name, p in model.named_parameters():
        if id(p) in selected:
            torch.testing.assert_close(p.grad, torch.sign(p.detach()), rtol=0, atol=0, msg=name)
        else:
            assert p.grad is None, name


def test_l1_penalty_gradient_at_zero_is_zero() -> None:
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-1.5, 0.0, 2.0, 0.0, -0.0]))
    penalty = l1_penalty(nn.Sequential(bn))
    torch.testing.assert_close(penalty, torch.tensor(3.5))
    penalty.backward()
    torch.testing.assert_close(bn.weight.grad, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]))


def test_l1_penalty_without_batchnorm_is_zero() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))
    for targets in TARGETS:
        penalty = l1_penalty(model, targets)
        assert penalty.dim() == 0
        assert penalty.item() == 0.0


def test_l1_penalty_nam_only_when_model_has_no_nam_is_zero() -> None:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    assert l1_penalty(model, "nam").item() == 0.0
    assert l1_penalty(model, "bn").item() > 0.0


# --- add_l1_subgradient_ -------------------------------------------------------------------


def make_params() -> list[nn.Parameter]:
    torch.manual_seed(2)
    values = [
        torch.tensor([-1.5, 0.0, 2.0, 0.3]),
        torch.tensor([[0.0, -0.2], [4.0, 0.0]]),
        torch.tensor([-3.0, 0.0]),
    ]
    params = [nn.Parameter(v) for v in values]
    params[0].grad = torch.randn(4)
    params[2].grad = torch.randn(2)  # params[1] has no gradient
    return params


@pytest.mark.parametrize("lam", [1e-4, 0.3, 2.0])
def test_add_l1_subgradient_adds_lambda_sign(lam: float) -> None:
    params = make_params()
    grads = [p.grad for p in params]
    before = [None if g is None else g.clone() for g in grads]

    add_l1_subgradient_(iter(params), lam)  # any iterable, consumed once

    assert params[1].grad is None
    for p, g, b in zip(params, grads, before, strict=True):
        if b is None:
            continue
        assert p.grad is g  # in place
        assert p.grad is not None
        torch.testing.assert_close(p.grad, b + lam * torch.sign(p.detach()))
        torch.testing.assert_close(p.grad[p == 0], b[p == 0], rtol=0, atol=0)


def test_add_l1_subgradient_zero_lambda_leaves_grads() -> None:
    params = make_params()
    before = [None if p.grad is None else p.grad.clone() for p in params]
    add_l1_subgradient_(params, 0.0)
    for p, b in zip(params, before, strict=True):
        if b is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, b, rtol=0, atol=0)


def test_add_l1_subgradient_without_any_grad_is_a_no_op() -> None:
    params = [nn.Parameter(torch.tensor([1.0, -1.0])) for _ in range(2)]
    add_l1_subgradient_(params, 0.5)
    add_l1_subgradient_([], 0.5)
    assert all(p.grad is None for p in params)


def small_net(detach_weights: bool) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        NAMChannelAttention(6, detach_weights=detach_weights),
        nn.Conv2d(6, 4, 3),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    signed_with_zeros_(net)
    return net


@pytest.mark.parametrize("detach_weights", [True, False])
@pytest.mark.parametrize("targets", TARGETS)
def test_add_l1_subgradient_equals_autograd_of_penalised_loss(
    targets: Targets, detach_weights: bool
) -> None:
    lam = 0.05
    torch.manual_seed(4)
    x = torch.randn(8, 3, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    by_hook = small_net(detach_weights)
    by_loss = copy.deepcopy(by_hook)

    nn.functional.cross_entropy(by_hook(x), y).backward()
    add_l1_subgradient_(scale_factors(by_hook, targets), lam)

    loss = nn.functional.cross_entropy(by_loss(x), y) + lam * l1_penalty(by_loss, targets)
    loss.backward()

    hook_grads = dict(by_hook.named_parameters())
    for name, p in by_loss.named_parameters():
        torch.testing.assert_close(hook_grads[name].grad, p.grad, msg=name)


# --- sparsity ------------------------------------------------------------------------------


def reference_sparsity(params: Sequence[torch.Tensor], threshold: float) -> float:
    below = sum(int((p.abs() < threshold).sum()) for p in params)
    total = sum(p.numel() for p in params)
    return below / total


@pytest.mark.parametrize("threshold", [1e-2, 0.5, 1.0])
def test_sparsity_matches_reference(threshold: float) -> None:
    gen = torch.Generator().manual_seed(5)
    params = [
        nn.Parameter(torch.randn(17, generator=gen) * 0.05),
        nn.Parameter(torch.randn(3, 4, generator=gen)),
        nn.Parameter(torch.tensor([0.0, -0.0, 0.5, -0.5, 1e-3])),  # exactly at 0.5: not below
    ]
    got = sparsity(params, threshold)
    assert got.dim() == 0
    assert not got.requires_grad
    expected = reference_sparsity(params, threshold)
    assert 0.0 < expected < 1.0
    torch.testing.assert_close(got.item(), expected)


def test_sparsity_default_threshold_is_1e_2() -> None:
    params = [torch.tensor([0.0, 0.009, -0.009, 0.011, -0.5, 0.01])]
    torch.testing.assert_close(sparsity(params).item(), 3 / 6)


def test_sparsity_of_resnet18_scale_factors() -> None:
    model = resnet18_nam()
    signed_with_zeros_(model)
    params = scale_factors(model)
    torch.testing.assert_close(sparsity(params).item(), reference_sparsity(params, 1e-2))


def test_sparsity_of_nothing_is_zero() -> None:
    assert sparsity([]).item() == 0.0
    assert sparsity(iter([])).item() == 0.0


def test_sparsity_of_zero_element_params_is_zero() -> None:
    assert sparsity([torch.empty(0), torch.empty(0, 3)]).item() == 0.0


def test_non_finite_names_the_bad_scale_factors() -> None:
    from nam_lightning.sparsity import non_finite

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    assert non_finite(model) == []
    with torch.no_grad():
        model[2].weight[1] = float("inf")
    assert non_finite(model) == ["2.weight"]
    assert non_finite(model, "nam") == []
