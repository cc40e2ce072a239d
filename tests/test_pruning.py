"""Channel pruning (nam_lightning.pruning): exact surgery, the zoo, limits, errors, atomicity.

The reference for "which channels go" is built by hand: zero the scale factor and shift of
chosen channels in every backbone BatchNorm, so those channels carry nothing and rank first;
removing exactly them must leave the eval-mode outputs unchanged. Torch-Pruning itself is only
asked for the count of prunable channels and coupled groups (the denominator of ``amount``).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
import torch_pruning as tp
import torchvision
from helpers import assert_unchanged, conv_channels, nam_bns, randomise_bns, snapshot
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.shufflenetv2 import InvertedResidual

import nam_lightning.pruning
from nam_lightning import (
    NAMChannelAttention,
    PruneConfig,
    PruneReport,
    inject_nam,
    load_checkpoint,
    prune_channels,
    save_pruned,
)
from nam_lightning.report import count_flops, count_params

ZERO = 4  # channels [0, ZERO) of every backbone BatchNorm carry nothing


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, nam: bool = False) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    if nam:
        inject_nam(model)
    return model


def backbone_bns(model: nn.Module) -> list[_BatchNorm]:
    skip = nam_bns(model)
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and id(m) not in skip]


def last_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def prunable(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Torch-Pruning's count of prunable channels and of coupled groups (output layer kept)."""
    clone = copy.deepcopy(model)
    pruner = tp.pruner.BasePruner(
        clone,
        x,
        importance=tp.importance.BNScaleImportance(),
        ignored_layers=[last_linear(clone)],
    )
    groups = pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    return pruner.initial_total_channels, len(list(groups))


# --- 1. surgery exactness -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "nam"),
    [("resnet18", False), ("resnet50", False), ("mobilenet_v2", False), ("resnet18", True)],
    ids=["resnet18", "resnet50", "mobilenet_v2", "resnet18-nam"],
)
def test_removing_dead_channels_leaves_outputs_unchanged(name: str, nam: bool) -> None:
    model = randomise_bns(build(name, nam), zero=ZERO).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x).detach()
    total, groups = prunable(model, x)
    nam_gammas = {
        n: m.bn.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, NAMChannelAttention)
    }
    convs_before = conv_channels(model)

    # the amount that removes exactly ZERO channels from every coupled group
    report = prune_channels(model, x, (ZERO * groups - 0.5) / total, measure=False)

    assert report.removed_channels == ZERO * groups
    assert report.threshold == 0
    # every dead channel is gone, and nothing else: each conv lost exactly ZERO channels
    assert all(bool((bn.weight != 0).all()) for bn in backbone_bns(model))
    assert {n: c - ZERO for n, c in convs_before.items()} == conv_channels(model)
    assert last_linear(model).out_features == 10
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)

    if nam:
        for n, m in model.named_modules():
            if isinstance(m, NAMChannelAttention):
                torch.testing.assert_close(m.bn.weight.detach(), nam_gammas[n][ZERO:])
                torch.testing.assert_close(m.pruned_mass, nam_gammas[n][:ZERO].sum())
        # without the removed NAM scale factors in the denominator the gates shift
        for m in model.modules():
            if isinstance(m, NAMChannelAttention):
                m.pruned_mass = torch.zeros(())
        with pytest.raises(AssertionError):
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


# --- 2. the zoo -----------------------------------------------------------------------------

ZOO = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",  # grouped convs: a group can have no channel under the threshold
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "regnet_y_400mf",
    "densenet121",  # no NAM site: pruned without NAM
    "vgg11_bn",  # no NAM site
    "shufflenet_v2_x1_0",  # no NAM site; its channel shuffle keeps the block outputs whole
]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_prunes_half_and_still_trains(name: str) -> None:
    model = build(name)
    try:
        inject_nam(model)
    except ValueError:
        assert name in ("densenet121", "vgg11_bn", "shufflenet_v2_x1_0")
    # fresh BatchNorms all have gamma = 1: a tie; random scale factors make a real ranking
    randomise_bns(model).train()
    x = torch.randn(2, 3, 32, 32)

    report = prune_channels(model, x, 0.5, measure=False)

    assert report.params_after < report.params_before
    assert report.params_after == count_params(model)
    assert report.flops_after < report.flops_before
    assert report.flops_after == count_flops(model, x)
    assert report.removed_channels > 0
    assert all(m.training for m in model.modules())  # the caller's mode is kept
    assert last_linear(model).out_features == 10
    out = model(x)
    assert out.shape == (2, 10)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


