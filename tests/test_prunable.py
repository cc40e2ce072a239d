"""Layers channel pruning cannot follow (nam_lightning.prunable), refused before any surgery.

``channel_selection`` is reproduced from Network Slimming's pre-activation ResNet: a parameter
``indexes`` of one entry per channel, read through ``.data`` (outside autograd) to pick the
channels it keeps. Pruning the channels around it must be refused with the module named and
the model left exactly as it was; layers whose per-channel tensors Torch-Pruning does follow
(a parameter used through autograd), or that sit on the model's input, must not be refused.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from nam_lightning import fold_nam, inject_nam, prune_channels
from nam_lightning.prunable import check_channel_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


class channel_selection(nn.Module):  # the name it has in Network Slimming
    """Select channels from a batch-normalised input by the non-zero entries of ``indexes``."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.indexes = nn.Parameter(torch.ones(num_channels))

    def forward(self, input_tensor: torch.Tensor) -> torch.Tensor:
        selected_index = np.squeeze(np.argwhere(self.indexes.data.cpu().numpy()))
        if selected_index.size == 1:
            selected_index = np.resize(selected_index, (1,))
        return input_tensor[:, selected_index, :, :]


class ChannelMask(nn.Module):
    """A per-channel buffer applied to the channels: Torch-Pruning never cuts buffers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


class LayerScale(nn.Module):
    """A per-channel parameter used through autograd: Torch-Pruning cuts it with the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Normalize(nn.Module):
    """Input normalisation with per-channel buffers, on the image's 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def net(layer: nn.Module | None = None, front: nn.Module | None = None) -> nn.Sequential:
    """conv-BN-(layer)-ReLU, twice, and a classifier; ``front`` before all of it."""
    return nn.Sequential(
        front or nn.Identity(),
        nn.Conv2d(3, 10, 3, padding=1),
        nn.BatchNorm2d(10),
        layer or nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(10, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def state(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {
        k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
    }


def assert_unchanged(model: nn.Module, before: tuple[list[type], dict[str, Any]]) -> None:
    types, tensors = state(model)
    assert types == before[0]
    assert tensors.keys() == before[1].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]), key


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize(
    ("layer", "named"),
    [
        (channel_selection(10), "'3' (channel_selection): its parameter 'indexes' of shape (10,)"),
        (ChannelMask(10), "'3' (ChannelMask): its buffer 'mask' of shape (1, 10, 1, 1)"),
    ],
    ids=["channel_selection", "buffer"],
)
def test_a_layer_pruning_cannot_follow_is_refused_and_the_model_unchanged(layer, named):
    model = net(layer)
    inject_nam(model, sites=["2"])
    before = state(model)
    with pytest.raises(ValueError, match="Channel pruning cannot follow") as error:
        prune_channels(model, X, 0.5, measure=False)
    message = str(error.value)
    assert named in message
    assert "one entry per channel of its 10-channel input" in message
    assert "channel_selection" in message and "The model is unchanged" in message
    assert_unchanged(model, before)


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")  # Torch-Pruning's note
def test_a_parameter_used_through_autograd_is_cut_with_its_channels():
    model = net(LayerScale(10))
    report = prune_channels(model, X, 0.5, measure=False)
    assert report.removed_channels > 0
    kept = model[2].num_features
    assert kept < 10 and model[3].gamma.shape == (1, kept, 1, 1)
    assert model(X).shape == (2, 4)


def test_per_channel_buffers_on_the_models_input_are_not_refused():
    """The image's channels are never pruned, so a normaliser on them is no obstacle."""
    model = net(front=Normalize())
    report = prune_channels(model, X, 0.5, measure=False)
    assert report.removed_channels > 0
    assert model[0].mean.shape == (1, 3, 1, 1)


def test_a_folded_model_is_refused():
    """Folded NAM keeps its constants in buffers: fold after pruning, not before."""
    model = torchvision.models.resnet18(num_classes=4)
    inject_nam(model)
    fold_nam(model.eval())
    before = state(model)
    with pytest.raises(ValueError, match=r"'layer1\.0\.bn2' \(FoldedNAM\): its buffer"):
        prune_channels(model, torch.randn(2, 3, 32, 32), 0.3, measure=False)
    assert_unchanged(model, before)


def test_no_forward_pass_without_a_candidate_layer():
    """Only layers of types Torch-Pruning does not know are checked: a torchvision model with
    NAM has none, so the check does not even run it (an input it cannot take passes)."""
    model = torchvision.models.resnet18(num_classes=4)
    inject_nam(model)
    check_channel_tensors(model, torch.randn(1, 5))  # the wrong shape for the model


class Split(nn.Module):
    """Two convs on the two halves of the channels, split by sizes kept in an attribute (as
    timm's MixedConv2d does): the split cannot follow a cut of its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.splits = [channels // 2, channels - channels // 2]
        self.convs = nn.ModuleList(nn.Conv2d(c, 6, 3, padding=1) for c in self.splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], 1)


def test_channels_split_by_fixed_sizes_are_kept_whole():
    model = nn.Sequential(
        nn.Conv2d(3, 10, 3, padding=1),
        nn.BatchNorm2d(10),
        nn.ReLU(),
        Split(10),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    reference = copy.deepcopy(model)
    report = prune_channels(model, X, 0.5, measure=False)
    assert report.removed_channels > 0  # elsewhere
    assert model[0].out_channels == 10 and model[1].num_features == 10
    assert [c.in_channels for c in model[3].convs] == [5, 5]
    assert model(X).shape == reference(X).shape
