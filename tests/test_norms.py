"""NAM after norm layers other than torch's BatchNorm (nam_lightning.norms), unfolded and folded.

timm's ``BatchNormAct2d`` is a ``BatchNorm2d`` subclass whose forward is the BatchNorm, then
``self.drop``, then ``self.act``; torchvision's ``FrozenBatchNorm2d`` is no ``_BatchNorm`` at
all. The reference is NAM written out by hand after the norm layer's own maths: NAM follows
the whole module, so after a built-in activation it gates the activated output. Outputs are
compared in float32 at 1e-6 and in float64 at 1e-12.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from helpers import randomise_norms
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from nam_lightning import FoldedNAM, NAMSite, fold_nam, inject_nam
from nam_lightning.norms import eval_affine_state, is_norm, norm_channels

pytestmark = pytest.mark.usefixtures("one_thread")


def timm_layers():
    return pytest.importorskip("timm.layers")


def bn_eval(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """A BatchNorm with running statistics, written out."""
    view = (1, -1, 1, 1)
    mean, var = norm.running_mean.view(view), norm.running_var.view(view)
    scale = norm.weight.view(view) / torch.sqrt(var + norm.eps)
    return (x - mean) * scale + norm.bias.view(view)


def nam_reference(x: torch.Tensor, site: NAMSite, after_norm: Callable) -> torch.Tensor:
    """The site's module (``after_norm`` applied to its BatchNorm map), then NAM by hand."""
    y = after_norm(bn_eval(x, site.module))
    bn = site.nam.channel.bn
    w = bn.weight.abs() / bn.weight.abs().sum()
    return y * torch.sigmoid(w.view(1, -1, 1, 1) * bn_eval(y, bn))


def check_site(norm: nn.Module, after_norm: Callable, folds_in: bool) -> None:
    """NAM after ``norm`` (between two convs): unfolded (plain operators and the no-grad
    kernels) and folded, against the reference; whether the norm was folded in."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), norm, nn.Conv2d(6, 4, 1))
    inject_nam(model, sites=["1"])
    randomise_norms(model, signs=True, shift=0.5).eval()
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        m = copy.deepcopy(model).to(dtype)
        x = torch.randn(2, 3, 7, 7, dtype=dtype)
        with torch.no_grad():
            expected = m[2](nam_reference(m[0](x), m[1], after_norm))
            inference = m(x)
        with torch.enable_grad():
            plain = m(x).detach()
        folded = copy.deepcopy(m)
        assert fold_nam(folded) == 1
        with torch.no_grad():
            result = folded(x)
        for output in (plain, inference, result):
            torch.testing.assert_close(output, expected, rtol=0, atol=tolerance)
    if folds_in:
        assert isinstance(folded[1], FoldedNAM) and folded[1].bn_scale is not None
    else:  # the module stays, NAM folds alone behind it
        assert isinstance(folded[1], nn.Sequential) and folded[1][0] is not m[1].module
        assert type(folded[1][0]) is type(norm) and folded[1][1].bn_scale is None


def test_fold_keeps_the_activation_of_timm_batchnorm_act():
    """timm's BatchNormAct2d(act=SiLU), as efficientnet_b0's stem: before, fold_nam folded the
    BatchNorm and dropped the SiLU (outputs off by ~0.3 here, 1.04 on efficientnet_b0)."""
    layers = timm_layers()
    check_site(layers.BatchNormAct2d(6, act_layer=nn.SiLU), nn.functional.silu, folds_in=False)


def test_timm_batchnorm_act_without_activation_folds_in():
    layers = timm_layers()
    norm = layers.BatchNormAct2d(6, apply_act=False)
    assert eval_affine_state(norm) is not None
    check_site(norm, lambda y: y, folds_in=True)


def test_timm_batchnorm_act_with_a_drop_layer_is_kept():
    """A drop layer is not the identity in general, so the module is not a plain BatchNorm."""
    layers = timm_layers()
    norm = layers.BatchNormAct2d(6, apply_act=False, drop_layer=nn.Dropout)
    assert eval_affine_state(norm) is None
    check_site(norm, lambda y: y, folds_in=False)  # Dropout is the identity in eval mode


def test_frozen_batchnorm_folds_in():
    """torchvision's FrozenBatchNorm2d: buffers only, and not a _BatchNorm subclass."""
    norm = FrozenBatchNorm2d(6, eps=1e-3)
    assert is_norm(norm) and norm_channels(norm) == 6
    check_site(norm, lambda y: y, folds_in=True)


@pytest.mark.parametrize("act", [True, False], ids=["relu", "no_act"])
def test_timm_frozen_batchnorm_act(act: bool):
    layers = timm_layers()
    norm = layers.FrozenBatchNormAct2d(6, apply_act=act)
    assert is_norm(norm) and norm_channels(norm) == 6
    check_site(norm, nn.functional.relu if act else (lambda y: y), folds_in=not act)


class ShiftedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own: not the BatchNorm map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def test_a_batchnorm_subclass_with_its_own_forward_is_kept():
    norm = ShiftedBatchNorm(6)
    assert is_norm(norm) and eval_affine_state(norm) is None
    check_site(norm, lambda y: y + 1, folds_in=False)


@torch.no_grad()
def test_auto_sites_and_folding_with_frozen_batchnorm_resnet():
    """A detection-style backbone: torchvision's resnet18 with FrozenBatchNorm2d everywhere."""
    model = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
    sites = inject_nam(model)
    assert sites == [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]
    randomise_norms(model, signs=True, shift=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.enable_grad():
        expected = model(x).detach()
    folded = copy.deepcopy(model)
    assert fold_nam(folded) == 8
    assert all(isinstance(folded.get_submodule(s), FoldedNAM) for s in sites)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-6)