class ShuffleNet(torchvision.models.ShuffleNetV2):
    """shufflenet_v2_x1_0 with 10 classes, as a class that ``load_checkpoint`` can build."""

    def __init__(self) -> None:
        super().__init__([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=10)


def test_shufflenet_keeps_shuffled_channels_and_prunes_the_rest_exactly() -> None:
    """The channel shuffle permutes the blocks' output channels, which Torch-Pruning's index
    mapping cannot follow: every channel that passes a shuffle stays. Prunable are each
    block's inner branch channels, the stem's and the last conv's: 18 groups, whose zeroed
    channels go first; removing them changes no output."""
    model = randomise_bns(ShuffleNet(), zero=ZERO).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x).detach()
    convs_before = conv_channels(model)
    blocks = [n for n, m in model.named_modules() if isinstance(m, InvertedResidual)]
    inner = [f"{n}.branch2.0" for n in blocks]  # and the depthwise conv after it
    stem = ["conv1.0", "conv5.0"]  # and stage2.0.branch1.0, depthwise on the stem's output
    total = sum(convs_before[n] for n in inner + stem)
    groups = len(inner) + len(stem)

    report = prune_channels(model, x, (ZERO * groups - 0.5) / total, measure=False)

    assert report.removed_channels == ZERO * groups
    assert report.threshold == 0
    pruned = {*inner, *(f"{n}.branch2.3" for n in blocks), *stem, "stage2.0.branch1.0"}
    assert conv_channels(model) == {
        n: c - ZERO if n in pruned else c for n, c in convs_before.items()
    }
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_pruned_shufflenet_loads_back(tmp_path: Any) -> None:
    model = randomise_bns(ShuffleNet())
    x = torch.randn(2, 3, 32, 32)
    prune_channels(model, x, 0.5, measure=False)
    save_pruned(model, tmp_path / "shufflenet.pt")

    loaded = load_checkpoint(ShuffleNet, tmp_path / "shufflenet.pt").eval()

    assert conv_channels(loaded) == conv_channels(model)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_model_without_batchnorm_is_rejected_untouched() -> None:
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=10)
    before = snapshot(model)
    with pytest.raises(ValueError, match="BatchNorm"):
        prune_channels(model, torch.randn(1, 3, 32, 32), 0.5, measure=False)
    assert_unchanged(model, before)


def test_tied_importances_remove_the_requested_amount() -> None:
    # Torch-Pruning removes every channel scoring <= its global threshold: with every gamma at
    # 1 (a fresh model) that was every channel, each group was refused, and nothing was pruned.
    model = build("resnet18")
    x = torch.randn(1, 3, 32, 32)
    total, _ = prunable(model, x)
    report = prune_channels(model, x, 0.5, measure=False)
    assert report.removed_channels == total - int(total * 0.5)


def tiny_net(widths: tuple[int, ...] = (32, 32, 32), classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU())
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


def test_layer_with_no_channel_under_the_threshold_is_skipped() -> None:
    model = tiny_net()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1)
        model[4].weight.uniform_(2, 3)  # every channel more important than any of layer 0
        model[7].weight.uniform_(2, 3)
    report = prune_channels(model, torch.randn(1, 3, 8, 8), 0.25, measure=False)
    assert report.removed_channels == 96 - int(96 * 0.75)
    assert conv_channels(model) == {"0": 32 - report.removed_channels, "3": 32, "6": 32}


# --- 3. FLOPs target ------------------------------------------------------------------------


def test_flops_target_is_met_within_two_percent() -> None:
    model = randomise_bns(build("resnet50"))
    x = torch.randn(1, 3, 64, 64)
    report = prune_channels(model, x, flops_target=0.5, measure=False)
    assert abs(report.flops_ratio - 0.5) <= 0.02
    assert report.flops_after == count_flops(model, x)
    assert report.flops_target == 0.5
    assert report.amount is not None and 0 < report.amount < 0.9


def cuts_to_flops_target(
    monkeypatch: pytest.MonkeyPatch, model: nn.Module, x: torch.Tensor, target: float
) -> int:
    """Prune ``model`` to ``target`` of its FLOPs; check the report's counts against
    ``count_flops`` and the landing within 2%; return how many times it was traced and cut."""
    flops = count_flops(model, x)
    original = nam_lightning.pruning.planned_pass
    traced: list[int] = []

    def counted(*args: Any) -> Any:
        traced.append(1)
        return original(*args)

    monkeypatch.setattr(nam_lightning.pruning, "planned_pass", counted)
    report = prune_channels(model, x, flops_target=target, measure=False)
    assert report.flops_before == flops
    assert report.flops_after == count_flops(model, x)
    assert abs(report.flops_after / flops - target) <= 0.02
    return len(traced)


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "regnet_y_400mf", "efficientnet_b0", "vgg11_bn"]
)
def test_flops_target_lands_within_two_percent_tracing_and_cutting_once(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grouped convolutions (regnet), depthwise ones and squeeze-excitation (mobilenet_v2,
    efficientnet), a flatten into a linear layer (vgg, without NAM): every FLOP is inside a
    convolution or linear layer, so the FLOPs after a cut are predicted exactly, and one cut
    lands."""
    model = randomise_bns(build(name, nam=name != "vgg11_bn"))
    assert cuts_to_flops_target(monkeypatch, model, torch.randn(2, 3, 32, 32), 0.4) == 1


class Gram(nn.Module):
    """Scale each channel by its row of the channel Gram matrix: matrix products outside any
    convolution or linear layer, whose FLOPs grow with the square of the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(2)  # (N, C, H * W)
        return torch.bmm(f, f.transpose(1, 2)).mean(2)[..., None, None] * x


def test_flops_outside_the_layers_are_counted_and_the_target_still_met(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prediction leaves out what the Gram matrix loses; the count after the cut shows
    the miss, and the next cut, predicted with it, lands."""
    model = tiny_net((32, 32))
    model.insert(3, Gram())
    randomise_bns(model)
    assert cuts_to_flops_target(monkeypatch, model, torch.randn(2, 3, 16, 16), 0.5) == 2


class DictOutput(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


class BatchMix(DictOutput):
    """Samples mixed by matrix products (FLOPs growing with the square of the batch), and a row
    per class, not per sample: one sample's count does not scale to the batch."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.net(x)
        return {"logits": ((f @ f.T) @ f).T}


@pytest.mark.parametrize("wrapper", [DictOutput, BatchMix], ids=["per sample", "mixed"])
def test_flops_reported_are_those_of_the_whole_batch(wrapper: type[nn.Module]) -> None:
    """The FLOPs are counted on one sample and scaled by the batch where the output has a row
    per sample, and on the whole batch where it does not: either way the report gives the
    batch's FLOPs, as counting the batch directly does."""
    model = wrapper(randomise_bns(tiny_net()))
    x = torch.randn(4, 3, 8, 8)
    before = count_flops(model, x)
    assert (count_flops(model, x[:1]) * 4 == before) is (wrapper is DictOutput)
    report = prune_channels(model, x, 0.25, measure=False)
    assert report.flops_before == before
    assert report.flops_after == count_flops(model, x) < before


def test_unreachable_flops_target_fails_untouched() -> None:
    model = randomise_bns(tiny_net())
    before = snapshot(model)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"unchanged.*`flops_target=0.01` cannot be reached"):
        prune_channels(model, x, flops_target=0.01, max_layer_amount=0.5, measure=False)
    assert_unchanged(model, before)


# --- 4. limits: output layer, per-layer cap, round_to, scope, importance --------------------


def test_linear_output_layer_is_never_pruned() -> None:
    model = randomise_bns(build("resnet18"))
    prune_channels(model, torch.randn(1, 3, 32, 32), 0.8, measure=False)
    assert model.fc.out_features == 10
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_conv_output_layer_is_never_pruned() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 10, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    randomise_bns(model)
    x = torch.randn(2, 3, 16, 16)
    report = prune_channels(model, x, 0.5, measure=False)
    assert conv_channels(model) == {"0": 8, "3": 10}
    assert report.channels_after == {"0": 8, "3": 10}
    assert model(x).shape == (2, 10)


def test_ignored_layers_keep_their_channels() -> None:
    model = randomise_bns(build("resnet18"))
    before = conv_channels(model)
    prune_channels(
        model, torch.randn(1, 3, 32, 32), 0.5, ignored_layers=[model.layer2[0].conv1], measure=False
    )
    after = conv_channels(model)
    assert after["layer2.0.conv1"] == before["layer2.0.conv1"]
    assert after["layer2.1.conv1"] < before["layer2.1.conv1"]


def one_dead_layer_resnet18() -> nn.Module:
    model = randomise_bns(build("resnet18"))
    with torch.no_grad():
        model.layer2[0].bn1.weight.uniform_(0, 1e-3)  # the whole layer below everything else
    return model


def test_no_layer_loses_more_than_max_layer_amount() -> None:
    model = one_dead_layer_resnet18()
    before = conv_channels(model)
    prune_channels(model, torch.randn(1, 3, 32, 32), 0.8, max_layer_amount=0.5, measure=False)
    after = conv_channels(model)
    for name, channels in before.items():
        assert after[name] >= math.ceil(channels / 2), name
    assert any(after[n] == math.ceil(c / 2) for n, c in before.items())  # the cap did bind


def test_layer_entirely_under_the_threshold_is_capped_not_skipped() -> None:
    model = one_dead_layer_resnet18()
    prune_channels(model, torch.randn(1, 3, 32, 32), 0.8, max_layer_amount=0.5, measure=False)
    assert model.layer2[0].conv1.out_channels == 64  # 128, cut by the cap of one half


def test_round_to_keeps_pruned_layers_multiples() -> None:
    x = torch.randn(1, 3, 32, 32)
    plain = randomise_bns(build("resnet18"))
    prune_channels(plain, x, 0.5, measure=False)
    assert any(c % 8 for c in conv_channels(plain).values())  # so the check below can fail

    model = randomise_bns(build("resnet18"))
    before = conv_channels(model)
    report = prune_channels(model, x, 0.5, round_to=8, measure=False)
    after = conv_channels(model)
    assert report.removed_channels > 0
    for name, channels in after.items():
        assert channels == before[name] or channels % 8 == 0, (name, channels)


def test_local_scope_prunes_every_layer_by_the_amount() -> None:
    model = randomise_bns(build("resnet18"))
    before = conv_channels(model)
    report = prune_channels(model, torch.randn(1, 3, 32, 32), 0.3, scope="local", measure=False)
    assert report.scope == "local"
    for name, channels in conv_channels(model).items():
        assert abs(channels - before[name] * 0.7) <= 1, (name, before[name], channels)


def test_nam_importance_prunes_only_groups_with_nam() -> None:
    model = randomise_bns(build("resnet18", nam=True))
    before = conv_channels(model)
    report = prune_channels(model, torch.randn(1, 3, 32, 32), 0.3, importance="nam", measure=False)
    after = conv_channels(model)
    assert report.importance == "nam" and report.removed_channels > 0
    inner = [n for n in before if n.endswith(".conv1") and n.startswith("layer")]
    assert len(inner) == 8
    assert all(after[n] == before[n] for n in inner)
    # the residual streams (gated by NAM) shrink
    for name in ("conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer4.1.conv2"):
        assert after[name] < before[name], name


def test_spatial_nam_does_not_block_the_residual_streams() -> None:
    model = build("resnet18")
    x = torch.randn(2, 3, 32, 32)
    inject_nam(model, spatial=True, example_inputs=x)
    randomise_bns(model)
    prune_channels(model, x, 0.4, measure=False)
    assert model.conv1.out_channels < 64
    assert model.layer4[1].conv2.out_channels < 512


def test_nam_importance_needs_nam() -> None:
    model = randomise_bns(build("resnet18"))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`importance='nam'` needs NAM modules"):
        prune_channels(model, torch.randn(1, 3, 32, 32), 0.3, importance="nam", measure=False)
    assert_unchanged(model, before)


# --- 5. bad arguments -----------------------------------------------------------------------

FRACTION = r"must be a fraction in \(0, 1\), got "


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"amount": 0.5, "flops_target": 0.5}, ValueError, "Give exactly one of `amount` and"),
        ({"amount": None}, ValueError, r"Give exactly one of .* amount=None, flops_target=None"),
        ({"amount": 0}, ValueError, "`amount` " + FRACTION + "0$"),
        ({"amount": 1}, ValueError, "`amount` " + FRACTION + "1$"),
        ({"amount": 1.5}, ValueError, "`amount` " + FRACTION + "1.5"),
        ({"amount": -0.1}, ValueError, "`amount` " + FRACTION + "-0.1"),
        ({"amount": True}, TypeError, "`amount` must be a fraction in .*, got bool True"),
        ({"amount": "0.5"}, TypeError, "`amount` must be a fraction in .*, got str '0.5'"),
        ({"amount": None, "flops_target": 0}, ValueError, "`flops_target` " + FRACTION + "0"),
        ({"amount": None, "flops_target": 1.2}, ValueError, "`flops_target` " + FRACTION + "1.2"),
        ({"importance": "l1"}, ValueError, r"`importance` must be 'bn' or 'nam', got 'l1'"),
        ({"scope": "layer"}, ValueError, r"`scope` must be 'global' or 'local', got 'layer'"),
        ({"max_layer_amount": 0}, ValueError, "`max_layer_amount` " + FRACTION + "0"),
        ({"max_layer_amount": 1}, ValueError, "`max_layer_amount` " + FRACTION + "1"),
        ({"round_to": 0}, ValueError, "`round_to` must be None or a positive int, got 0"),
        ({"round_to": 2.5}, TypeError, "`round_to` must be None or a positive int, got float"),
        (
            {"amount": 0.6, "scope": "local", "max_layer_amount": 0.5},
            ValueError,
            r"`amount=0.6` exceeds `max_layer_amount=0.5` with scope='local'",
        ),
        ({"model": "x"}, TypeError, "`model` must be a torch.nn.Module, got str"),
        ({"example_inputs": "x"}, TypeError, "`example_inputs` must be a tensor or a tuple"),
        ({"ignored_layers": ["fc"]}, TypeError, "`ignored_layers` must hold torch.nn.Module"),
        ({"measure": "yes"}, TypeError, r"`measure` must be a bool \(True or False\), got 'yes'"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = randomise_bns(build("resnet18"))
    before = snapshot(model)
    args: dict[str, Any] = {
        "model": model,
        "example_inputs": torch.randn(1, 3, 32, 32),
        "amount": 0.5,
        "measure": False,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        prune_channels(**args)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "Give exactly one of `amount` and `flops_target`"),
        ({"amount": 1.5}, "`amount` " + FRACTION + "1.5"),
        ({"amount": 0.5, "scope": "layer"}, "`scope` must be 'global' or 'local'"),
        ({"amount": 0.5, "round_to": 0}, "`round_to` must be None or a positive int"),
    ],
)
def test_prune_config_validates_like_prune_channels(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


# --- 6. atomicity ---------------------------------------------------------------------------


def nam_resnet18() -> nn.Module:
    return randomise_bns(build("resnet18", nam=True))


def test_failure_during_surgery_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nam_resnet18()
    x = torch.randn(1, 3, 32, 32)
    expected = model.eval()(x).detach()
    model.train()
    before = snapshot(model)
    original = tp.dependency.Group.prune
    calls = []

    def prune_then_fail(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("surgery interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tp.dependency.Group, "prune", prune_then_fail)
    with pytest.raises(ValueError, match="the model is unchanged: surgery interrupted"):
        prune_channels(model, x, 0.5, measure=False)
    assert len(calls) == 3  # two groups were cut before the failure

    assert_unchanged(model, before)
    assert all(
        float(m.pruned_mass) == 0 for m in model.modules() if isinstance(m, NAMChannelAttention)
    )
    torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)

    # and the restored model prunes normally afterwards
    monkeypatch.setattr(tp.dependency.Group, "prune", original)
    assert prune_channels(model, x, 0.5, measure=False).removed_channels > 0


def test_failure_after_surgery_restores_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nam_resnet18()
    x = torch.randn(1, 3, 32, 32)
    before = snapshot(model)

    def record_then_fail(*args: Any) -> None:  # the last step: the pass goes into the record
        raise RuntimeError("record broke")

    monkeypatch.setattr(nam_lightning.pruning, "add_pruning_pass", record_then_fail)
    with pytest.raises(ValueError, match="the model is unchanged: record broke"):
        prune_channels(model, x, 0.5, measure=False)
    assert_unchanged(model, before)


# --- 7. the report --------------------------------------------------------------------------


def test_report_serialises_and_reads() -> None:
    model = randomise_bns(tiny_net((8, 16)))
    with torch.no_grad():  # the lower half of each layer goes: 4 + 8 channels
        model[1].weight.copy_(torch.arange(8) / 8 + 0.01)
        model[4].weight.copy_(torch.arange(16) / 16 + 0.01)
    x = torch.randn(2, 3, 8, 8)
    report = prune_channels(model, x, 0.5)
    assert isinstance(report, PruneReport)

    data = json.loads(json.dumps(report.to_dict()))
    for key in (
        "params_before",
        "params_after",
        "flops_before",
        "flops_after",
        "channels_before",
        "channels_after",
        "threshold",
    ):
        assert key in data, key
    assert data["params_after"] == count_params(model) < data["params_before"]
    assert data["flops_after"] == count_flops(model, x) < data["flops_before"]
    assert data["channels_before"] == {"0": 8, "3": 16, "8": 10}
    assert data["channels_after"] == {"0": 4, "3": 8, "8": 10}
    assert data["removed_channels"] == 12
    assert data["flops_ratio"] == report.flops_after / report.flops_before
    assert data["threshold"] == pytest.approx(7 / 16 + 0.01)

    for value in (report.latency_before, report.latency_after, report.speedup):
        assert isinstance(value, float) and value > 0
    assert data["surgery_seconds"] > 0 and data["measure_seconds"] > 0
    assert data["surgery_seconds"] + data["measure_seconds"] <= data["seconds"]
    unmeasured = prune_channels(randomise_bns(tiny_net((8, 16))), x, 0.5, measure=False)
    assert unmeasured.measure_seconds == 0 < unmeasured.surgery_seconds

    table = report.table()
    assert str(report) == table
    for word in ("params", "FLOPs", "latency", f"{report.params_after:,}", "3: 16 -> 8"):
        assert word in table, word


def test_non_finite_scale_factors_are_refused_untouched() -> None:
    model = build("resnet18")
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] = float("nan")
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"NaN or inf \(layer1\.0\.bn1\.weight\)"):
        prune_channels(model, torch.randn(1, 3, 32, 32), 0.5, measure=False)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for key, value in model.state_dict().items():  # NaN != NaN: compare with equal_nan
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True)


def test_round_to_larger_than_every_layer_says_nothing_was_removed() -> None:
    model = randomise_bns(build("resnet18"))
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="No channel was removed"):
        report = prune_channels(model, x, 0.5, round_to=4096, measure=False)
    assert report.removed_channels == 0
    assert report.params_after == report.params_before
    assert "round_to=4096" in report.table()
